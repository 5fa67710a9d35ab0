"""`dreamer4 dataset info|verify|rebuild-manifest DIR`: statistics of a dataset, a full re-read
check, and the recovery of a lost manifest from the shards' own metadata."""

from __future__ import annotations

import numpy as np

from dreamer4.data.store import Dataset, rebuild_manifest, verify
from dreamer4.data.video import import_videos


def dataset_stats(root: str) -> dict:
    ds = Dataset.open(root, allow_empty=True)
    m = ds.manifest
    eps = ds.episodes
    out: dict = {
        "dir": str(root),
        "env": m["env"]["id"],
        "craftax_version": m["env"]["craftax_version"],
        "frame_shape": m["frame_shape"],
        "num_actions": m["num_actions"],
        "seed": m["seed"],
        "behavior_policy": m["behavior_policy"],
        "shards": len(ds.shards),
        "writers_complete": sum(bool(w.get("complete")) for w in m.get("writers", {}).values()),
        "num_writers": m.get("num_writers", 0),
        "target_episodes": m.get("num_episodes", len(ds.episodes)),
        "epsilon": m.get("epsilon", 0.0),
        "has_actions": m.get("has_actions", True),
        "has_rewards": m.get("has_rewards", True),
        "episodes": len(eps),
        "steps": int(sum(e.length for e in eps)),
        "splits": {},
    }
    for split in ("train", "eval"):
        se = [e for e in eps if e.split == split]
        if not se:
            out["splits"][split] = {"episodes": 0}
            continue
        rets = np.array([e.ret for e in se])
        lens = np.array([e.length for e in se])
        out["splits"][split] = {
            "episodes": len(se),
            "steps": int(lens.sum()),
            "labeled_episodes": int(sum(e.labeled for e in se)),
            "label_fraction": float(np.mean([e.labeled for e in se])),
            "return_mean": float(rets.mean()),
            "return_std": float(rets.std()),
            "return_min": float(rets.min()),
            "return_max": float(rets.max()),
            "length_mean": float(lens.mean()),
            "length_min": int(lens.min()),
            "length_max": int(lens.max()),
        }
    out["achievements"] = {
        name: (float(np.mean([name in e.achievements for e in eps])) if eps else 0.0) for name in ds.achievement_names
    }
    out["policies"] = sorted({e.policy for e in eps})
    out["per_policy"] = {
        p: {
            "episodes": len(pe),
            "steps": int(sum(e.length for e in pe)),
            "return_mean": float(np.mean([e.ret for e in pe])),
            "achievements_mean": float(np.mean([len(e.achievements) for e in pe])),
        }
        for p in out["policies"]
        for pe in [[e for e in eps if e.policy == p]]
    }
    return out


def print_info(root: str) -> dict:
    s = dataset_stats(root)
    print(f"dataset   {s['dir']}")
    print(
        f"env       {s['env']} (craftax {s['craftax_version']}), frames {tuple(s['frame_shape'])}, "
        f"{s['num_actions']} actions, seed {s['seed']}, policy {s['behavior_policy']}"
    )
    print(
        f"progress  {s['episodes']}/{s['target_episodes']} episodes, {s['steps']} steps, {s['shards']} shards, "
        f"{s['writers_complete']}/{s['num_writers']} writers complete"
    )
    print(
        f"{'split':6} {'episodes':>8} {'steps':>8} {'labeled':>8} {'return mean±std':>18} {'min':>6} {'max':>6} {'len mean':>8}"
    )
    for split, d in s["splits"].items():
        if not d["episodes"]:
            print(f"{split:6} {0:>8}")
            continue
        print(
            f"{split:6} {d['episodes']:>8} {d['steps']:>8} {d['label_fraction']:>8.1%} "
            f"{d['return_mean']:>10.2f} ± {d['return_std']:<5.2f} {d['return_min']:>6.1f} {d['return_max']:>6.1f} "
            f"{d['length_mean']:>8.1f}"
        )
    if len(s["per_policy"]) > 1 or s["epsilon"]:
        print(f"behaviour policies (epsilon {s['epsilon']}):")
        for p, d in s["per_policy"].items():
            print(
                f"  {p:40} {d['episodes']:>6} episodes {d['steps']:>8} steps  return {d['return_mean']:.2f}  "
                f"achievements {d['achievements_mean']:.2f}"
            )
    if not (s["has_actions"] and s["has_rewards"]):
        print("note: some episodes are imported videos without actions or rewards (never labeled)")
    print("achievements (share of episodes that unlocked each):")
    for name, rate in sorted(s["achievements"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:24} {rate:6.1%}")
    return s


def run_import_video(
    cfg, out: str, files: list[str], frame_shape: str | None = None, fit: str = "resize", fps: float | None = None
) -> dict:
    summary = import_videos(cfg, out, files, frame_shape=frame_shape, fit=fit, fps=fps)
    print(f"dataset: {out} (inspect with `dreamer4 dataset info {out}`)")
    return summary


def run_verify(root: str) -> int:
    problems, notes = verify(root)
    ds = Dataset.open(root, allow_empty=True)
    for n in notes:
        print(f"note: {n}")
    for p in problems:
        print(f"DAMAGED: {p}")
    if problems:
        print(f"verify: {len(problems)} problem(s) in {root}")
        return 1
    print(f"verify: OK, {len(ds.shards)} committed shards, {len(ds.episodes)} episodes, all arrays match the manifest")
    return 0


def run_rebuild_manifest(root: str, move_aside: bool = False) -> int:
    rebuild_manifest(root, move_aside=move_aside)
    if not move_aside:
        print(f"check it with `dreamer4 dataset verify {root}`")
    return 0

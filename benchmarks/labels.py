"""Action-label ablation: how much of the action grounding survives with few labeled episodes.

    python benchmarks/labels.py --run runs/tiny [--config configs/tiny.yaml] [--fractions 1.0,0.1,0.0]

Re-labels the run's dataset (the same episodes, same frames: only the manifest's `labeled` flags
change, chosen by the same stratified rule as collection) for each fraction, trains a dynamics
model on each with the run's frozen tokenizer, and runs the open-loop evaluation. Prints PSNR with
true / shuffled / no actions and the action gap per fraction, and writes JSON. The paper's claim:
a small labeled share recovers most of the fully labeled model's action grounding.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from dreamer4.config import load_config
from dreamer4.data.collect import _offsets, stratified_pick
from dreamer4.dynamics.evaluate import dream
from dreamer4.dynamics.train import train_dynamics
from dreamer4.runtime.jax_setup import enable_compilation_cache


def relabel(src: Path, dst: Path, fraction: float) -> None:
    """Copy a dataset's manifest with train episodes re-labeled at `fraction` (shards are linked)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name not in ("manifest.json", "manifest.lock") and not (dst / p.name).exists():
            (dst / p.name).symlink_to(p.resolve())
    m = json.loads((src / "manifest.json").read_text())
    counters = {}
    for shard in m["shards"]:
        w = shard["writer"]
        _, label_u = _offsets(m["seed"], w)
        for e in shard["episodes"]:
            if e["split"] != "train":
                continue
            n = counters.get(w, 0)
            e["labeled"] = stratified_pick(n, fraction, label_u)
            counters[w] = n + 1
    m["labeled_fraction"] = fraction
    (dst / "manifest.json").write_text(json.dumps(m, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/tiny", help="run with a dataset/ and a trained tokenizer/")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--fractions", default="1.0,0.1,0.0")
    ap.add_argument("--out", default="bench_out/labels")
    ap.add_argument("--json", default="bench_out/labels.json")
    args = ap.parse_args()
    enable_compilation_cache()
    cfg = load_config(args.config, args.overrides + ["dynamics.train.eval_every=0"])
    run = Path(args.run)
    rows = []
    for f in (float(x) for x in args.fractions.split(",")):
        out = Path(args.out) / f"labeled_{f:g}"
        if out.exists():
            shutil.rmtree(out)
        relabel(run / "dataset", out / "dataset", f)
        shutil.copytree(run / "tokenizer", out / "tokenizer")
        t0 = time.time()
        train_dynamics(cfg, out / "dataset", out, evaluate=False)
        m = dream(out)
        K = cfg.dynamics.sample_steps
        rows.append(
            {
                "labeled_fraction": f,
                "train_s": time.time() - t0,
                "psnr_true": m["eval_psnr_true_actions"],
                "psnr_shuffled": m["eval_psnr_shuffled_actions"],
                "psnr_none": m["eval_psnr_none_actions"],
                "gap_db": m["eval_action_gap_db"],
                f"psnr_K{K}": m[f"eval_psnr_K{K}"],
                "tokenizer_ceiling": m["eval_psnr_tokenizer_ceiling"],
            }
        )
    print(f"\n{'labeled':>8} {'true':>8} {'shuffled':>9} {'none':>8} {'gap dB':>7} {'ceiling':>8} {'train s':>8}")
    for r in rows:
        print(
            f"{r['labeled_fraction']:>8.2f} {r['psnr_true']:>8.2f} {r['psnr_shuffled']:>9.2f} {r['psnr_none']:>8.2f} "
            f"{r['gap_db']:>7.2f} {r['tokenizer_ceiling']:>8.2f} {r['train_s']:>8.0f}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {"config": args.config, "overrides": args.overrides, "rows": rows, "date": time.strftime("%Y-%m-%d")},
            indent=1,
        )
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

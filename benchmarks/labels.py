"""Action grounding against the labeled fraction (the paper's semi-supervised claim).

    python benchmarks/labels.py --run runs/tiny [--config configs/tiny.yaml] [--fractions 1.0,0.1,0.0]
        [--seeds 0,1] [--n 1024]

Re-labels the run's dataset (the same episodes and frames: only the manifest's `labeled` flags
change, chosen by the same stratified rule as collection) for each fraction, trains a dynamics
model per (fraction, seed) with the run's frozen tokenizer (the seed sets the dynamics' init and
its noise/loader stream), and runs the paired grounding probe (dynamics/grounding.py) on the
same held-out transitions. Prints per-run rows and, per fraction, the mean and spread over seeds
of the movement identification accuracy (chance 20%), its gain over chance relative to the fully
labeled fraction, the paired PSNR gap and the one-step latent error against copying the last
frame. Writes JSON. The paper's claim: a small labeled share recovers most of the grounding.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from dreamer4.config import load_config
from dreamer4.data.collect import _offsets, stratified_pick
from dreamer4.dynamics.grounding import eval_transitions, probe
from dreamer4.dynamics.train import train_dynamics
from dreamer4.runtime.jax_setup import enable_compilation_cache
from dreamer4.runtime.loading import load_world_model
from dreamer4.runtime.stage import open_dataset


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


def summarise(rows: list[dict]) -> list[dict]:
    """Per fraction: mean and (min, max) over seeds; gain over chance relative to fraction 1.0."""
    out = []
    fracs = sorted({r["labeled_fraction"] for r in rows}, reverse=True)
    full = [r["ident_movement"] - r["chance"] for r in rows if r["labeled_fraction"] == 1.0]
    full_gain = float(np.mean(full)) if full else float("nan")
    for f in fracs:
        rs = [r for r in rows if r["labeled_fraction"] == f]
        acc = np.array([r["ident_movement"] for r in rs])
        gain = float(np.mean(acc - np.array([r["chance"] for r in rs])))
        out.append(
            {
                "labeled_fraction": f,
                "seeds": len(rs),
                "ident_mean": float(acc.mean()),
                "ident_min": float(acc.min()),
                "ident_max": float(acc.max()),
                "gain_over_chance": gain,
                "gain_vs_full": gain / full_gain if full_gain > 0 else float("nan"),
                "gap_db_mean": float(np.mean([r["gap_db"] for r in rs])),
                "latent_minus_copy_mean": float(np.mean([r["latent_minus_copy"] for r in rs])),
            }
        )
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/tiny", help="run with a dataset/ and a trained tokenizer/")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--fractions", default="1.0,0.1,0.0")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--n", type=int, default=1024, help="held-out transitions in the probe")
    ap.add_argument("--out", default="bench_out/labels")
    ap.add_argument("--json", default="bench_out/labels.json")
    args = ap.parse_args()
    enable_compilation_cache()
    run = Path(args.run)
    rows = []
    for f in (float(x) for x in args.fractions.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = load_config(args.config, args.overrides + ["dynamics.train.eval_every=0", f"seed={seed}"])
            out = Path(args.out) / f"labeled_{f:g}_seed{seed}"
            if out.exists():
                shutil.rmtree(out)
            relabel(run / "dataset", out / "dataset", f)
            shutil.copytree(run / "tokenizer", out / "tokenizer")
            t0 = time.time()
            train_dynamics(cfg, out / "dataset", out, evaluate=False)
            world, wcfg, _ = load_world_model(out)
            # the same held-out transitions for every run (eval episodes keep their actions)
            trans = eval_transitions(open_dataset(run / "dataset", wcfg), wcfg.dynamics.eval_context, args.n, seed=0)
            r = probe(
                world, trans, wcfg.dynamics.sample_steps, jax.random.PRNGKey(0), context_tau=wcfg.dynamics.context_tau
            )
            im = r["identification_movement"]
            rows.append(
                {
                    "labeled_fraction": f,
                    "seed": seed,
                    "train_s": time.time() - t0,
                    "ident_movement": im["accuracy"],
                    "ident_ci95": im["ci95"],
                    "n_movement": im["n"],
                    "chance": im["chance"],
                    "ident_all": r["identification_all"]["accuracy"],
                    "gap_db": r["psnr_gap_true_minus_other_db"]["mean"],
                    "gap_db_ci95": r["psnr_gap_true_minus_other_db"]["ci95"],
                    "latent_minus_copy": r["latent_mse_generated_minus_copy"]["mean"],
                    "latent_minus_copy_ci95": r["latent_mse_generated_minus_copy"]["ci95"],
                    "pixel_minus_copy": r["pixel_mse_generated_minus_copy"]["mean"],
                    "pixel_minus_copy_ci95": r["pixel_mse_generated_minus_copy"]["ci95"],
                }
            )
            x = rows[-1]
            print(
                f"labeled {f:g} seed {seed}: movement identification {x['ident_movement']:.1%} "
                f"[{x['ident_ci95'][0]:.1%}, {x['ident_ci95'][1]:.1%}] of {x['n_movement']}, gap {x['gap_db']:+.3f} dB "
                f"[{x['gap_db_ci95'][0]:+.3f}, {x['gap_db_ci95'][1]:+.3f}], latent - copy {x['latent_minus_copy']:+.4f}, "
                f"pixel MSE - copy {x['pixel_minus_copy']:+.5f} [{x['pixel_minus_copy_ci95'][0]:+.5f}, "
                f"{x['pixel_minus_copy_ci95'][1]:+.5f}]",
                flush=True,
            )
    summary = summarise(rows)
    print(
        f"\n{'labeled':>8} {'seeds':>5} {'ident mean':>10} {'min':>6} {'max':>6} {'gain/full':>9} {'gap dB':>7} "
        f"{'lat-copy':>9}"
    )
    for s in summary:
        print(
            f"{s['labeled_fraction']:>8.2f} {s['seeds']:>5} {s['ident_mean']:>10.1%} {s['ident_min']:>6.1%} "
            f"{s['ident_max']:>6.1%} {s['gain_vs_full']:>9.2f} {s['gap_db_mean']:>+7.3f} "
            f"{s['latent_minus_copy_mean']:>+9.4f}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "config": args.config,
                "overrides": args.overrides,
                "rows": rows,
                "summary": summary,
                "date": time.strftime("%Y-%m-%d"),
            },
            indent=1,
        )
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

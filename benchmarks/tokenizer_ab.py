"""Paired comparison of trained tokenizers on the same held-out frames.

    python benchmarks/tokenizer_ab.py --data DATASET --runs RUN_A RUN_B [...] [--frames 16] [--json F]

Each run's tokenizer is loaded as it was trained (its own config: precision, residual stream) and
encodes + decodes the same clips: F consecutive frames from the middle of every held-out (eval)
episode at least F long. Per run: mean per-frame PSNR, PSNR of the mean MSE, and the train-set mean
frame baseline. Against the first run: the paired difference of per-episode mean PSNR (episodes
are the independent unit: frames of one clip are not) with a 95% percentile-bootstrap CI.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from dreamer4.dynamics.grounding import bootstrap_ci
from dreamer4.nn.module_jit import module_jit
from dreamer4.runtime.images import psnr, psnr_from_mse
from dreamer4.runtime.loading import load_tokenizer
from dreamer4.runtime.stage import open_dataset
from dreamer4.tokenizer.train import middle_clips

# one compiled function for every run: runs of the same architecture share its compilation
_encode_decode = module_jit(lambda m, x: jnp.clip(m.decode(m.encode(x)).astype(jnp.float32), 0.0, 1.0))


def reconstruct(tok, clips_EFHWC: np.ndarray, batch: int = 8) -> np.ndarray:
    """Whole-clip encode -> decode, clipped to [0, 1], float32, in batches of clips."""
    out = []
    for i in range(0, len(clips_EFHWC), batch):
        x = jnp.asarray(clips_EFHWC[i : i + batch], jnp.float32) / 255.0
        out.append(np.asarray(_encode_decode(tok, x)))
    return np.concatenate(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="dataset directory (its eval split is used)")
    ap.add_argument(
        "--runs", nargs="+", required=True, help="run directories with a trained tokenizer; the first is the reference"
    )
    ap.add_argument("--frames", type=int, default=16, help="frames per held-out clip")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    _, cfg0, _ = load_tokenizer(a.runs[0])
    ds = open_dataset(a.data, cfg0)
    clips = middle_clips(ds, a.frames, key="--frames")
    x = clips.astype(np.float32) / 255.0
    rows, per_episode = [], {}
    for run in a.runs:
        t0 = time.perf_counter()
        tok, cfg, _ = load_tokenizer(run)
        recon = reconstruct(tok, clips)
        p_EF = np.asarray(psnr(recon, x), np.float64)
        mse = float(np.mean((recon.astype(np.float64) - x) ** 2))
        per_episode[run] = p_EF.mean(axis=1)
        tc = cfg.tokenizer.train
        rows.append(
            {
                "run": run,
                "precision": tc.precision,
                "residual": tc.residual,
                "seed": cfg.seed,
                "psnr_mean_per_frame": float(p_EF.mean()),
                "psnr_of_mean_mse": float(psnr_from_mse(mse)),
                "seconds": time.perf_counter() - t0,
            }
        )
    ref = a.runs[0]
    for r in rows:
        d, lo, hi = bootstrap_ci(per_episode[r["run"]] - per_episode[ref])
        r.update({"diff_vs_first_db": d, "diff_ci95": [lo, hi]})
    res = {"data": a.data, "episodes": len(clips), "frames": a.frames, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print(f"{len(clips)} held-out clips x {a.frames} frames; differences paired by episode against {ref}")
    print("| run | precision | residual | seed | PSNR (mean per frame) | PSNR of mean MSE | vs first (95% CI) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["diff_ci95"]
        print(
            f"| {r['run']} | {r['precision']} | {r['residual']} | {r['seed']} | {r['psnr_mean_per_frame']:.2f} dB | "
            f"{r['psnr_of_mean_mse']:.2f} dB | {r['diff_vs_first_db']:+.3f} [{lo:+.3f}, {hi:+.3f}] |"
        )
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

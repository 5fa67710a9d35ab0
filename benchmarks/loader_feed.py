"""What the training loader feeds: frames/s per way of reading, repeated in alternation (issue 17).

    python benchmarks/loader_feed.py [--config configs/classic.yaml] [--data DATASET]
        [--cases latents:w8,latents:t1,latents:t2] [--reps 3] [--seconds 6] [--json FILE]

A case is READS:HOW: READS `frames` (what the tokenizer reads, at `loader.batch_size` x
`loader.seq_len`) or `latents` (what the dynamics reads from its latent cache, at
`dynamics.train.batch_size` x `dynamics.train.seq_len`); HOW `wN` (N grain worker processes) or `tN`
(read in this process by N threads). Latents come from a cache of the dataset's training windows
filled with random float32 latents of the preset's shape (the loader checks only that the cache
fits its windows; `gpu_suite_parts.synthetic_latent_cache`). Without --data, a synthetic dataset of
imported GIFs (`--synthetic VIDEOS,FRAMES`) is made under --work.

Each repetition runs every case once, in an order rotated by one per repetition, for --seconds
after --warm batches, so slow drift (page cache, other load) spreads over all cases. The table
gives each case's mean rate and spread, and its difference from the first case of the same READS,
paired by repetition, with a 95% Student-t interval. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dreamer4.config import load_config  # noqa: E402
from dreamer4.data.loader import make_loader  # noqa: E402
from dreamer4.policy.evaluate import mean_ci  # noqa: E402


def parse_case(text: str) -> tuple[str, int, int]:
    """'latents:w8' -> ('latents', 8 workers, 1 thread); 'frames:t2' -> ('frames', 0, 2)."""
    reads, _, how = text.partition(":")
    if reads not in ("frames", "latents") or len(how) < 2 or how[0] not in "wt" or not how[1:].isdigit():
        raise SystemExit(f"--cases: {text!r} is not READS:HOW (READS frames|latents, HOW wN or tN)")
    n = int(how[1:])
    if how[0] == "t" and n < 1:
        raise SystemExit(f"--cases: {text!r} needs at least one thread")
    return reads, (n if how[0] == "w" else 0), (n if how[0] == "t" else 1)


def rate(root: Path, cfg, reads: str, workers: int, threads: int, latents, seconds: float, warm: int) -> dict:
    """Frames/s of one loader after `warm` batches, and this process's CPU per batch."""
    lo = replace(cfg.loader, worker_count=workers, latent_worker_count=workers, read_threads=threads)
    c = replace(cfg, loader=lo)
    if reads == "frames":
        B, T, kw = cfg.loader.batch_size, cfg.loader.seq_len, {}
    else:
        B, T, kw = cfg.dynamics.train.batch_size, cfg.dynamics.train.seq_len, {"latents": latents}
    it = iter(make_loader(root, c, batch_size=B, seq_len=T, **kw))
    for _ in range(warm):
        next(it)
    r0, t0, n = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    del it
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    return {"batches": n, "frames_per_s": n * B * T / dt, "main_cpu_ms_per_batch": 1e3 * cpu / n, "batch": [B, T]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/classic.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--data", help="a dataset directory (default: a synthetic one under --work)")
    ap.add_argument("--synthetic", default="192,512", help="VIDEOS,FRAMES of the synthetic dataset")
    ap.add_argument("--work", default="bench_out/loader_feed")
    ap.add_argument("--cases", default="latents:w8,latents:t1,latents:t2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--json", default="bench_out/loader_feed.json")
    args = ap.parse_args(argv)
    from absl import flags  # grain's worker processes read absl flags

    flags.FLAGS.mark_as_parsed()
    from gpu_suite_parts import synthetic_dataset, synthetic_latent_cache

    cfg = load_config(args.config, args.overrides)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    cases = [parse_case(name) for name in names]
    work = Path(args.work)
    root = Path(args.data) if args.data else work / "dataset"
    if not args.data and not (root / "manifest.json").exists():
        videos, frames = (int(x) for x in args.synthetic.split(","))
        print(f"making a synthetic dataset of {videos} videos x {frames} frames in {root} ...", flush=True)
        synthetic_dataset(cfg, root, videos, frames)
    latents = None
    if any(r == "latents" for r, _, _ in cases):
        latents = work / f"latents-{root.name}"
        print(f"writing random latents for the training windows to {latents} ...", flush=True)
        synthetic_latent_cache(cfg, root, latents, cfg.dynamics.train.seq_len)
    runs: dict[int, list[dict]] = {i: [] for i in range(len(cases))}
    for rep in range(args.reps):
        for k in range(len(cases)):
            i = (k + rep) % len(cases)
            reads, w, t = cases[i]
            r = rate(root, cfg, reads, w, t, latents, args.seconds, args.warm)
            runs[i].append(r)
            print(f"rep {rep} {names[i]:12} {r['frames_per_s']:>12,.0f} frames/s", flush=True)
    rows = []
    for i, (reads, w, t) in enumerate(cases):
        fps = np.array([r["frames_per_s"] for r in runs[i]])
        base = next(j for j, c in enumerate(cases) if c[0] == reads)
        row = {
            "case": names[i],
            "reads": reads,
            "workers": w,
            "threads": t if w == 0 else None,
            "frames_per_s": fps.tolist(),
            "mean": float(fps.mean()),
            "main_cpu_ms_per_batch": float(np.mean([r["main_cpu_ms_per_batch"] for r in runs[i]])),
            "batch": runs[i][0]["batch"],
        }
        if base != i:
            row["minus_" + names[base]] = mean_ci(fps - np.array([r["frames_per_s"] for r in runs[base]]))
        rows.append(row)
    res = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
        "config": args.config,
        "overrides": args.overrides,
        "data": str(root),
        "reps": args.reps,
        "seconds": args.seconds,
        "rows": rows,
    }
    print(f"\n{'case':14} {'batch':>8} {'frames/s: mean (min-max)':>32} {'main CPU ms/batch':>18}  paired difference")
    for row in rows:
        f = row["frames_per_s"]
        diff = next(((k, v) for k, v in row.items() if k.startswith("minus_")), None)
        d = (
            f"{diff[0]}: {diff[1]['mean']:+,.0f} [{diff[1]['ci95'][0]:+,.0f}, {diff[1]['ci95'][1]:+,.0f}]"
            if diff
            else ""
        )
        b = "x".join(map(str, row["batch"]))
        print(
            f"{row['case']:14} {b:>8} {row['mean']:>14,.0f} ({min(f):,.0f}-{max(f):,.0f})"
            f" {row['main_cpu_ms_per_batch']:>18.2f}  {d}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()

"""Latent-cache benchmark: what building the cache costs and what the loader then delivers.

    python benchmarks/latent_cache.py --data DATASET_DIR [--run RUN_DIR] [--config configs/tiny.yaml]
                                      [--workers 0,2] [--batches 100] [--json bench_out/latent_cache.json]

With --run, the run's trained tokenizer; otherwise a freshly initialised one of the config (the
latents' values do not matter for speed). Windows are the dynamics stage's: `dynamics.train.seq_len`
steps every `loader.window_stride` rows of the train split, in blocks of `dynamics.train.batch_size`.

(a) Build: encode every window once into a fresh cache (a temporary directory): windows/s and
    frames/s (frames encoded, counting each window's T frames) after compilation, bytes on disk.
(b) Loader: windows/s of the dynamics' loader reading frames vs reading the cache, for each worker
    count, at the dynamics' batch and seq_len, against what the training step consumes
    (`--step-ms`, e.g. from benchmarks/train_step.py). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import jax

from dreamer4.config import load_config
from dreamer4.data.latents import LatentCache
from dreamer4.data.loader import make_loader, window_source
from dreamer4.dynamics.latent_cache import build_latent_cache
from dreamer4.runtime.jax_setup import enable_compilation_cache
from dreamer4.runtime.loading import build_tokenizer, load_tokenizer
from dreamer4.runtime.stage import open_dataset


def loader_rate(root, cfg, workers: int, batches: int, latents=None) -> dict:
    tc = cfg.dynamics.train
    c = replace(cfg, loader=replace(cfg.loader, worker_count=workers, latent_worker_count=workers))
    it = iter(make_loader(root, c, batch_size=tc.batch_size, seq_len=tc.seq_len, latents=latents))
    next(it)  # start-up (workers, first open) excluded
    t0, nbytes = time.perf_counter(), 0
    for _ in range(batches):
        nbytes += sum(v.nbytes for v in next(it).values())
    dt = time.perf_counter() - t0
    return {"windows_per_s": batches * tc.batch_size / dt, "MB_per_s": nbytes / dt / 1e6}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--run", help="use this run's trained tokenizer (default: a fresh one of --config)")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--workers", default="0,2", help="loader worker counts, comma-separated")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--step-ms", type=float, help="the dynamics train step's time, for the feed ratio")
    ap.add_argument("--json", default="bench_out/latent_cache.json")
    args = ap.parse_args(argv)
    enable_compilation_cache()
    cfg = load_config(args.config, args.overrides)
    tc = cfg.dynamics.train
    ds = open_dataset(args.data, cfg)
    tok = load_tokenizer(args.run)[0] if args.run else build_tokenizer(cfg, ds.frame_shape)
    source = window_source(args.data, cfg, "train", tc.seq_len, seq_len_key="dynamics.train.seq_len")
    W, T = len(source.base_windows), tc.seq_len
    tmp = Path(tempfile.mkdtemp(prefix="d4latents-"))
    res = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "device": str(jax.devices()[0]),
        "config": args.config,
        "overrides": args.overrides,
        "data": str(args.data),
        "tokenizer": args.run or "fresh",
        "windows": W,
        "seq_len": T,
        "stride": source.stride,
        "block": tc.batch_size,
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        # compile once on a throwaway cache of the same shapes, then time a fresh build
        build_latent_cache(tok, source, tmp / "warm", tc.batch_size, log=lambda m: None)
        t0 = time.perf_counter()
        path = build_latent_cache(tok, source, tmp / "timed", tc.batch_size, log=lambda m: None).latents.path
        dt = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        res["build"] = {"seconds": dt, "windows_per_s": W / dt, "frames_encoded_per_s": W * T / dt, "bytes": disk}
        assert not LatentCache(path).missing()
        res["loader"] = {}
        for w in [int(x) for x in args.workers.split(",") if x.strip()]:
            for kind, lat in (("frames", None), ("latents", path)):
                r = loader_rate(args.data, cfg, w, args.batches, lat)
                if args.step_ms:
                    r["ratio_over_train_step"] = r["windows_per_s"] / (tc.batch_size / (args.step_ms / 1e3))
                res["loader"][f"{kind}_workers{w}"] = r
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    b = res["build"]
    print(
        f"\nlatent cache of {W} windows x {T} steps (stride {source.stride}, blocks of {tc.batch_size}), {res['device']}"
    )
    print(f"{'build: seconds':40} {b['seconds']:12.1f}")
    print(f"{'build: windows/s':40} {b['windows_per_s']:12.0f}")
    print(f"{'build: frames encoded/s':40} {b['frames_encoded_per_s']:12.0f}")
    print(f"{'cache on disk, MB':40} {b['bytes'] / 1e6:12.1f}")
    for k, v in res["loader"].items():
        extra = f"  ({v['ratio_over_train_step']:.1f}x the step)" if "ratio_over_train_step" in v else ""
        print(f"{'loader ' + k + ' windows/s':40} {v['windows_per_s']:12.0f}{extra}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()

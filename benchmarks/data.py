"""Data-stage benchmark: collection vs the bare Craftax step loop, and loader throughput.

    python benchmarks/data.py [--config configs/tiny.yaml] [--num-envs 16] [--episodes 48] [--json bench_out/data.json]

(a) `dreamer4 collect` steady-state env steps/s (after compilation) against a bare jitted lax.scan
    over Craftax's own auto-reset env with the same policy and number of envs, frames converted to
    uint8 on the device and nothing written. Goal: ratio >= 0.9 (writing hides behind stepping).
    Craftax's auto-reset generates a new world every step (and selects), which our collector skips
    with a lax.cond, so we also report the ratio against our own scan with no host work at all:
    that one isolates the cost of moving, cutting and writing the data.
(b) grain loader windows/s and MB/s against indexing the same windows out of an in-memory numpy
    array of the whole split.
Prints a table and writes JSON. Numbers go into BENCHMARKS.md with the machine and date.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dreamer4.config import load_config
from dreamer4.data.collect import collect
from dreamer4.data.env import ENV_IDS, make_env, to_uint8
from dreamer4.data.loader import make_loader
from dreamer4.data.policies import make_policy
from dreamer4.data.store import Dataset
from dreamer4.runtime.jax_setup import enable_compilation_cache


def bare_loop_steps_per_s(cfg, seconds: float = 20.0, info: dict | None = None) -> float:
    """Steady env steps/s of the bare loop; `info`, if given, gets "compile_s" (init + first chunk)."""
    from craftax.craftax_env import make_craftax_env_from_name

    _, _, spec = make_env(cfg.env.name)  # first: it builds Craftax's texture cache safely if missing
    env = make_craftax_env_from_name(ENV_IDS[cfg.env.name], auto_reset=True)
    params = env.default_params
    policy = make_policy(cfg.collect.policy, spec, cfg.collect)
    N, T = cfg.collect.num_envs, cfg.collect.chunk_steps

    def init(key):
        obs, st = jax.vmap(env.reset, (0, None))(jax.random.split(key, N), params)
        return st, policy.init(N), to_uint8(obs), jnp.ones((N,), bool), key

    def chunk(carry):
        def step(c, _):
            st, ps, frame, first, key = c
            key, ka, ks = jax.random.split(key, 3)
            a, ps = policy.act(ps, ka, frame, first)
            obs, st, r, done, _ = jax.vmap(env.step, (0, 0, 0, None))(jax.random.split(ks, N), st, a, params)
            frame = to_uint8(obs)
            return (st, ps, frame, done, key), (frame, a, r, done)

        return jax.lax.scan(step, carry, None, length=T)

    init, chunk = jax.jit(init), jax.jit(chunk)
    t0 = time.time()
    carry = init(jax.random.PRNGKey(cfg.seed))
    # two warm-up chunks: the first call's carry (from init) and later ones (from chunk) may differ
    # in weak types or layout, which costs a second compilation that must not land in the timing
    for _ in range(2):
        carry, out = chunk(carry)
        jax.block_until_ready(out)
    if info is not None:
        info["compile_s"] = time.time() - t0
    steps, t0 = 0, time.time()
    while steps == 0 or time.time() - t0 < seconds:
        carry, out = chunk(carry)
        jax.block_until_ready(out)
        steps += N * T
    return steps / (time.time() - t0)


def device_only_steps_per_s(cfg, seconds: float = 20.0) -> float:
    """The collector's own jitted scan, results left on the device: collection minus all host work."""
    from dreamer4.data.collect import make_chunk_fn

    env, params, spec = make_env(cfg.env.name)
    policy = make_policy(cfg.collect.policy, spec, cfg.collect)
    init, chunk = make_chunk_fn(env, params, spec, policy, cfg.collect.num_envs, cfg.collect.chunk_steps)
    carry = init(jax.random.PRNGKey(cfg.seed))
    for _ in range(2):  # two warm-up chunks, as in bare_loop_steps_per_s
        carry, rows = chunk(carry)
        jax.block_until_ready(rows)
    steps, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        carry, rows = chunk(carry)
        jax.block_until_ready(rows)
        steps += cfg.collect.num_envs * cfg.collect.chunk_steps
    return steps / (time.time() - t0)


def loader_throughput(root, cfg, batches: int, worker_count: int) -> dict:
    from dataclasses import replace

    cfg = replace(cfg, loader=replace(cfg.loader, worker_count=worker_count))
    it = iter(make_loader(root, cfg))
    next(it)  # start-up (workers, first open) excluded
    t0 = time.time()
    nbytes = 0
    for _ in range(batches):
        b = next(it)
        nbytes += sum(v.nbytes for v in b.values())
    dt = time.time() - t0
    wins = batches * cfg.loader.batch_size
    return {"windows_per_s": wins / dt, "MB_per_s": nbytes / dt / 1e6}


def numpy_throughput(root, cfg, batches: int) -> dict:
    ds = Dataset.open(root)
    eps = [e for e in ds.split("train") if e.length >= cfg.loader.seq_len]
    arrays = [ds.read(e, 0, e.length, ("frame", "action", "reward", "is_first", "is_last", "is_terminal")) for e in eps]
    T, B = cfg.loader.seq_len, cfg.loader.batch_size
    rng = np.random.default_rng(0)
    t0 = time.time()
    nbytes = 0
    for _ in range(batches):
        out = {k: [] for k in arrays[0]}
        for _ in range(B):
            i = rng.integers(len(eps))
            s = rng.integers(eps[i].length - T + 1)
            for k, v in arrays[i].items():
                out[k].append(v[s : s + T])
        b = {k: np.stack(v) for k, v in out.items()}
        nbytes += sum(v.nbytes for v in b.values())
    dt = time.time() - t0
    return {"windows_per_s": batches * B / dt, "MB_per_s": nbytes / dt / 1e6}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--bare-seconds", type=float, default=20.0)
    ap.add_argument("--loader-batches", type=int, default=200)
    ap.add_argument("--dataset", default=None, help="reuse this dataset for (b) instead of collecting one")
    ap.add_argument("--json", default="bench_out/data.json")
    args = ap.parse_args()
    enable_compilation_cache()
    cfg = load_config(args.config, args.overrides)

    results = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "device": str(jax.devices()[0]),
        "config": args.config,
        "overrides": args.overrides,
        "num_envs": cfg.collect.num_envs,
        "chunk_steps": cfg.collect.chunk_steps,
        "policy": cfg.collect.policy,
        "date": time.strftime("%Y-%m-%d"),
    }
    bare = bare_loop_steps_per_s(cfg, args.bare_seconds)
    device_only = device_only_steps_per_s(cfg, args.bare_seconds)
    tmp = Path(tempfile.mkdtemp(prefix="d4bench-"))
    try:
        summary = collect(cfg, tmp / "ds", log=lambda *a: None)
        results["collect"] = {
            "steady_steps_per_s": summary["steady_steps_per_s"],
            "wall_steps_per_s_incl_compile": summary["new_steps"] / summary["seconds"],
            "bare_steps_per_s": bare,
            "ratio": summary["steady_steps_per_s"] / bare,
            "device_only_steps_per_s": device_only,
            "ratio_vs_device_only": summary["steady_steps_per_s"] / device_only,
        }
        root = args.dataset or tmp / "ds"
        results["loader"] = {
            "batch": [cfg.loader.batch_size, cfg.loader.seq_len],
            "grain_workers0": loader_throughput(root, cfg, args.loader_batches, 0),
            "grain_workers2": loader_throughput(root, cfg, args.loader_batches, 2),
            "numpy_in_memory": numpy_throughput(root, cfg, args.loader_batches),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    c = results["collect"]
    print(f"\n{'measure':44} {'value':>12}")
    print(f"{'collect steady steps/s':44} {c['steady_steps_per_s']:12.0f}")
    print(f"{'bare Craftax scan steps/s':44} {c['bare_steps_per_s']:12.0f}")
    print(f"{'ratio collect / bare (goal >= 0.9)':44} {c['ratio']:12.2f}")
    print(f"{'collector scan alone, no host work, steps/s':44} {c['device_only_steps_per_s']:12.0f}")
    print(f"{'ratio collect / collector scan alone':44} {c['ratio_vs_device_only']:12.2f}")
    for k, v in results["loader"].items():
        if k == "batch":
            continue
        print(f"{'loader ' + k + ' windows/s':44} {v['windows_per_s']:12.0f}")
        print(f"{'loader ' + k + ' MB/s':44} {v['MB_per_s']:12.1f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

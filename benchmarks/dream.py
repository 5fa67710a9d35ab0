"""Imagination speed: frames/s of the world model for K = sample_steps vs K = k_max, single-stream
interactive generation with the KV cache, and batched rollouts.

    python benchmarks/dream.py [--config configs/classic.yaml] [--batch 64] [--frames 32]

Random weights of the preset's sizes (speed does not depend on training). A generated frame costs
K + 1 cached forward passes of one step (K denoising steps, one context pass); "with decode"
adds the tokenizer's cached per-frame decoder, i.e. pixels a person would see. Prints a table and
writes JSON. Goals (issue 4): K=4 >= 12x faster than K=64; >= 100 interactive frames/s for the
classic preset on an H100.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from dreamer4.config import load_config
from dreamer4.dynamics.sampler import generate_step
from dreamer4.nn.module_jit import module_jit
from dreamer4.runtime.jax_setup import enable_compilation_cache
from dreamer4.runtime.loading import build_dynamics, build_tokenizer

FRAME_SHAPES = {"classic": (63, 63, 3), "full": (130, 110, 3)}


@module_jit  # not nnx.jit: that walks the module graph in Python on every call
def _decode_step(tok, z_B1LN, cache, t):
    return tok.decode_step(z_B1LN, cache, t)


def frames_per_s(dyn, tok, batch: int, frames: int, K: int, decode: bool, context_tau: float) -> float:
    act = jnp.zeros((batch, 1), jnp.int32)
    mask = jnp.ones((batch, 1), bool)
    key = jax.random.PRNGKey(0)

    def run(n):  # fresh caches each time: generate_step donates (deletes) the cache it is given
        cache = dyn.init_cache(batch, frames + 1)
        tcache = tok.init_cache(batch, frames + 1) if decode else None
        jax.block_until_ready((cache, tcache))
        t0 = time.time()
        z = None
        for t in range(n):
            z, cache = generate_step(
                dyn, cache, jnp.int32(t), act, mask, jax.random.fold_in(key, t), K=K, context_tau=context_tau
            )
            if decode:
                x, tcache = _decode_step(tok, z, tcache, jnp.int32(t))
                z = x
        jax.block_until_ready(z)
        return time.time() - t0

    run(2)  # compile
    return batch * frames / run(frames)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/classic.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--json", default="bench_out/dream.json")
    args = ap.parse_args()
    enable_compilation_cache()
    cfg = load_config(args.config, args.overrides)
    dc = cfg.dynamics
    tok = build_tokenizer(cfg, FRAME_SHAPES[cfg.env.name])
    dyn = build_dynamics(cfg, cfg, 17, seed=0, latent_grid=tok.latent_grid)  # dtype from dynamics.train.precision
    rows = []
    for name, batch, K, decode in [
        (f"interactive K={dc.sample_steps}", 1, dc.sample_steps, False),
        (f"interactive K={dc.sample_steps} + decode", 1, dc.sample_steps, True),
        (f"interactive K={dc.k_max}", 1, dc.k_max, False),
        (f"batched K={dc.sample_steps}", args.batch, dc.sample_steps, False),
        (f"batched K={dc.k_max}", args.batch, dc.k_max, False),
    ]:
        n = max(4, args.frames // (4 if K > 16 else 1))
        rows.append(
            {
                "case": name,
                "batch": batch,
                "K": K,
                "decode": decode,
                "frames_per_s": frames_per_s(dyn, tok, batch, n, K, decode, dc.context_tau),
            }
        )
    by = {r["case"]: r["frames_per_s"] for r in rows}
    speedup = by[f"batched K={dc.sample_steps}"] / by[f"batched K={dc.k_max}"]
    print(f"\n{'case':36} {'batch':>6} {'frames/s':>10}")
    for r in rows:
        print(f"{r['case']:36} {r['batch']:>6} {r['frames_per_s']:>10.1f}")
    print(f"speed-up K={dc.sample_steps} over K={dc.k_max} (batched): {speedup:.1f}x (goal >= 12x)")
    res = {
        "config": args.config,
        "overrides": args.overrides,
        "device": jax.devices()[0].device_kind,
        "rows": rows,
        "speedup": speedup,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

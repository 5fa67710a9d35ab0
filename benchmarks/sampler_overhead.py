"""Host cost per imagined frame: `generate_step` through nnx.jit (as it was) vs module_jit (as it is),
paired in one process, at K = 1, 4, 16, 64 (issue 17: a ~24 ms fixed cost per frame on an H100).

    python benchmarks/sampler_overhead.py [--config configs/classic.yaml] [--set dynamics.width=48]

The classic preset's depth and heads (the module graph nnx.jit walks) at a small width by default
(--set dynamics.width=48), so compute is small and the fixed cost shows. Also times an empty call
of each wrapper on the dynamics module, and checks that a frame makes no host transfer.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dreamer4.config import load_config
from dreamer4.dynamics import sampler
from dreamer4.nn.module_jit import module_jit
from dreamer4.runtime.loading import build_dynamics


def per_call_ms(fn, n: int) -> float:
    fn()
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/classic.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ks", default="1,4,16,64")
    ap.add_argument("--n", type=int, default=60, help="calls timed per case")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    overrides = ["dynamics.width=48", "dynamics.train.precision=fp32"] if args.overrides is None else args.overrides
    cfg = load_config(args.config, overrides)
    dyn = build_dynamics(cfg, cfg, 17, seed=0)
    dc = cfg.dynamics
    print(f"dynamics: width {dc.width}, depth {dc.depth}, heads {dc.num_heads}/{dc.num_kv_heads}; {jax.devices()[0]}")
    B, max_len = args.batch, 64
    act, mask = jnp.zeros((B, 1), jnp.int32), jnp.ones((B, 1), bool)
    ts = [jax.device_put(jnp.int32(t)) for t in range(max_len)]
    keys = [jax.random.fold_in(jax.random.PRNGKey(0), t) for t in range(max_len)]
    x = jnp.zeros(())

    empty = {"nnx.jit": nnx.jit(lambda m, x: x), "module_jit": module_jit(lambda m, x: x)}
    for name, f in empty.items():
        print(f"empty call on the dynamics module, {name:10}: {per_call_ms(lambda f=f: f(dyn, x), 200):7.3f} ms")

    before = nnx.jit(sampler.generate_step.fn, static_argnames=("K", "context_tau"), donate_argnames=("cache",))
    impls = {"before (nnx.jit)": before, "after (module_jit)": sampler.generate_step}
    ks = [int(k) for k in args.ks.split(",")]
    for _ in range(args.repeats):
        for name, gen in impls.items():
            row = {}
            for K in ks:
                st = {"cache": dyn.init_cache(B, max_len), "i": 0}

                def frame(gen=gen, K=K, st=st):
                    i = st["i"] = (st["i"] + 1) % max_len
                    z, st["cache"] = gen(dyn, st["cache"], ts[i], act, mask, keys[i], K=K, context_tau=dc.context_tau)
                    return z

                row[K] = per_call_ms(frame, args.n)
            ratio = f"; K={ks[-1]} / K=4: {row[ks[-1]] / row[4]:.2f}" if 4 in row else ""
            print(f"{name:20} " + ", ".join(f"K={k} {v:6.2f} ms" for k, v in row.items()) + ratio)
    cache = dyn.init_cache(B, max_len)
    z, cache = sampler.generate_step(dyn, cache, ts[0], act, mask, keys[0], K=4, context_tau=dc.context_tau)
    with jax.transfer_guard("disallow"):
        z, cache = sampler.generate_step(dyn, cache, ts[1], act, mask, keys[1], K=4, context_tau=dc.context_tau)
        jax.block_until_ready(z)
    print("a frame step under jax.transfer_guard('disallow'): no host transfer")


if __name__ == "__main__":
    main()

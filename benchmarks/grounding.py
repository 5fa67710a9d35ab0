"""Action-grounding probe of a trained world model (see dreamer4/dynamics/grounding.py).

    python benchmarks/grounding.py --run runs/tiny [--K 4] [--n 2048] [--after-bc] [--oracle-shift]
        [--json bench_out/grounding.json]

Prints the identification accuracy (movement and all actions, with 95% CIs and chance), the
paired PSNR gap true - other action, and the one-step prediction against copying the last frame.
With --oracle-shift (patch-layout tokenizers, Craftax-Classic's 7 map rows): on the moves whose
view moved, the latent error of copying the last latents, of shifting them one tile the way the
true move shifts the view (the revealed strip keeps the copy), and of the model's teacher-forced
prediction under the true action: what a grounded model could reach against what it does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dreamer4.dynamics.grounding import (
    MOVES,
    bootstrap_ci,
    eval_transitions,
    probe,
    shift_latents,
    summary_lines,
    teacher_forced_latents,
    view_shifted,
)
from dreamer4.runtime.jax_setup import enable_compilation_cache
from dreamer4.runtime.loading import load_agent, load_world_model
from dreamer4.runtime.stage import open_dataset


def oracle_shift(world, trans, key, context_tau: float) -> dict:
    """Latent MSE on moves with a moved view: copy-last, oracle shift, model (teacher-forced, true action)."""
    grid = world.tokenizer.latent_grid
    if grid is None:
        raise SystemExit("--oracle-shift needs a tokenizer with tokenizer.latent_layout=patch")
    dyn = world.dynamics
    C = trans.frames.shape[1] - 1
    a = trans.actions[:, C]
    sel = np.isin(a, MOVES) & view_shifted(trans.frames[:, C - 1], trans.frames[:, C])

    @jax.jit
    def teacher_forced(f, acts, k):
        z = world.latents(f)
        noise = jax.random.normal(jax.random.fold_in(k, 1), z[:, C:].shape)
        a_ctx = acts[:, :C]
        pred = teacher_forced_latents(dyn, z[:, :C], a_ctx, a_ctx >= 0, acts[:, C:], noise, k, context_tau=context_tau)
        return pred, z[:, C - 1], z[:, C]

    idx = np.flatnonzero(sel)
    parts = [
        teacher_forced(
            jnp.asarray(trans.frames[idx[s : s + 128]]),
            jnp.asarray(trans.actions[idx[s : s + 128]]),
            jax.random.fold_in(key, s),
        )
        for s in range(0, len(idx), 128)
    ]
    pred, last, true = (np.concatenate([np.asarray(p[i]) for p in parts]) for i in range(3))
    err = {
        "copy_last": ((last - true) ** 2).mean(axis=(1, 2)),
        "oracle_shift": ((shift_latents(last, a[idx], grid) - true) ** 2).mean(axis=(1, 2)),
        "model_teacher_forced": ((pred - true) ** 2).mean(axis=(1, 2)),
    }
    err["model_minus_oracle"] = err["model_teacher_forced"] - err["oracle_shift"]
    out = {"n_moves": int(len(idx))}
    for k, v in err.items():
        m, lo, hi = bootstrap_ci(v)
        out[k] = {"mean": m, "ci95": [lo, hi]}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", default=None, help="dataset (default: the one the dynamics was trained on)")
    ap.add_argument("--K", type=int, nargs="+", default=[4])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--oracle-shift", action="store_true", help="compare with shifting the last latents (see above)")
    ap.add_argument(
        "--after-bc",
        action="store_true",
        help="also probe the world model inside the agent after its BC phase (RUN/agent_bc) on the same "
        "transitions and noise, and report the teacher-forced error ratio after / before",
    )
    args = ap.parse_args()
    enable_compilation_cache()
    world, cfg, info = load_world_model(args.run)
    t0 = time.time()
    ds = open_dataset(args.data or info["data"], cfg)
    trans = eval_transitions(ds, cfg.dynamics.eval_context, args.n, args.seed)
    out = {}
    for K in args.K:
        r = probe(world, trans, K, jax.random.PRNGKey(args.seed), context_tau=cfg.dynamics.context_tau)
        out[K] = r
        print("\n".join(summary_lines(r)))
    if args.oracle_shift:
        o = oracle_shift(world, trans, jax.random.PRNGKey(args.seed), cfg.dynamics.context_tau)
        out["oracle_shift"] = o
        print(
            f"moves with a moved view ({o['n_moves']}), latent MSE: "
            + ", ".join(
                f"{k} {v['mean']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]" for k, v in o.items() if k != "n_moves"
            )
        )
    if args.after_bc:
        agent, _, _ = load_agent(args.run, "agent_bc")
        for K in args.K:
            r = probe(agent.world, trans, K, jax.random.PRNGKey(args.seed), context_tau=cfg.dynamics.context_tau)
            out[f"after_bc_K{K}"] = r
            before, after = out[K], r
            print(f"after the agent's BC phase (K={K}):")
            print("\n".join(summary_lines(r)))
            for key in ("teacher_forced_latent_mse_true", "latent_mse_generated"):
                b, a = before[key]["mean"], after[key]["mean"]
                print(f"{key}: before {b:.4f}, after BC {a:.4f}, ratio {a / b:.3f} (target <= 1.05)")
    print(f"({time.time() - t0:.0f}s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"run": args.run, "results": out}, indent=1, default=float))


if __name__ == "__main__":
    main()

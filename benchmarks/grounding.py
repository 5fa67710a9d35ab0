"""Action-grounding probe of a trained world model (see dreamer4/dynamics/grounding.py).

    python benchmarks/grounding.py --run runs/tiny [--K 4] [--n 2048] [--after-bc] [--json bench_out/grounding.json]

Prints the identification accuracy (movement and all actions, with 95% CIs and chance), the
paired PSNR gap true - other action, and the one-step prediction against copying the last frame.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

from dreamer4.dynamics.grounding import eval_transitions, probe, summary_lines
from dreamer4.runtime.jax_setup import enable_compilation_cache
from dreamer4.runtime.loading import load_agent, load_world_model
from dreamer4.runtime.stage import open_dataset


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", default=None, help="dataset (default: the one the dynamics was trained on)")
    ap.add_argument("--K", type=int, nargs="+", default=[4])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
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

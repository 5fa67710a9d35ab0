"""PPO behaviour policy: training speed and return against uniform random.

    python benchmarks/behavior.py [--config configs/tiny.yaml] [--set KEY=VALUE ...] [--out DIR]

Trains the preset's PPO from scratch into OUT (default a temporary directory), then prints env
steps/s (steady state: the updates after the first log interval, which hold the compilation) and
the final evaluation (trained policy vs uniform random on the same seeded worlds, fixed horizon),
and writes the table as JSON to OUT/behavior_benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from dreamer4.behavior.train import train_behavior
from dreamer4.config import load_config
from dreamer4.runtime.jax_setup import enable_compilation_cache
from dreamer4.runtime.logging import read_metrics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    enable_compilation_cache()
    os.environ.setdefault("WANDB_MODE", "disabled")
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or tempfile.mkdtemp(prefix="ppo-bench-"))
    t0 = time.time()
    r = train_behavior(cfg, out, log=lambda *a: None)
    wall = time.time() - t0
    train_lines = [m for m in read_metrics(out / "behavior") if "loss" in m]
    steady = [m["env_steps_per_s"] for m in train_lines[1:]] or [train_lines[-1]["env_steps_per_s"]]
    b = cfg.behavior
    table = {
        "config": args.config,
        "overrides": args.overrides,
        "env_steps": r["env_steps"],
        "num_envs": b.num_envs,
        "num_steps": b.num_steps,
        "wall_s_total_incl_compile": round(wall, 1),
        "env_steps_per_s_steady": round(sum(steady) / len(steady), 1),
        "eval_envs": r["eval_envs"],
        "eval_steps": r["eval_steps"],
        "policy_return": r["eval_policy_return"],
        "random_return": r["eval_random_return"],
        "policy_achievements": r["eval_policy_achievements"],
        "random_achievements": r["eval_random_achievements"],
        "final_entropy": train_lines[-1]["entropy"],
    }
    for k, v in table.items():
        print(f"{k:30} {v}")
    (out / "behavior_benchmark.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()

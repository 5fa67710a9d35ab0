"""`dreamer4 train-dynamics` and `dreamer4 dream`."""

from __future__ import annotations

from dreamer4.config import Config
from dreamer4.runtime.distributed import log0, require_single_process
from dreamer4.dynamics.evaluate import dream
from dreamer4.dynamics.train import train_dynamics


def run_train_dynamics(cfg: Config, data: str, run: str) -> dict:
    results = train_dynamics(cfg, data, run)
    if results:
        K = cfg.dynamics.sample_steps
        log0(f"dynamics: open-loop PSNR K={K} {results.get(f'eval_psnr_K{K}', float('nan')):.2f} dB, "
              f"action gap {results.get('eval_action_gap_db', float('nan')):.2f} dB")
    return results


def run_dream(run: str, seed: int = 0) -> dict:
    require_single_process("dream")
    metrics = dream(run, seed=seed)
    print(open(f"{run}/dream/table.md").read())
    print(f"written to {run}/dream/ (results.json, table.md, psnr_vs_horizon.png, real_vs_imagined_*.gif)")
    return metrics

"""`dreamer4 train-agent` and `dreamer4 evaluate`."""

from __future__ import annotations

from dreamer4.config import Config
from dreamer4.policy.evaluate import evaluate
from dreamer4.policy.train import train_agent
from dreamer4.runtime.distributed import require_single_process


def run_train_agent(cfg: Config, data: str, run: str, phase: str = "all") -> dict:
    return train_agent(cfg, data, run, phase)


def run_evaluate(run: str, episodes: int | None = None, seed: int = 0) -> dict:
    require_single_process("evaluate")
    results = evaluate(run, episodes=episodes, seed=seed)
    print(open(f"{run}/evaluate/table.md").read())
    print(f"written to {run}/evaluate/ (results.json, table.md, achievements.png, real_*.gif, imagined_*.gif)")
    return results

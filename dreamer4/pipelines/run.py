"""`dreamer4 run`: chain the stages into one run directory, skipping what is complete.

RUN_DIR/
  config.yaml     the resolved config
  dataset/        `dreamer4 collect` output
Later stages (tokenizer, dynamics, agent, evaluation) join this chain as they are built; each
is resumable, so running the same command again continues an interrupted run.
"""

from __future__ import annotations

from pathlib import Path

from dreamer4.config import Config, save_config
from dreamer4.data.collect import collect
from dreamer4.pipelines.dataset import print_info


def run_all(cfg: Config, run_dir: str) -> None:
    root = Path(run_dir)
    save_config(cfg, root)
    data = root / "dataset"
    print(f"== stage 1/1: collect -> {data}")
    collect(cfg, data)
    print_info(str(data))
    print(f"run complete: {root}")

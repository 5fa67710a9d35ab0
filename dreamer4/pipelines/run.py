"""`dreamer4 run`: chain the stages into one run directory, skipping what is complete.

RUN_DIR/
  config.yaml     the resolved config
  dataset/        `dreamer4 collect` output
  tokenizer/      `dreamer4 train-tokenizer` output
Later stages (dynamics, agent, evaluation) join this chain as they are built; each is
resumable, so running the same command again continues an interrupted run.
"""

from __future__ import annotations

from pathlib import Path

from dreamer4.config import Config, save_config
from dreamer4.data.collect import collect
from dreamer4.pipelines.dataset import print_info
from dreamer4.pipelines.tokenizer import run_train_tokenizer
from dreamer4.tokenizer.train import tokenizer_complete


def run_all(cfg: Config, run_dir: str) -> None:
    root = Path(run_dir)
    save_config(cfg, root)
    data = root / "dataset"
    print(f"== stage 1/2: collect -> {data}")
    collect(cfg, data)
    print_info(str(data))
    print(f"== stage 2/2: tokenizer -> {root / 'tokenizer'}")
    if tokenizer_complete(cfg, root):
        print("tokenizer: complete, skipped")
    else:
        run_train_tokenizer(cfg, str(data), str(root))
    print(f"run complete: {root}")

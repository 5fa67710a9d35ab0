"""`dreamer4 run`: chain the stages into one run directory, skipping what is complete.

RUN_DIR/
  config.yaml     the resolved config
  dataset/        `dreamer4 collect` output
  tokenizer/      `dreamer4 train-tokenizer` output
  dynamics/       `dreamer4 train-dynamics` output
  dream/          `dreamer4 dream` output (open-loop PSNR/SSIM per K, action gap, videos)
Later stages (agent, evaluation) join this chain as they are built; each is resumable, so
running the same command again continues an interrupted run.

In a multi-process job every process runs this chain: each collects its writer's share, all wait
until the dataset is complete, then train together; only process 0 prints and writes reports.
`dream` is a single-process evaluation and is skipped there (run it afterwards as one process).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from dreamer4.config import Config, save_config
from dreamer4.data.collect import collect
from dreamer4.pipelines.dataset import print_info
from dreamer4.dynamics.train import dynamics_complete
from dreamer4.pipelines.dynamics import run_dream, run_train_dynamics
from dreamer4.pipelines.tokenizer import run_train_tokenizer
from dreamer4.runtime.distributed import barrier, is_main_process, log0
from dreamer4.tokenizer.train import tokenizer_complete


def run_all(cfg: Config, run_dir: str) -> None:
    root = Path(run_dir)
    if is_main_process():
        save_config(cfg, root)
    data = root / "dataset"
    t0 = time.time()
    times = {}
    log0(f"== stage 1/4: collect -> {data}")
    collect(cfg, data)
    barrier("run-collect-done")  # every writer's shards are committed before anyone trains
    if is_main_process():
        print_info(str(data))
    times["collect"] = time.time() - t0
    log0(f"== stage 2/4: tokenizer -> {root / 'tokenizer'}")
    if tokenizer_complete(cfg, root):
        log0("tokenizer: complete, skipped")
    else:
        run_train_tokenizer(cfg, str(data), str(root))
    times["tokenizer"] = time.time() - t0 - sum(times.values())
    log0(f"== stage 3/4: dynamics -> {root / 'dynamics'}")
    if dynamics_complete(cfg, root):
        log0("dynamics: complete, skipped")
    else:
        run_train_dynamics(cfg, str(data), str(root))
    times["dynamics"] = time.time() - t0 - sum(times.values())
    log0(f"== stage 4/4: dream -> {root / 'dream'}")
    if jax.process_count() == 1:
        run_dream(str(root))
    else:
        log0(f"dream: skipped in a {jax.process_count()}-process job; run `dreamer4 dream --run {root}` "
             f"as one process")
    times["dream"] = time.time() - t0 - sum(times.values())
    if is_main_process():
        (root / "stage_times.json").write_text(json.dumps(times, indent=1))
    log0("wall time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    log0(f"run complete: {root}")

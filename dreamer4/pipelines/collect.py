"""`dreamer4 collect`: fill a dataset directory with Craftax episodes."""

from __future__ import annotations

import dreamer4.behavior.policy  # noqa: F401  (registers the "ppo:CHECKPOINT" policy kind)
from dreamer4.config import Config
from dreamer4.data.collect import collect
from dreamer4.runtime.distributed import log0


def run_collect(cfg: Config, out: str, writer_id: int | None = None, num_writers: int | None = None) -> dict:
    summary = collect(cfg, out, writer_id=writer_id, num_writers=num_writers)
    log0(f"dataset: {out} (inspect with `dreamer4 dataset info {out}`)")
    return summary

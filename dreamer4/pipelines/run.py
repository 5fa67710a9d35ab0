"""`dreamer4 run`: chain the stages into one run directory, skipping what is complete.

RUN_DIR/
  config.yaml     the resolved config
  dataset/        `dreamer4 collect` output
  tokenizer/      `dreamer4 train-tokenizer` output
  dynamics/       `dreamer4 train-dynamics` output
  dream/          `dreamer4 dream` output (open-loop PSNR/SSIM per K, action gap, videos)
  agent_bc/       `dreamer4 train-agent` phase bc (behaviour cloning + reward model)
  agent/          `dreamer4 train-agent` phase imagine (RL in imagination)
  evaluate/       `dreamer4 evaluate` output (real game and imagination)
  report.html     one page: metrics, reconstructions, videos, achievement chart
Each stage is resumable, so running the same command again continues an interrupted run; a
stage that is complete by the stage contract (runtime/stage.py: its final checkpoint, or its
results file, exists; also when it was run by hand) is skipped.

After a SIGTERM, SIGUSR1 or SIGINT the running stage stops with a checkpoint, or (between stages)
the next stage does not start; exit code 75, and the same command continues (runtime/preempt.py).

In a multi-process job every process runs this chain: each collects its writer's share, all wait
until the dataset is complete, then train together; only process 0 prints and writes reports.
`dream` and `evaluate` are single-process evaluations and are skipped there (run them afterwards
as one process).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from dreamer4.config import Config, save_config
from dreamer4.data.collect import collect
from dreamer4.pipelines.dataset import print_info
from dreamer4.pipelines.report import write_report
from dreamer4.pipelines.stages import run_dream, run_evaluate, run_train_agent, run_train_dynamics, run_train_tokenizer
from dreamer4.runtime.distributed import barrier, is_main_process, log0
from dreamer4.runtime.preempt import Preempted, agreed_stop
from dreamer4.runtime.stage import DATASET, STAGE_TIMES, StageDir

N_STAGES = 6


def run_all(cfg: Config, run_dir: str) -> dict:
    """Every stage into RUN_DIR, skipping the complete ones; returns each stage's results."""
    root = Path(run_dir)
    if is_main_process():
        save_config(cfg, root)
    data = root / DATASET
    times_path = root / STAGE_TIMES
    # Times of stages done by an earlier (interrupted) invocation are kept.
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    single = jax.process_count() == 1
    results: dict = {}

    def stage(i: int, name: str, out: Path, done: bool, fn, one_process: bool = False) -> None:
        log0(f"== stage {i}/{N_STAGES}: {name} -> {out}")
        if done:
            log0(f"{name}: complete, skipped")
            return
        if one_process and not single:
            log0(
                f"{name}: skipped in a {jax.process_count()}-process job; run `dreamer4 {name} --run {root}` "
                f"as one process"
            )
            return
        signal_name = agreed_stop()  # a signal that arrived between stages (or during dream/evaluate)
        if signal_name is not None:
            raise Preempted("run", signal_name, saved=f"the stages before {name} are complete in {root}")
        t0 = time.time()
        results[name] = fn()
        times[name] = time.time() - t0
        if is_main_process():
            times_path.write_text(json.dumps(times, indent=1))

    def do_collect():
        summary = collect(cfg, data)
        barrier("run-collect-done")  # every writer's shards are committed before anyone trains
        if is_main_process():
            print_info(str(data))
        return summary

    tok, dyn, dream_, bc, agent, ev = (
        StageDir(root, n) for n in ("tokenizer", "dynamics", "dream", "agent_bc", "agent", "evaluate")
    )
    # collect itself skips committed shards and returns at once when the dataset is complete
    stage(1, "collect", data, False, do_collect)
    stage(2, "tokenizer", tok.dir, tok.is_complete(cfg), lambda: run_train_tokenizer(cfg, str(data), str(root)))
    stage(3, "dynamics", dyn.dir, dyn.is_complete(cfg), lambda: run_train_dynamics(cfg, str(data), str(root)))
    stage(4, "dream", dream_.dir, dream_.is_complete(cfg), lambda: run_dream(str(root)), one_process=True)
    stage(
        5,
        "agent",
        agent.dir,
        bc.is_complete(cfg) and agent.is_complete(cfg),
        lambda: run_train_agent(cfg, str(data), str(root), "all"),
    )
    stage(6, "evaluate", ev.dir, ev.is_complete(cfg), lambda: run_evaluate(str(root)), one_process=True)
    if not is_main_process():
        return results
    report = write_report(root)
    log0("wall time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    log0(f"run complete: {root} (report: {report})")
    return results

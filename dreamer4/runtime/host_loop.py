"""The host side of every training loop: pending metrics, finite check, log and checkpoint cadence.

Both the dataset-driven stage trainer (runtime/train_loop.py) and online PPO (behavior/train.py)
drive one compiled step per iteration and hand its (device) metrics to a `HostLoop`:

    loop = HostLoop(name, total=..., initial=step, unit="step", log_every=..., ckpt_every=...,
                    ckpt=..., logger=..., save_state=..., summarize=..., progress=..., on_nonfinite=...)
    while step < total:
        ...; step += 1
        loop.record(step, metrics)     # flush every log_every, checkpoint every ckpt_every and at total;
                                       # after a SIGTERM/SIGUSR1/SIGINT: checkpoint and raise Preempted
    loop.finish(step)                  # flush, final checkpoint if not written yet, wait for it

Metrics stay on the device until a flush, which fetches them all, stops on the first non-finite
value (`on_nonfinite` raises; nothing is saved after it, so a bad state never overwrites a good
checkpoint: every checkpoint is written right after a flush that passed), reduces them with
`summarize` and logs the result (metrics.jsonl, wandb, the progress bar). Every process runs the
same loop on replicated metrics, so all stop at the same step.

Preemption (runtime/preempt.py): after every step the loop asks `agreed_stop()` (in a
multi-process job all processes agree on it); once a SIGTERM, SIGUSR1 or SIGINT has arrived, the
loop flushes, checkpoints that step (unless it just did), waits for the save and raises
`Preempted` (exit code 75; the same command resumes from that checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from dreamer4.runtime.checkpoint import Checkpointer
from dreamer4.runtime.logging import MetricLogger
from dreamer4.runtime.preempt import Preempted, agreed_stop
from dreamer4.runtime.progress import Progress


def mean_metrics(host: list[dict]) -> dict:
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


class HostLoop:
    def __init__(
        self,
        name: str,
        *,
        total: int,
        initial: int,
        unit: str,
        log_every: int,
        ckpt_every: int,
        ckpt: Checkpointer,
        logger: MetricLogger,
        save_state: Callable[[int], tuple[Any, dict]],
        summarize: Callable[[list[dict], int, float], dict],
        progress: Callable[[dict], dict],
        on_nonfinite: Callable[[int, dict], None],
    ):
        """save_state(step) -> (state pytree, JSON meta) to checkpoint; summarize(host metrics, steps
        since the last flush, seconds since it) -> the logged means; progress(means) -> progress-bar
        fields; on_nonfinite(step, metrics) raises (a FloatingPointError names what was kept)."""
        self.name, self.total, self.log_every, self.ckpt_every = name, total, log_every, ckpt_every
        self.ckpt, self.logger = ckpt, logger
        self.save_state, self.summarize, self.progress, self.on_nonfinite = (
            save_state,
            summarize,
            progress,
            on_nonfinite,
        )
        self.bar = Progress(total=total, initial=initial, desc=name, unit=unit)
        self.pending: list[tuple[int, dict]] = []
        self.t_last, self.since = time.time(), 0
        self.last: dict = {}  # the last logged means

    def record(self, step: int, metrics: dict) -> None:
        """Step `step` is done: keep its metrics; flush and checkpoint on their cadence."""
        self.since += 1
        self.pending.append((step, metrics))
        self.bar.update(1)
        if step % self.log_every == 0:
            self.flush()
        if step % self.ckpt_every == 0 or step == self.total:
            self.save(step)
        signal_name = agreed_stop()
        if signal_name is not None:
            self.stop(step, signal_name)

    def stop(self, step: int, signal_name: str) -> None:
        """A signal arrived: checkpoint `step` (data position included) and raise `Preempted`."""
        self.flush()
        if self.ckpt.latest_step() != step:
            self.save(step)
        self.ckpt.wait()
        raise Preempted(self.name, signal_name, step, f"checkpoint {step} saved in {self.ckpt.directory}")

    def flush(self) -> None:
        """Fetch pending metrics, stop on a non-finite value, log their summary."""
        if not self.pending:
            return
        host = jax.device_get([m for _, m in self.pending])
        for (s, _), m in zip(self.pending, host):
            if not all(np.isfinite(v) for v in m.values()):
                self.on_nonfinite(s, m)
                raise FloatingPointError(f"[{self.name}] non-finite metrics at step {s}")
        now = time.time()
        means = self.summarize(host, self.since, max(now - self.t_last, 1e-9))
        self.t_last, self.since = now, 0
        self.logger.log(self.pending[-1][0], means)
        self.bar.update(0, **self.progress(means))
        self.last = means
        self.pending = []

    def save(self, step: int) -> None:
        """Checkpoint `step` right after a flush that found every metric finite."""
        self.flush()
        state, meta = self.save_state(step)
        self.ckpt.save(step, state, meta)

    def finish(self, step: int) -> None:
        self.flush()
        if self.ckpt.latest_step() != step:
            self.save(step)
        self.ckpt.wait()

    def close(self) -> None:
        self.bar.close()
        self.ckpt.close()
        self.logger.close()

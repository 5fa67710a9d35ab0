"""Preemption, time limits and Ctrl-C: stop at the next step boundary, with a checkpoint, and exit 75.

Clusters preempt jobs and end them at their time limit. Slurm sends SIGTERM (scancel, preemption;
SIGKILL follows after the cluster's KillWait, 30 s by default) or, asked by the sbatch scripts,
SIGUSR1 some minutes before the time limit (`#SBATCH --signal=B:USR1@300`, forwarded to the tasks
by slurm/launch.sh). On a laptop it is Ctrl-C (SIGINT). Every command that trains or collects
(`collect`, `train-*`, `run`) handles all three the same way:

1. the handler (`handling()`, installed by cli.main) only records the first signal and prints
   one line; the work goes on to the next step boundary;
2. at every step boundary the loop asks `agreed_stop()`. With one process that is the recorded
   signal. In a multi-process job every process asks at the same step (the step count is shared)
   and the answer must be the same everywhere, although the signal may have reached only some of
   them, or reached them while they were at different steps: each process that received one
   writes it under a key of this check in the coordination service's key-value store, all meet at
   one barrier, then every process reads the keys of this check. All see the same keys, so all
   stop at the same step (one key-value round trip and one barrier per step, about 1 ms over
   loopback; no device synchronisation, so the device queue stays full);
3. the loop saves a checkpoint of that step (state and data-iterator position, as the periodic
   checkpoints do; collection commits the finished episodes as a shard) and raises `Preempted`,
   which the CLI turns into exit code 75 (EX_TEMPFAIL: "stopped early with everything saved; run
   the same command again to continue").

A second Ctrl-C stops at once (KeyboardInterrupt); repeated SIGTERM/SIGUSR1 are ignored.

Why JAX's own preemption support is switched off (runtime/distributed.py): `jax.distributed.initialize`
starts a preemption sync manager whose notifier installs a C-level SIGTERM handler (std::signal)
that only records the notice ("SIGTERM caught at ...") for `multihost_utils.reached_preemption_sync_point`;
a program that never calls it simply trains on, and Slurm's SIGKILL follows. It hears SIGTERM
only (not SIGUSR1 or SIGINT), and its step-counter protocol cannot serve collection, where every
writer runs at its own pace. So dreamer4 turns it off (`jax_enable_preemption_service`) before
initialising and installs the handlers above after it; orbax treats the disabled service as "no
preemption".

Exit codes of every command (cli.main): 0 done; 1 an unexpected error (a traceback);
2 refused, with one sentence (config, dataset, checkpoint, a full disk, or another job holds the
stage's lock); 3 a non-finite loss (training stopped, the last good checkpoint kept);
75 stopped by a signal with a checkpoint saved: run the same command again to continue.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

import jax

from dreamer4.runtime.distributed import coordination_client

EXIT_PREEMPTED = 75  # EX_TEMPFAIL
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_BARRIER = "dreamer4/preempt-check"  # one barrier id, reused by every check (no state grows)
_BARRIER_TIMEOUT_MS = 4 * 3600 * 1000

_received: str | None = None  # name of the first signal received, e.g. "SIGTERM"
_checks = 0  # agreed_stop() calls so far (the same sequence on every process)


class Preempted(Exception):
    """A signal stopped the work at a step boundary after everything was saved (exit code 75)."""

    def __init__(self, what: str, signal_name: str, step: int | None = None, saved: str = ""):
        self.what, self.signal_name, self.step, self.saved = what, signal_name, step, saved
        at = f" at step {step}" if step is not None else ""
        kept = f"; {saved}" if saved else ""
        super().__init__(
            f"[{what}] stopped by {signal_name}{at}{kept}; run the same command again to continue "
            f"(exit code {EXIT_PREEMPTED})"
        )


def requested() -> str | None:
    """The name of the first signal this process received (None: none); not agreed across processes."""
    return _received


def reset() -> None:
    """Forget a received signal (each command starts afresh; tests)."""
    global _received
    _received = None


def _say(text: str) -> None:
    # os.write, not print: the handler may interrupt a print on the main thread (reentrant call)
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


def _handler(signum: int, frame) -> None:
    global _received
    name = signal.Signals(signum).name
    if _received is not None:
        if signum == signal.SIGINT:  # a second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        return
    _received = name
    hint = "; press Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
    _say(f"[dreamer4] {name} received: stopping at the next step boundary with a checkpoint{hint}")


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Install the handlers for SIGTERM, SIGINT and SIGUSR1 while the block runs (main thread only;
    elsewhere nothing is installed and the signals keep their previous handlers)."""
    reset()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        reset()


def agreed_stop() -> str | None:
    """Whether to stop at this step boundary: the signal's name, the same on every process, or None.

    Collective in a multi-process job: every process must call it at the same points (the same
    step boundaries, in the same order), as it does with the train step itself."""
    global _checks
    if jax.process_count() == 1:
        return _received
    client = coordination_client()
    if client is None:
        return _received
    _checks += 1
    prefix = f"dreamer4/preempt/{_checks}/"
    if _received is not None:
        client.key_value_set(prefix + str(jax.process_index()), _received)
    client.wait_at_barrier(_BARRIER, _BARRIER_TIMEOUT_MS)
    found = sorted(client.key_value_dir_get(prefix))
    return found[0][1] if found else None

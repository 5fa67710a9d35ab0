"""Checkpoints with orbax: train state, step, data-iterator state and config, kept last N.

Layout: STAGE_DIR/checkpoints/<step>/{state, meta}. `state` is a pytree of arrays (model and
optimizer), saved asynchronously; `meta` is JSON (step, data-iterator state, the resolved config,
anything else a stage needs). Restoring takes an abstract target whose leaves carry the shardings
of the *current* mesh, so a checkpoint saved on 4 devices restores onto 2 (or onto 1 process).

Damaged checkpoints: `restore_latest_good` tries the newest step, then older ones. A step that
fails while an older one restores into the same target is damaged (a file missing or truncated):
it is moved (never deleted) to STAGE_DIR/checkpoints-damaged/<step>-<time>/, the run continues
from the newest good step, and the log says which step was damaged and why. When no step restores
(e.g. every checkpoint is of another model shape) nothing is moved and `CheckpointError` says so
in one sentence. Disk full while saving: `DiskFullError` (runtime/faults.py), partial step
directories removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from dreamer4.runtime.distributed import barrier
from dreamer4.runtime.faults import CheckpointError, DiskFullError, disk_full_error, is_disk_full, remove_quietly

__all__ = ["Checkpointer", "CheckpointError", "DiskFullError", "abstract_like"]


class _QuietDiskFull(logging.Filter):
    """orbax logs a full disk from each of its writer threads (many lines each); we report it once
    as a `DiskFullError`, so its own log records of that error are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not (is_disk_full(exc) or "No space left on device" in record.getMessage())


logging.getLogger("absl").addFilter(_QuietDiskFull())


def _why(e: BaseException) -> str:
    """A one-line reason for a failed restore (orbax / TensorStore errors run to many lines)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0].split(" [tensorstore_spec")[0] if lines else ""
    if '"' in text and ": " in text:  # TensorStore: keep the innermost reason and the file it names
        files = re.findall(r'local file "([^"]+)"', text)
        text = text.rsplit(": ", 1)[-1] + (f" (file {files[-1]})" if files else "")
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._state_bytes: int | None = None
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _disk_full(self, e: BaseException) -> DiskFullError:
        """Remove what a failed save left (orbax temp dirs) and describe the full disk."""
        if jax.process_index() == 0:
            remove_quietly(p for p in self.directory.glob("*") if "tmp" in p.name)
        return disk_full_error(self.directory, self._state_bytes, "a checkpoint", bound="up to")

    def save(self, step: int, state, meta: dict) -> None:
        # what the next checkpoint needs (before orbax's compression), for a disk-full message
        self._state_bytes = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))
        try:
            self.manager.save(
                step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
            )
        except Exception as e:
            if is_disk_full(e):
                raise self._disk_full(e) from None
            raise

    def restore(self, abstract_state, step: int | None = None):
        """(state, meta) of `step` (default latest), laid out as `abstract_state` says."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        )
        return out["state"], out["meta"]

    def restore_latest_good(self, abstract_state, log=print):
        """(step, state, meta) of the newest checkpoint that restores, or None when there is none.

        Newer steps that fail while an older one restores are moved aside (see the module doc)."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        failed: list[tuple[int, str]] = []
        for step in steps:
            try:
                state, meta = self.restore(abstract_state, step)
            except Exception as e:  # orbax reports damage as many different exception types
                failed.append((step, _why(e)))
                continue
            if failed:
                self._move_aside(failed, log)
                log(f"resuming from checkpoint step {step}, the newest one that restores")
            return step, state, meta
        if failed:
            step, why = failed[0]
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored (newest: step {step}, {why}); if they are of "
                f"another model config use a new run directory, if damaged move {self.directory} aside to "
                f"start the stage afresh"
            )
        return None

    def _move_aside(self, failed: list[tuple[int, str]], log) -> None:
        aside = self.directory.parent / f"{self.directory.name}-damaged"
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            for step, why in failed:
                dest = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                os.replace(self.directory / str(step), dest)
                log(f"checkpoint step {step} in {self.directory} is damaged ({why}); moved it to {dest}")
        if jax.process_count() > 1:
            barrier(f"checkpoint-move-aside-{self.directory.name}")
        self.manager.reload()

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # an async save's failure surfaces here
            if is_disk_full(e):
                raise self._disk_full(e) from None
            raise

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def abstract_like(state, shardings):
    """ShapeDtypeStructs of `state` placed with `shardings` (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def checkpoint_steps(directory: str | Path) -> list[int]:
    """The committed checkpoint steps in `directory`, ascending (orbax renames a step directory to
    its number only once it is complete); [] when there is none."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def read_meta(directory: str | Path, step: int) -> dict:
    """The JSON meta of checkpoint `step`, read directly (no checkpoint manager, nothing created)."""
    return json.loads((Path(directory) / str(step) / "meta" / "metadata").read_text())

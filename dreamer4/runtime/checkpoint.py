"""Checkpoints with orbax: train state, step, data-iterator state and config, kept last N.

Layout: STAGE_DIR/checkpoints/<step>/{state, meta}. `state` is a pytree of arrays (model and
optimizer), saved asynchronously; `meta` is JSON (step, data-iterator state, the resolved config,
anything else a stage needs). Restoring takes an abstract target whose leaves carry the shardings
of the *current* mesh, so a checkpoint saved on 4 devices restores onto 2 (or onto 1 process).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        )

    def restore(self, abstract_state, step: int | None = None):
        """(state, meta) of `step` (default latest), laid out as `abstract_state` says."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        )
        return out["state"], out["meta"]

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
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

"""The grain loader: (B, T) windows of committed episodes, sharded by JAX process.

A record is one window of `seq_len` consecutive rows of one episode (windows never cross an
episode boundary). Episodes shorter than `seq_len` are skipped, not padded: the count of skipped
episodes is reported by `WindowSource.describe()`. Batches are dicts of numpy arrays:

    frames_BTHWC   uint8    the stored frames
    actions_BT     int32    action_t (led into frame_t); -1 where not delivered
    action_mask_BT bool     True where actions_BT is a real, labeled action
    rewards_BT     float32  reward_t (received on arriving at frame_t)
    reward_mask_BT bool     True where rewards_BT was recorded (False for imported videos)
    is_first_BT, is_last_BT, is_terminal_BT   bool

Unlabeled train episodes never deliver actions: their action array is not even read, the record
carries -1 and mask False. Eval episodes keep their actions (they are never trained on; evaluation
of action conditioning needs them). The first row of an episode has no action (mask False).

The iterator's state (`it.get_state()` / `it.set_state(s)`) is a few bytes saved in training
checkpoints, so a resumed run continues the same stream.
"""

from __future__ import annotations

from pathlib import Path

import grain.python as grain
import jax
import numpy as np

from dreamer4.config import Config
from dreamer4.data.store import Dataset, DatasetError, Episode

_ROW_FIELDS = ("frame", "reward", "is_first", "is_last", "is_terminal")


class WindowSource(grain.RandomAccessDataSource):
    """Random access to every (episode, start) window of one split."""

    def __init__(self, root: str | Path, split: str, seq_len: int, stride: int,
                 env_name: str | None = None, labeled_only: bool = False):
        self.ds = Dataset.open(root, env_name=env_name)
        self.split, self.seq_len = split, seq_len
        eps = self.ds.split(split)
        if not eps:
            raise DatasetError(f"dataset {root} has no committed '{split}' episodes")
        if labeled_only:
            eps = [e for e in eps if e.labeled]
            if not eps:
                raise DatasetError(f"dataset {root} has no labeled '{split}' episodes "
                                   f"(collect.labeled_fraction was {self.ds.manifest['labeled_fraction']})")
        self.episodes: list[Episode] = eps
        self.skipped = [e for e in eps if e.length < seq_len]
        windows = [(i, s) for i, e in enumerate(eps) for s in range(0, e.length - seq_len + 1, stride)]
        if not windows:
            raise DatasetError(
                f"dataset {root}: no '{split}' episode is at least loader.seq_len={seq_len} steps long "
                f"(longest: {max(e.length for e in eps)})")
        self.windows = np.asarray(windows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        ei, start = self.windows[int(index)]
        ep = self.episodes[int(ei)]
        T = self.seq_len
        rows = self.ds.read(ep, int(start), int(start) + T, _ROW_FIELDS)
        if ep.labeled:
            actions = self.ds.read(ep, int(start), int(start) + T, ("action",))["action"]
            mask = ~rows["is_first"]
            actions = np.where(mask, actions, -1).astype(np.int32)
        else:
            actions = np.full((T,), -1, np.int32)
            mask = np.zeros((T,), bool)
        return {
            "frames": rows["frame"], "actions": actions, "action_mask": mask,
            "rewards": rows["reward"], "reward_mask": np.full((T,), ep.has_rewards), "is_first": rows["is_first"], "is_last": rows["is_last"],
            "is_terminal": rows["is_terminal"],
        }

    def __repr__(self) -> str:
        # grain checks repr(source) when restoring iterator state: it must name the data, not the object.
        shards = sorted({e.shard for e in self.episodes})
        return (f"WindowSource(root={str(self.ds.root)!r}, split={self.split!r}, seq_len={self.seq_len}, "
                f"windows={len(self)}, shards={len(shards)}, last_shard={shards[-1]!r})")

    def describe(self) -> str:
        n_lab = sum(e.labeled for e in self.episodes)
        return (f"{self.split}: {len(self.episodes)} episodes ({n_lab} labeled), {len(self)} windows "
                f"of {self.seq_len} steps; {len(self.skipped)} episodes shorter than that skipped")


def make_loader(root: str | Path, cfg: Config, split: str = "train", *, seed: int | None = None,
                num_epochs: int | None = None, labeled_only: bool = False,
                shard_index: int | None = None, shard_count: int | None = None,
                batch_size: int | None = None, seq_len: int | None = None):
    """A grain DataLoader of per-process batches; iterate it, save `iter.get_state()`.

    The global batch `loader.batch_size` is split evenly over JAX processes; each process reads
    a disjoint share of the windows. `batch_size` / `seq_len` default to the loader config; a
    training stage passes its own.
    """
    lc = cfg.loader
    batch_size = lc.batch_size if batch_size is None else batch_size
    seq_len = lc.seq_len if seq_len is None else seq_len
    source = WindowSource(root, split, seq_len, min(lc.window_stride, seq_len), env_name=cfg.env.name,
                          labeled_only=labeled_only)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if batch_size % shard_count:
        raise ValueError(f"batch size {batch_size} (config loader.batch_size or the stage's "
                         f"train.batch_size) must be divisible by the number of JAX processes ({shard_count})")
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                                         drop_remainder=True),
        shuffle=lc.shuffle,
        num_epochs=num_epochs,
        seed=cfg.seed if seed is None else seed,
    )
    if lc.worker_count > 0:
        # grain's worker processes read absl flags; a CLI that never parsed absl flags must say so.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[grain.Batch(batch_size // shard_count, drop_remainder=True)],
        worker_count=lc.worker_count,
        worker_buffer_size=lc.worker_buffer_size,
    )

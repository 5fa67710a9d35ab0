"""The grain loader: (B, T) windows of committed episodes, sharded by JAX process.

A record is one window of `seq_len` consecutive rows of one episode (windows never cross an
episode boundary). Episodes shorter than `seq_len` are skipped, not padded: the count of skipped
episodes is reported by `WindowSource.describe()`. Batches are dicts of numpy arrays:

    frames_BTHWC   uint8    the stored frames (latents_BTLN instead, the frozen tokenizer's latents
                            of the window, where the source reads a latent cache: data/latents.py)
    actions_BT     int32    action_t (led into frame_t); -1 where not delivered
    action_mask_BT bool     True where actions_BT is a real, labeled action
    rewards_BT     float32  reward_t (received on arriving at frame_t)
    reward_mask_BT bool     True where rewards_BT was recorded (False for imported videos)
    is_first_BT, is_last_BT, is_terminal_BT   bool

Unlabeled train episodes never deliver actions: their action array is not even read, the record
carries -1 and mask False. Eval episodes keep their actions (they are never trained on; evaluation
of action conditioning needs them). The first row of an episode has no action (mask False).

One global stream for any number of processes: the window order (a seeded shuffle per epoch) and
its cut into global batches of `batch_size` are the same everywhere; process p of P reads only rows
[p*b, (p+1)*b) of each global batch (b = batch_size / P), which are exactly the rows its devices
hold in the ("data", "fsdp") mesh. So a 2-process run sees the same global batches, in the same
order, as a 1-process run, and the iterator's state (`it.get_state()` / `it.set_state(s)`, a few
bytes of JSON saved in training checkpoints: the index of the next global batch) means the same
position whatever the process count that saved it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import signal
from pathlib import Path

import grain.python as grain
import jax
import numpy as np

from dreamer4.config import Config, ConfigError
from dreamer4.data.latents import LatentCache
from dreamer4.data.store import Dataset, DatasetError, Episode

_ROW_FIELDS = ("frame", "reward", "is_first", "is_last", "is_terminal")


class WindowSource(grain.RandomAccessDataSource):
    """Random access to every (episode, start) window of one split."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        seq_len: int,
        stride: int,
        env_name: str | None = None,
        labeled_only: bool = False,
        seq_len_key: str = "loader.seq_len",
        labeled_repeat: int = 1,
        latents: str | Path | None = None,
    ):
        self.ds = Dataset.open(root, env_name=env_name)
        self.split, self.seq_len, self.stride, self.labeled_repeat = split, seq_len, stride, labeled_repeat
        eps = self.ds.split(split)
        if not eps:
            raise DatasetError(f"dataset {root} has no committed '{split}' episodes")
        if labeled_only:
            eps = [e for e in eps if e.labeled]
            if not eps:
                raise DatasetError(
                    f"dataset {root} has no labeled '{split}' episodes "
                    f"(collect.labeled_fraction was {self.ds.manifest['labeled_fraction']})"
                )
        self.episodes: list[Episode] = eps
        self.skipped = [e for e in eps if e.length < seq_len]
        windows = [(i, s) for i, e in enumerate(eps) for s in range(0, e.length - seq_len + 1, stride)]
        if not windows:
            raise DatasetError(
                f"dataset {root}: no '{split}' episode is at least {seq_len_key}={seq_len} steps long "
                f"(longest: {max(e.length for e in eps)}); lower config key '{seq_len_key}'"
            )
        # Labeled episodes' windows listed labeled_repeat times: the epoch oversamples them.
        # base_index: each record's window in the list without repeats (the latent cache's rows).
        self.base_windows = np.asarray(windows, dtype=np.int64)
        repeats = [i for i, w in enumerate(windows) if eps[w[0]].labeled] * (labeled_repeat - 1)
        self.base_index = np.concatenate([np.arange(len(windows)), np.asarray(repeats, np.int64)]).astype(np.int64)
        self.windows = self.base_windows[self.base_index]
        self._identity = None
        # latents: a LatentCache of these windows (data/latents.py); records then carry "latents"
        # (the frozen tokenizer's, computed once) instead of "frames".
        self.latents = None
        if latents is not None:
            self.latents = self.with_latents(latents).latents

    def with_latents(self, path: str | Path, **expect) -> WindowSource:
        """This source reading the latent cache at `path` instead of frames; DatasetError unless
        the cache is complete and was built for these windows (and for `expect`, e.g. tokenizer=)."""
        cache = LatentCache(path)
        cache.check_readable({**self.identity(), **expect})
        out = copy.copy(self)
        out.latents = cache
        return out

    def identity(self) -> dict:
        """What a latent cache of these windows must have been built from (less the tokenizer)."""
        if self._identity is None:
            h = hashlib.sha256()
            for e in self.episodes:
                h.update(f"{e.id}:{e.shard}:{e.start}:{e.length};".encode())
            h.update(self.base_windows.tobytes())
            w = h.hexdigest()
            self._identity = {"split": self.split, "seq_len": self.seq_len, "stride": self.stride, "windows": w}
        return dict(self._identity)

    def read_frames(self, base: int) -> np.ndarray:
        """frames_THWC of base window `base` (the order of `base_windows`)."""
        ei, start = self.base_windows[base]
        return self.ds.read(self.episodes[int(ei)], int(start), int(start) + self.seq_len, ("frame",))["frame"]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if self.latents is not None:
            return {"latents": self.latents.read(int(self.base_index[int(index)])), **self._record(index, self.ds.read)}
        return self._record(index, self.ds.read)

    def read_batch(self, indices, concurrent_frames: bool = True) -> dict[str, np.ndarray]:
        """The records of these indices stacked (as stacking `self[i]`), their large reads started
        together so that TensorStore runs them concurrently: the latents of the whole batch in one
        read, and (`concurrent_frames`) every window's frames before waiting for any. In loader
        worker processes frames are read one window at a time: there the concurrent reads cut two
        workers' rate on a 2-core VM to 0.64x, while one process read 2.1x as fast."""
        indices = [int(i) for i in indices]
        if self.latents is not None:
            latents = self.latents.read_many(self.base_index[indices])
            records = [self._record(i, self.ds.read) for i in indices]
            return {"latents": latents, **{k: np.stack([r[k] for r in records]) for k in records[0]}}
        if not concurrent_frames:
            records = [self._record(i, self.ds.read) for i in indices]
        else:
            records = [self._record(i, self.ds.start_read) for i in indices]
            for r in records:
                r["frames"] = r["frames"]()
        return {k: np.stack([r[k] for r in records]) for k in records[0]}

    def _record(self, index: int, read) -> dict:
        """Window `index`'s record less its latents (the callers read those), rows read with `read`
        (`Dataset.read`, or `Dataset.start_read`: then "frames" is a function to call)."""
        ei, start = self.windows[int(index)]
        ep = self.episodes[int(ei)]
        T = self.seq_len
        fields = _ROW_FIELDS[1:] if self.latents is not None else _ROW_FIELDS
        rows = read(ep, int(start), int(start) + T, fields)
        if ep.labeled:
            actions = self.ds.read(ep, int(start), int(start) + T, ("action",))["action"]
            mask = ~rows["is_first"]
            actions = np.where(mask, actions, -1).astype(np.int32)
        else:
            actions = np.full((T,), -1, np.int32)
            mask = np.zeros((T,), bool)
        return {
            **({"frames": rows["frame"]} if self.latents is None else {}),
            "actions": actions,
            "action_mask": mask,
            "rewards": rows["reward"],
            "reward_mask": np.full((T,), ep.has_rewards),
            "is_first": rows["is_first"],
            "is_last": rows["is_last"],
            "is_terminal": rows["is_terminal"],
        }

    def __repr__(self) -> str:
        # grain checks repr(source) when restoring iterator state: it must name the data, not the object.
        shards = sorted({e.shard for e in self.episodes})
        return (
            f"WindowSource(root={str(self.ds.root)!r}, split={self.split!r}, seq_len={self.seq_len}, "
            f"windows={len(self)}, shards={len(shards)}, last_shard={shards[-1]!r})"
        )

    def describe(self) -> str:
        n_lab = sum(e.labeled for e in self.episodes)
        return (
            f"{self.split}: {len(self.episodes)} episodes ({n_lab} labeled), {len(self)} windows "
            f"of {self.seq_len} steps"
            + (f" (labeled repeated x{self.labeled_repeat})" if self.labeled_repeat > 1 else "")
            + f"; {len(self.skipped)} episodes shorter than that skipped"
        )


class _ReadRows:
    """Global batch of window indices -> this process's rows of it, read and stacked."""

    def __init__(self, source: WindowSource, lo: int, hi: int, concurrent_frames: bool):
        self.source, self.lo, self.hi, self.concurrent_frames = source, lo, hi, concurrent_frames

    def __call__(self, index_B: np.ndarray) -> dict[str, np.ndarray]:
        return self.source.read_batch(index_B[self.lo : self.hi], self.concurrent_frames)


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
    """In a grain worker process: leave SIGTERM/SIGINT/SIGUSR1 to the trainer. Slurm signals every
    process of a step and Ctrl-C the whole process group; the trainer stops at a step boundary and
    shuts its workers down itself (runtime/preempt.py), so a worker must not die first."""
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


class WindowLoader:
    """Iterable of process-local batches; `iter()` gives a `LoaderIterator` (get_state/set_state)."""

    def __init__(
        self,
        source: WindowSource,
        batch_size: int,
        shard_index: int,
        shard_count: int,
        seed: int,
        shuffle: bool,
        num_epochs: int | None,
        worker_count: int,
        buffer_size: int,
        read_threads: int,
    ):
        self.source, self.batch_size = source, batch_size
        self.worker_count, self.read_threads = worker_count, read_threads
        self.shard_index, self.shard_count, self.seed = shard_index, shard_count, seed
        local = batch_size // shard_count
        ds = grain.MapDataset.range(len(source))
        if shuffle:
            ds = ds.shuffle(seed=seed)  # a new permutation every epoch
        ds = ds.repeat(num_epochs).batch(batch_size, drop_remainder=True)
        ds = ds.map(
            _ReadRows(source, shard_index * local, (shard_index + 1) * local, concurrent_frames=worker_count == 0)
        )
        if worker_count > 0:
            self._dataset = ds.to_iter_dataset().mp_prefetch(
                grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=buffer_size),
                worker_init_fn=_ignore_stop_signals,
            )
        else:  # reader threads overlap reading with training (grain keeps the batches in order)
            self._dataset = ds.to_iter_dataset(
                grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=buffer_size)
            )
        # What a saved position refers to; the process count is deliberately not part of it.
        self.stream_id = {
            "source": repr(source),
            "batch_size": batch_size,
            "seed": seed,
            "shuffle": shuffle,
            "worker_count": worker_count,
        }

    def __iter__(self) -> LoaderIterator:
        return LoaderIterator(self)

    def describe(self) -> str:
        """What this loader reads and how, in one line (the train loop logs it at the start)."""
        src = self.source
        what = f"latents from {src.latents.path}" if src.latents is not None else "frames"
        how = (
            f"{self.worker_count} worker processes"
            if self.worker_count
            else f"{self.read_threads} threads in this process"
        )
        local = self.batch_size // self.shard_count
        part = f" ({local} rows per process)" if self.shard_count > 1 else ""
        return f"{src.describe()}; {what} read by {how}; global batch {self.batch_size}{part}"


class LoaderIterator:
    def __init__(self, loader: WindowLoader):
        self.loader = loader
        self._it = iter(loader._dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> bytes:
        return json.dumps(
            {
                "stream": self.loader.stream_id,
                "process_count": self.loader.shard_count,
                "position": self._it.get_state(),
            }
        ).encode()

    def set_state(self, state: bytes) -> None:
        """Continue at a saved position; ValueError if it belongs to another stream."""
        saved = json.loads(state)
        if not isinstance(saved, dict) or saved.get("stream") != self.loader.stream_id:
            theirs = saved.get("stream") if isinstance(saved, dict) else saved
            raise ValueError(
                f"the saved data position belongs to another stream ({theirs}; this one is {self.loader.stream_id})"
            )
        self._it.set_state(saved["position"])


def saved_process_count(state: bytes) -> int | None:
    """The process count of the run that saved a loader state (None if unknown)."""
    try:
        return int(json.loads(state)["process_count"])
    except (ValueError, KeyError, TypeError):
        return None


def window_source(
    root: str | Path,
    cfg: Config,
    split: str,
    seq_len: int,
    *,
    labeled_only: bool = False,
    seq_len_key: str = "loader.seq_len",
    latents: str | Path | None = None,
) -> WindowSource:
    """The windows a loader of `seq_len` steps reads (stride `loader.window_stride`, at most seq_len)."""
    lc = cfg.loader
    return WindowSource(
        root,
        split,
        seq_len,
        min(lc.window_stride, seq_len),
        env_name=cfg.env.name,
        labeled_only=labeled_only,
        seq_len_key=seq_len_key,
        labeled_repeat=lc.labeled_repeat,
        latents=latents,
    )


def make_loader(
    root: str | Path,
    cfg: Config,
    split: str = "train",
    *,
    seed: int | None = None,
    num_epochs: int | None = None,
    labeled_only: bool = False,
    shard_index: int | None = None,
    shard_count: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    batch_key: str = "loader.batch_size",
    seq_len_key: str = "loader.seq_len",
    latents: str | Path | None = None,
) -> WindowLoader:
    """A loader of this process's share of every global batch; iterate it, save `iter.get_state()`.

    `batch_size` / `seq_len` default to the loader config; a training stage passes its own, and the
    config keys they come from (`batch_key`, `seq_len_key`) for error messages. `latents`: a latent
    cache of these windows to read instead of frames. (`source_loader`: the same from a source.)
    """
    seq_len = cfg.loader.seq_len if seq_len is None else seq_len
    source = window_source(
        root, cfg, split, seq_len, labeled_only=labeled_only, seq_len_key=seq_len_key, latents=latents
    )
    return source_loader(
        source,
        cfg,
        seed=seed,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
        batch_size=batch_size,
        batch_key=batch_key,
    )


def source_loader(
    source: WindowSource,
    cfg: Config,
    *,
    seed: int | None = None,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    batch_size: int | None = None,
    batch_key: str = "loader.batch_size",
) -> WindowLoader:
    """A loader of `source`'s windows: this process's share of every global batch.

    The global batch (`batch_size`, default `loader.batch_size`, from config key `batch_key`) is
    split evenly over JAX processes (`shard_index` of `shard_count`, default this process of all);
    each process reads only its rows. A source that reads a latent cache is read by
    `loader.latent_worker_count` worker processes, any other by `loader.worker_count`; with none,
    by `loader.read_threads` threads of this process.
    """
    lc = cfg.loader
    workers = lc.latent_worker_count if source.latents is not None else lc.worker_count
    batch_size = lc.batch_size if batch_size is None else batch_size
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if batch_size % shard_count:
        raise ConfigError(
            f"config key '{batch_key}' ({batch_size}) must be divisible by the number of JAX processes ({shard_count})"
        )
    if workers > 0:
        # grain's worker processes read absl flags; a CLI that never parsed absl flags must say so.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    return WindowLoader(
        source,
        batch_size,
        shard_index,
        shard_count,
        cfg.seed if seed is None else seed,
        lc.shuffle,
        num_epochs,
        workers,
        lc.worker_buffer_size,
        lc.read_threads,
    )

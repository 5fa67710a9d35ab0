"""The collector's resume state: what a writer needs to continue exactly where its last committed
shard left it, without storing the rows of the episodes still running.

`collector/wNNN/state-KKKKKK.pkl.zp`, format 4: a pickle of
    carry         the carry after the commit's last chunk (env states, policy state, frame, key)
    replay        the carry before the chunk in which the oldest running episode began, how many
                  chunks to replay from it, and per env how many of the replayed rows belong to
                  its running episode (0: none running)
    explicit      per env, rows of a running episode that began before this process's first chunk
                  (only after resuming from a format-3-or-older state; otherwise all empty)
each carry pickled and zstd-compressed at level 1 (~0.6 MB each for 256 classic envs).

Why replay: the chunk function is deterministic, so the rows of the running episodes can be made
again from the carry before the chunk their oldest began in. Storing them (format 3) meant
zstd-compressing every row of every episode that ran over a commit, about a GB of frames per
1,024-env chunk, into a ~100 MB state file per commit; replaying instead took the collector's host
work from 7.9 to 5.1 CPU-s per chunk (BENCHMARKS.md, session 43). The cost moves to the resume: a
restarted writer replays those chunks (Craftax-Classic episodes of the default behaviour policies
span 1-3 chunks of 128 steps; seconds on a GPU, minutes on a 2-core CPU) and checks that it got the saved
carry back and that each running episode begins with a reset row where it should. If not (a
different kind of CPU or GPU, other software: float results may differ), the running episodes are
dropped and their envs reset at the next step; what was committed is untouched, and the dataset
still holds only whole episodes. It says so in its log.

Formats 3 (zstd pieces) and 2 (zlib pieces) of `state-KKKKKK.pkl.zp`, whole-state zlib
`state-KKKKKK.pkl.z` and plain `state-KKKKKK.pkl` are still read; their rows become `explicit`
pieces and are saved as such while their episodes run.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import zstandard

from dreamer4.data import store
from dreamer4.runtime.faults import disk_guard

FORMAT = 4  # 3: rows of running episodes stored as zstd pieces; 2: as zlib pieces
SUFFIX = ".pkl.zp"
LEGACY_SUFFIXES = (".pkl.z", ".pkl")


def _pack(tree) -> bytes:
    """A host pytree as zstd-1 bytes of its pickle (a compressor is not thread-safe: one per call)."""
    return zstandard.ZstdCompressor(level=1).compress(pickle.dumps(jax.device_get(tree), protocol=5))


def _unpack(data: bytes):
    return pickle.loads(zstandard.ZstdDecompressor().decompress(data))


def _compress_piece(piece: dict) -> dict:
    """{field: (dtype, shape, zstd level-1 bytes)}."""
    zc = zstandard.ZstdCompressor(level=1)
    out = {}
    for k, a in piece.items():
        a = np.ascontiguousarray(a)
        out[k] = (a.dtype.str, a.shape, zc.compress(memoryview(a).cast("B")))
    return out


def _decompress_piece(enc: dict, fmt: int) -> dict:
    unpack = zstandard.ZstdDecompressor().decompress if fmt >= 3 else zlib.decompress
    return {k: np.frombuffer(unpack(b), np.dtype(dt)).reshape(shape) for k, (dt, shape, b) in enc.items()}


@dataclass
class Plan:
    """What one commit saves, fixed when it is submitted (`CarryLog.plan`)."""

    carry: Any  # after the commit's last chunk (device or host arrays)
    replay_chunks: int  # R: chunks to replay; 0 when no episode is running
    replay_index: int | None  # the log's index of the chunk replay starts at
    replay_carry: Any  # the carry before that chunk, or None
    episode_rows: list[int]  # per env: rows of its running episode within the R replayed chunks
    explicit: list[list[dict]]  # per env: pieces from before the log began (usually empty)


class CarryLog:
    """The carry before each chunk of this process from the chunk in which the oldest running
    episode began on (device arrays, by reference: nothing is copied until a commit needs one),
    and the encoding of each carry that a commit has saved as its replay start (a long episode
    keeps the same start over several commits; it is compressed once).

    Chunks are numbered from 0 in each process (replayed chunks first). `explicit`: pieces of
    running episodes that began before chunk 0 (loaded from an older state format), by id."""

    def __init__(self, explicit: list[list[dict]] | None = None):
        self._carries: dict[int, Any] = {}
        self._encoded: dict[int, bytes] = {}
        self._lock = threading.Lock()  # commit threads read `_encoded` while the collector prunes
        self._explicit = {id(p): p for ps in explicit or [] for p in ps}

    def record(self, index: int, carry_before) -> None:
        self._carries[index] = carry_before

    def _split(self, pieces: list[dict]) -> tuple[list[dict], list[dict]]:
        """(pieces from before chunk 0, pieces of this process's chunks, one per chunk)."""
        n = 0
        while n < len(pieces) and id(pieces[n]) in self._explicit:
            n += 1
        return pieces[:n], pieces[n:]

    def plan(self, carry_after, last_chunk: int, partial: list[list[dict]]) -> Plan:
        """The state after chunk `last_chunk`, whose running episodes' rows are `partial`; also
        forgets the carries of chunks before the oldest running episode, and the explicit
        pieces of episodes that have ended."""
        if self._explicit:
            live = {id(p) for ps in partial for p in ps}
            self._explicit = {i: p for i, p in self._explicit.items() if i in live}
        explicit, rows, start = [], [], last_chunk + 1
        for pieces in partial:
            old, mine = self._split(pieces)
            explicit.append(old)
            rows.append(sum(len(p["is_first"]) for p in mine))
            if mine:  # a running episode has a piece from every chunk since it began
                start = min(start, last_chunk + 1 - len(mine))
        self.prune(start)
        if start > last_chunk:
            return Plan(carry_after, 0, None, None, [0] * len(partial), explicit)
        return Plan(carry_after, last_chunk + 1 - start, start, self._carries[start], rows, explicit)

    def prune(self, keep_from: int) -> None:
        for k in [k for k in self._carries if k < keep_from]:
            del self._carries[k]
        with self._lock:
            for k in [k for k in self._encoded if k < keep_from]:
                del self._encoded[k]

    def encoded(self, index: int, carry) -> bytes:
        with self._lock:
            data = self._encoded.get(index)
        if data is None:  # two commits may both compress it once; either result is the same bytes
            data = _pack(carry)
            with self._lock:
                self._encoded[index] = data
        return data


def encode(plan: Plan, log: CarryLog) -> bytes:
    """The state file's bytes (runs on a commit thread)."""
    replay = None
    if plan.replay_chunks:
        replay = {
            "carry": log.encoded(plan.replay_index, plan.replay_carry),
            "chunks": plan.replay_chunks,
            "episode_rows": plan.episode_rows,
        }
    return pickle.dumps(
        {
            "format": FORMAT,
            "carry": _pack(plan.carry),
            "replay": replay,
            "explicit": [[_compress_piece(p) for p in ps] for ps in plan.explicit],
        },
        protocol=pickle.HIGHEST_PROTOCOL,
    )


def _writer_dir(root: Path, writer: int) -> Path:
    return root / "collector" / f"w{writer:03d}"


def lock_path(root: Path, writer: int) -> Path:
    """Held by the process writing as this writer (runtime/lock.py)."""
    return _writer_dir(root, writer) / "lock"


def path(root: Path, writer: int, shards_done: int) -> Path:
    return _writer_dir(root, writer) / f"state-{shards_done:06d}{SUFFIX}"


def save(root: Path, writer: int, shards_done: int, data: bytes) -> None:
    """Temp file, fsync, atomic rename; a full disk removes the temp file (`DiskFullError`)."""
    p = path(root, writer, shards_done)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with disk_guard(p.parent, len(data), f"the collector resume state {p.name}", cleanup=[tmp]):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)


@dataclass
class Saved:
    """A loaded state: the carry after the last committed chunk, the pieces stored as rows
    (`explicit`), and what to replay (None for formats before 4)."""

    carry: Any
    explicit: list[list[dict]]
    replay: dict | None


def load(root: Path, writer: int, shards_done: int) -> Saved:
    p = path(root, writer, shards_done)
    if p.exists():
        s = pickle.loads(p.read_bytes())
        fmt = s["format"]
        if fmt >= 4:
            replay = s["replay"]
            if replay is not None:
                replay = {**replay, "carry": _unpack(replay["carry"])}
            explicit = [[_decompress_piece(e, fmt) for e in ps] for ps in s["explicit"]]
            return Saved(_unpack(s["carry"]), explicit, replay)
        partial = [[_decompress_piece(e, fmt) for e in ps] for ps in s["partial"]]
        return Saved(s["carry"], partial, None)
    for suffix in LEGACY_SUFFIXES:
        old = p.with_name(f"state-{shards_done:06d}{suffix}")
        if old.exists():
            raw = old.read_bytes()
            s = pickle.loads(zlib.decompress(raw) if suffix.endswith(".z") else raw)
            return Saved(s["carry"], s["partial"], None)
    raise store.DatasetError(
        f"{p} is missing: writer {writer} has {shards_done} committed shards but no saved "
        f"collector state to continue from deterministically"
    )


def prune(root: Path, writer: int, keep_from: int) -> None:
    for p in _writer_dir(root, writer).glob("state-*"):
        if p.name.endswith(".tmp") or int(p.name.split("-")[1].split(".")[0]) < keep_from:
            p.unlink(missing_ok=True)


def _equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _mismatch(saved: Saved, partial: list[list[dict]], final_carry) -> str | None:
    """Why the replayed rows are not the saved run's, or None."""
    for n, (old, pieces) in enumerate(zip(saved.explicit, partial, strict=True)):
        mine = pieces[len(old) :]
        if not mine:
            continue
        if any(p["is_last"].any() for p in mine):
            return f"env {n}'s running episode ends within the replayed chunks"
        if not old and not mine[0]["is_first"][0]:
            return f"env {n}'s running episode does not begin with a reset row"
    if not _equal(jax.device_get(final_carry), saved.carry):
        return "the replayed carry differs from the saved one"
    return None


def resume(saved: Saved, chunk_fn: Callable, log: Callable = print, where: str = "") -> tuple[Any, list, CarryLog, int]:
    """(carry on the device, the running episodes' pieces, the carry log, the next chunk's index)
    to continue from `saved`, its rows of running episodes made again by `chunk_fn`."""
    if saved.replay is None:
        return jax.device_put(saved.carry), saved.explicit, CarryLog(saved.explicit), 0
    R, rows_n = saved.replay["chunks"], saved.replay["episode_rows"]
    clog = CarryLog(saved.explicit)
    partial = [list(ps) for ps in saved.explicit]
    carry = jax.device_put(saved.replay["carry"])
    t0 = time.perf_counter()
    for j in range(R):
        clog.record(j, carry)
        carry, rows = chunk_fn(carry)
        rows = jax.device_get(rows)
        T = rows["is_first"].shape[0]
        for n, want in enumerate(rows_n):
            begin = R * T - want - j * T  # env n's running episode begins at replayed row R*T - want
            if want and begin < T:
                partial[n].append({k: np.array(v[max(begin, 0) :, n]) for k, v in rows.items()})
    why = _mismatch(saved, partial, carry)
    if why is None:
        log(
            f"{where}replayed {R} chunks: {sum(1 for r in rows_n if r)} running episodes restored "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        return carry, partial, clog, R
    log(
        f"{where}WARNING: replaying the last {R} chunks did not reproduce the saved run ({why}; "
        f"another kind of CPU/GPU or other software can change float results). The "
        f"{sum(1 for ps in partial if ps)} running episodes are dropped and their envs reset at the next "
        "step; every committed shard is unchanged"
    )
    host = jax.device_get(saved.carry)
    host = {**host, "done": np.ones_like(host["done"])}  # every env resets in the next step
    n = len(saved.explicit)
    return jax.device_put(host), [[] for _ in range(n)], CarryLog(), 0

"""The dataset format: zarr v3 shards written with TensorStore; manifest.json and its log commit them.

    DATASET_DIR/
      zarr.json                 zarr v3 group (so any zarr v3 reader can walk the tree)
      manifest.json             header + committed shards with their episodes; replaced atomically
      manifest.log              commits appended since manifest.json was written (one JSON line
                                each; folded into manifest.json when it grows, and at the end)
      manifest.lock             fcntl lock serialising writers' changes to the manifest and its log
      config.yaml               the resolved config of the (first) collection
      shards/zarr.json          group
      shards/w000-s000000/      one group per shard: arrays frame, action, reward, is_first,
                                is_last, is_terminal, achievements; rows follow the step convention
      collector/w000/           resume state of writer 0 (see collect.py)

Each array has one `sharding_indexed` chunk covering the whole shard (the write unit), inner
chunks (the read unit) of `read_chunk_frames` rows for frames and of at least STEP_FIELD_ROWS rows
for the small per-step fields, zstd, and crc32c on both the inner chunks and the shard index, so a
flipped or truncated byte fails loudly on read. The manifest also stores a
digest of every array (XXH3-128; earlier versions' sha256 still verify, see `digest`), which
`verify` re-computes.

A shard exists for readers only once the manifest (with its log) lists it: a writer killed
mid-shard leaves a group that no reader opens and the next writer run deletes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts
import xxhash

from dreamer4.runtime.faults import DiskFullError, disk_guard  # noqa: F401  (re-exported)

FORMAT = "dreamer4-dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_LOG = "manifest.log"  # commits since manifest.json was last written (`append_commit`)
# zarr.json attributes of a shard group: its manifest entry and the dataset header (rebuild_manifest).
SHARD_ATTR = "dreamer4_shard"
HEADER_ATTR = "dreamer4_header"

# Per-step fields: name -> dtype. The frame field has trailing shape (H, W, C); achievements (A,).
FIELD_DTYPES = {
    "frame": np.uint8,
    "action": np.int32,
    "reward": np.float32,
    "is_first": np.bool_,
    "is_last": np.bool_,
    "is_terminal": np.bool_,
    "achievements": np.bool_,
}
_ZARR_DTYPE = {np.uint8: "uint8", np.int32: "int32", np.float32: "float32", np.bool_: "bool"}
# Inner-chunk rows of every field but frames. A row of them is 1-22 bytes: in chunks of 4 rows
# their zstd + crc32c per chunk cost as much CPU as the frames' (a 131,072-row shard: ~3 of 12
# CPU-seconds), and a reader decoding 512 rows of them (<= 11 KB) for a window is still cheap.
STEP_FIELD_ROWS = 512


class DatasetError(ValueError):
    """A dataset problem the user can act on; the message names the file and what was expected."""


# ---------------------------------------------------------------------------------------------
# Manifest


def manifest_path(root: str | Path) -> Path:
    return Path(root) / MANIFEST


def env_header(spec, frame_shape=None) -> dict:
    """The manifest fields every dataset writer records (collect, import-video, play): the format and
    the env its rows come from (`spec`: data.env.EnvSpec; frame_shape defaults to the env's)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "env": {"name": spec.name, "id": spec.env_id, "craftax_version": spec.craftax_version},
        "frame_shape": list(frame_shape or spec.frame_shape),
        "num_actions": spec.num_actions,
        "action_meanings": list(spec.action_meanings),
        "achievement_names": list(spec.achievement_names),
    }


def manifest_header(m: dict) -> dict:
    """The dataset's header: the manifest without its committed shards and writers' status (what
    every shard's group attributes carry, so `rebuild_manifest` can restore a lost manifest)."""
    return {k: v for k, v in m.items() if k not in ("shards", "writers")}


def manifest_log_path(root: str | Path) -> Path:
    return Path(root) / MANIFEST_LOG


# The commit log. Rewriting the whole manifest at every commit cost time in proportion to the
# dataset: 1.8 CPU-s per commit at 13M frames, 6.5 s at 52M (BENCHMARKS.md, "Session 44"), on
# the commit thread under the lock, against ~0.6 s for a GPU to step a 1,024-env chunk. So a
# commit appends its shard entries and writer status as one JSON line to manifest.log
# (`append_commit`), and the log is folded into manifest.json (one rewrite, then the log is
# removed) once it has grown to a quarter of the manifest, and when a writer stops. A record
# applies once: shards already listed (by name) and a writer status older than the one held (by
# committed_shards) are skipped, so a fold interrupted between the rewrite and the removal
# leaves a log whose records change nothing. A last line without its newline is a commit that
# did not finish: readers ignore it, the next commit cuts it off.
LOG_FOLD_MIN_BYTES = 4 * 2**20
LOG_FOLD_SHARE = 0.25


def _apply_log(m: dict, root: Path, text: str) -> None:
    """Apply manifest.log's complete records to the manifest `m`, each at most once."""
    lines = text[: text.rfind("\n") + 1].split("\n")[:-1]
    if not lines:
        return
    shards, writers = m.setdefault("shards", []), m.setdefault("writers", {})
    names = {s["name"] for s in shards}
    for i, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line)
            for s in rec["shards"]:
                if s["name"] not in names:
                    shards.append(s)
                    names.add(s["name"])
            for w, status in rec["writers"].items():
                if status["committed_shards"] >= writers.get(w, {}).get("committed_shards", 0):
                    writers[w] = status
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{manifest_log_path(root)}: line {i} is not a commit record ({e!r})") from None


def read_manifest(root: str | Path) -> dict | None:
    """The manifest with the commits in its log, or None when the directory holds none yet."""
    p, lp = manifest_path(root), manifest_log_path(root)
    for _ in range(100):
        try:
            f = open(p)
        except FileNotFoundError:
            return None
        # A fold between reading manifest.json and its log replaces manifest.json: then read both
        # again. The file stays open meanwhile, so that its inode number cannot be reused.
        with f:
            text = f.read()
            try:
                log = lp.read_text()
            except FileNotFoundError:
                log = ""
            try:
                replaced = os.stat(p).st_ino != os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                replaced = True
        if replaced:
            continue
        try:
            m = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{p} is not valid JSON ({e}); the dataset's commit record is damaged") from None
        _apply_log(m, Path(root), log)
        return m
    raise DatasetError(f"{p} kept changing while it was read (100 tries)")


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = json.dumps(data, indent=1)
    with disk_guard(path.parent, len(text), path.name, cleanup=[tmp]):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    _fsync_dir(path.parent)  # so that the rename itself survives a power cut


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextlib.contextmanager
def _manifest_lock(root: Path) -> Iterator[None]:
    """The exclusive lock all writer processes take to change the manifest or its log."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "manifest.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _fold_log(root: Path, data: dict) -> None:
    """Write `data` (the manifest with its log applied) as manifest.json, then remove the log.
    Under the lock."""
    _write_json_atomic(manifest_path(root), data)
    manifest_log_path(root).unlink(missing_ok=True)


@contextlib.contextmanager
def locked_manifest(root: str | Path) -> Iterator[dict]:
    """Read-modify-write the manifest under an exclusive lock shared by all writer processes.

    Yields the current manifest, its log's commits included (an empty dict when none exists);
    whatever the block leaves in it is written back atomically (temp file + rename), so readers
    never see a half-written manifest, and the log is folded into it. Commits use `append_commit`,
    which does not rewrite the manifest.
    """
    root = Path(root)
    with _manifest_lock(root):
        data = read_manifest(root) or {}
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before or manifest_log_path(root).exists():
            _fold_log(root, data)


def append_commit(root: str | Path, shards: list[dict], writers: dict) -> None:
    """Commit `shards` (manifest entries, appended to the manifest's list in order) and set
    `writers` (writer -> its status): one line appended to manifest.log and fsynced, under the
    writers' lock. The manifest must exist. Folds the log into manifest.json once it has grown to
    LOG_FOLD_SHARE of it (at least LOG_FOLD_MIN_BYTES), so a commit costs what its own entries do
    and the folds, each proportional to the dataset, come ever more rarely."""
    root = Path(root)
    line = json.dumps({"shards": shards, "writers": writers}) + "\n"
    lp = manifest_log_path(root)
    if not manifest_path(root).exists():
        raise DatasetError(f"{manifest_path(root)} is missing: a commit needs the dataset's manifest")
    with _manifest_lock(root):
        with disk_guard(root, len(line) + 100, MANIFEST_LOG):
            with open(lp, "a+b") as f:
                end = f.seek(0, os.SEEK_END)
                if end:
                    f.seek(end - 1)
                    if f.read(1) != b"\n":  # an unfinished commit's line: cut it off
                        f.seek(0)
                        end = f.read().rfind(b"\n") + 1
                        f.truncate(end)
                f.write(line.encode())
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
        if end == 0:  # a new log file: its directory entry must survive a power cut too
            _fsync_dir(root)
        if size >= max(LOG_FOLD_MIN_BYTES, LOG_FOLD_SHARE * manifest_path(root).stat().st_size):
            m = read_manifest(root)
            if m is not None:
                _fold_log(root, m)


def fold_manifest_log(root: str | Path) -> None:
    """Fold manifest.log into manifest.json, if there is one (a writer that ends calls this, so a
    finished dataset is one manifest.json, as readers of earlier versions expect)."""
    root = Path(root)
    if manifest_log_path(root).exists():
        with _manifest_lock(root):
            m = read_manifest(root)
            if m is not None and manifest_log_path(root).exists():
                _fold_log(root, m)


def write_group_json(path: Path, attributes: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    meta = {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}
    (path / "zarr.json").write_text(json.dumps(meta, indent=1))


# ---------------------------------------------------------------------------------------------
# Shards


def shard_name(writer: int, index: int) -> str:
    return f"w{writer:03d}-s{index:06d}"


def shard_dir(root: str | Path, name: str) -> Path:
    return Path(root) / "shards" / name


def _array_spec(path: Path, shape: tuple[int, ...], dtype, read_chunk: int, zstd_level: int) -> dict:
    n = shape[0]
    inner = [max(1, min(read_chunk, n))] + list(shape[1:])
    # The one write chunk covers the whole shard, rounded up to whole read chunks (zarr v3 lets a
    # chunk reach past the array's end).
    outer = [-(-n // inner[0]) * inner[0]] + list(shape[1:])
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": list(shape),
            "data_type": _ZARR_DTYPE[dtype],
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": outer}},
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": inner,
                        "codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {"name": "zstd", "configuration": {"level": zstd_level}},
                            {"name": "crc32c"},
                        ],
                        "index_codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {"name": "crc32c"},
                        ],
                    },
                }
            ],
        },
        "create": True,
        "delete_existing": True,
    }


# A shard's arrays are recorded by their XXH3-128 digest: ~20 GB/s on one core, where sha256 ran
# at 1.8 and took ~0.9 CPU-s of the collector's ~6 per 1,024-env chunk (BENCHMARKS.md, "Session
# 42"). Corruption on disk is caught by zarr's crc32c on every read; the digest proves a shard's
# content end to end (`dreamer4 dataset verify`, a rebuilt manifest, a resumed run against an
# uninterrupted one), for which a non-cryptographic 128-bit hash suffices.
DIGEST_PREFIX = "xxh3-128:"
# What earlier versions recorded (still verified): a plain sha256 hex digest, and above 32 MiB a
# tree sha256 of the consecutive 32 MiB blocks' sha256 digests.
DIGEST_BLOCK = 32 * 2**20
TREE_PREFIX = "sha256-tree-32MiB:"


def digest(array: np.ndarray) -> str:
    """Content digest of the array's bytes in C order (hashed in place, no copy of a contiguous
    array): DIGEST_PREFIX + the XXH3 128-bit hex digest (seed 0). `digest_matches` also accepts
    the sha256 forms earlier versions recorded."""
    return DIGEST_PREFIX + xxhash.xxh3_128_hexdigest(_bytes_of(array))


def _sha256_tree(buf: memoryview) -> str:
    """TREE_PREFIX + sha256 of the concatenated sha256 digests of the DIGEST_BLOCK-byte blocks."""
    blocks = [buf[i : i + DIGEST_BLOCK] for i in range(0, len(buf), DIGEST_BLOCK)]
    with ThreadPoolExecutor(min(len(blocks), os.cpu_count() or 1, 16)) as pool:
        parts = list(pool.map(lambda b: hashlib.sha256(b).digest(), blocks))
    return TREE_PREFIX + hashlib.sha256(b"".join(parts)).hexdigest()


def digest_matches(array: np.ndarray, recorded: str) -> bool:
    """Whether `array` has the digest `recorded`, in whichever form it was recorded: `digest`'s,
    or earlier versions' tree sha256 (TREE_PREFIX) or plain sha256 hex digest."""
    if recorded.startswith(DIGEST_PREFIX):
        return digest(array) == recorded
    if recorded.startswith(TREE_PREFIX):
        return _sha256_tree(_bytes_of(array)) == recorded
    return hashlib.sha256(_bytes_of(array)).hexdigest() == recorded


def shard_digests(entry: dict) -> dict[str, str]:
    """A manifest shard entry's digest per array: `digests` (this version), `sha256` (earlier)."""
    return entry["digests"] if "digests" in entry else entry["sha256"]


def _bytes_of(array: np.ndarray) -> memoryview:
    """The array's bytes in C order, without a copy when it is contiguous already."""
    return memoryview(np.ascontiguousarray(array)).cast("B")


def write_shard(
    root: str | Path,
    name: str,
    arrays: dict[str, np.ndarray],
    *,
    read_chunk: int,
    zstd_level: int,
    entry: dict | None = None,
    header: dict | None = None,
) -> dict[str, str]:
    """Write one shard group in a single TensorStore transaction; returns the digest per array.

    Any leftover of an earlier, uncommitted attempt at the same shard is removed first. `entry`
    (the shard's manifest entry without digests) and `header` (the dataset's manifest header), when
    given, are stored in the group's zarr.json attributes once the arrays are written, so that
    `rebuild_manifest` can restore a lost manifest from the shards alone. A disk that fills up
    mid-write removes the partial group and raises `DiskFullError`.
    """
    d = shard_dir(root, name)
    if d.exists():
        shutil.rmtree(d)
    n = len(arrays["frame"])
    need = sum(np.asarray(a).nbytes for a in arrays.values())
    with disk_guard(d.parent.parent, need, f"shard {name}", cleanup=[d], bound="up to"):
        write_group_json(d.parent)
        write_group_json(d)
        txn = ts.Transaction()
        futures = []
        typed = {field: np.asarray(arrays[field], dtype=dtype) for field, dtype in FIELD_DTYPES.items()}
        # hashlib releases the GIL: the digests run in a thread while TensorStore compresses
        with ThreadPoolExecutor(1) as pool:
            digests_f = pool.submit(lambda: {field: digest(a) for field, a in typed.items()})
            for field, dtype in FIELD_DTYPES.items():
                a = typed[field]
                assert a.shape[0] == n, (field, a.shape, n)
                rows = read_chunk if field == "frame" else max(read_chunk, STEP_FIELD_ROWS)
                store = ts.open(_array_spec(d / field, a.shape, dtype, rows, zstd_level)).result()
                # Referenced, not copied into TensorStore's chunk cache: that copy of a 1,024-env shard
                # (1.6 GB) went to fresh pages each time; without it collect's host side spends 2.1 of
                # 8.8 CPU-s less per chunk (BENCHMARKS.md, "Session 35"). Safe: `a` is not modified
                # until the transaction below has committed.
                futures.append(store.with_transaction(txn).write(a, can_reference_source_data_indefinitely=True))
            for f in futures:
                f.result()
            txn.commit_async().result()
            digests = digests_f.result()
        if entry is not None:
            attrs = {SHARD_ATTR: {**entry, "digests": digests, "written_at": time.time()}}
            if header is not None:
                attrs[HEADER_ATTR] = manifest_header(header)
            _write_json_atomic(d / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})
    return digests


def open_shard_array(root: str | Path, name: str, field: str):
    path = shard_dir(root, name) / field
    try:
        return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, open=True).result()
    except Exception as e:  # TensorStore raises ValueError / its own status errors
        raise DatasetError(f"shard {name}: cannot open array {path}: {e}") from None


def read_shard_array(store, name: str, field: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
    return start_shard_read(store, name, field, start, stop)()


def start_shard_read(store, name: str, field: str, start: int | None = None, stop: int | None = None):
    """`read_shard_array`, started: returns a function that waits for the rows. Reads started
    together run concurrently in TensorStore's threads."""
    try:
        future = store[start:stop].read()
    except Exception as e:
        raise DatasetError(f"shard {name}: array '{field}' is damaged or truncated: {e}") from None

    def rows() -> np.ndarray:
        try:
            return future.result()
        except Exception as e:
            raise DatasetError(f"shard {name}: array '{field}' is damaged or truncated: {e}") from None

    return rows


# ---------------------------------------------------------------------------------------------
# Reading a dataset


@dataclass(frozen=True)
class Episode:
    id: str
    shard: str
    start: int
    length: int
    ret: float
    achievements: tuple[str, ...]
    labeled: bool
    split: str
    policy: str
    # False for imported videos: no action or reward was ever recorded (see data/video.py).
    has_actions: bool = True
    has_rewards: bool = True


class Dataset:
    """Read side of a dataset: committed shards only, as the manifest lists them."""

    def __init__(self, root: str | Path, manifest: dict, hide_unlabeled_actions: bool = True):
        self.root = Path(root)
        self.hide_unlabeled_actions = hide_unlabeled_actions
        self.manifest = manifest
        self.frame_shape = tuple(manifest["frame_shape"])
        self.num_actions = int(manifest["num_actions"])
        self.achievement_names = tuple(manifest["achievement_names"])
        self.episodes: list[Episode] = []
        self.shards = {s["name"]: s for s in manifest["shards"]}
        for s in manifest["shards"]:
            for e in s["episodes"]:
                self.episodes.append(
                    Episode(
                        id=e["id"],
                        shard=s["name"],
                        start=e["start"],
                        length=e["length"],
                        ret=e["return"],
                        achievements=tuple(e["achievements"]),
                        labeled=e["labeled"],
                        split=e["split"],
                        policy=e.get("policy", manifest.get("behavior_policy", "?")),
                        has_actions=e.get("has_actions", True),
                        has_rewards=e.get("has_rewards", True),
                    )
                )
        self._stores: dict[tuple[str, str], Any] = {}
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    @classmethod
    def open(
        cls,
        root: str | Path,
        env_name: str | None = None,
        allow_empty: bool = False,
        hide_unlabeled_actions: bool = True,
    ) -> Dataset:
        """Open a dataset's committed shards; `hide_unlabeled_actions=False` is for tools and tests
        that must see every stored byte, never for training code."""
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"dataset directory {root} does not exist")
        m = read_manifest(root)
        if m is None:
            refuse_orphaned_shards(root, "it cannot be read until it has one")
            raise DatasetError(
                f"{root} is not a dreamer4 dataset: {manifest_path(root)} is missing "
                f"(create one with `dreamer4 collect --out {root}`)"
            )
        if m.get("format") != FORMAT:
            raise DatasetError(
                f"{manifest_path(root)} is not a dreamer4 dataset manifest "
                f"(format {m.get('format')!r}, expected {FORMAT!r})"
            )
        if m.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                f"{manifest_path(root)} has format_version {m.get('format_version')}, "
                f"this code reads version {FORMAT_VERSION}"
            )
        if env_name is not None and m["env"]["name"] != env_name:
            raise DatasetError(
                f"dataset {root} holds {m['env']['id']} episodes (env.name={m['env']['name']!r}) "
                f"but the config has env.name={env_name!r}"
            )
        ds = cls(root, m, hide_unlabeled_actions=hide_unlabeled_actions)
        if not ds.episodes and not allow_empty:
            raise DatasetError(f"dataset {root} has no committed episodes yet")
        return ds

    def split(self, split: str) -> list[Episode]:
        return [e for e in self.episodes if e.split == split]

    def _store(self, shard: str, field: str):
        key = (shard, field)
        if key not in self._stores:
            self._stores[key] = open_shard_array(self.root, shard, field)
        return self._stores[key]

    def _small(self, shard: str, field: str) -> np.ndarray:
        """Whole-shard copy of a small per-step field (everything but frames), read once.

        Actions of unlabeled episodes are overwritten with -1 as they are loaded, so they never
        exist in a reader's memory.
        """
        key = (shard, field)
        if key not in self._cache:
            a = read_shard_array(self._store(shard, field), shard, field)
            if field == "action" and self.hide_unlabeled_actions:
                a = a.copy()
                for e in self.episodes:
                    if e.shard == shard and not e.labeled:
                        a[e.start : e.start + e.length] = -1
            self._cache[key] = a
        return self._cache[key]

    def read(self, ep: Episode, start: int, stop: int, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Rows [start, stop) of episode `ep` for the given fields."""
        started = self.start_read(ep, start, stop, fields)
        return {f: rows() if callable(rows) else rows for f, rows in started.items()}

    def start_read(self, ep: Episode, start: int, stop: int, fields: tuple[str, ...]) -> dict:
        """`read`, with the frames' read started: {field: rows, or for "frame" a function that
        waits for them}. Reads started together run concurrently."""
        if not 0 <= start <= stop <= ep.length:
            raise IndexError(f"rows [{start}, {stop}) outside episode {ep.id} of length {ep.length}")
        a, b = ep.start + start, ep.start + stop
        out = {}
        for f in fields:
            if f == "frame":
                out[f] = start_shard_read(self._store(ep.shard, f), ep.shard, f, a, b)
            else:
                out[f] = self._small(ep.shard, f)[a:b]
        return out

    def __getstate__(self):  # TensorStore handles stay in their process; reopen lazily
        state = self.__dict__.copy()
        state["_stores"] = {}
        state["_cache"] = {}
        return state


def _array_problems(root: Path, entry: dict, says: str, digest: str, first_only: bool = False) -> list[str]:
    """What is wrong with a shard's arrays against its entry (the manifest's, or the one in the
    shard's attributes), worded "<says> N" for a row count and "<digest>" for a digest: at most
    one problem per array, an unreadable array included; with `first_only`, the first."""
    name, n, problems = entry["name"], entry["num_frames"], []
    for field in FIELD_DTYPES:
        try:
            store = open_shard_array(root, name, field)
            if store.shape[0] != n:
                problems.append(f"array '{field}' has {store.shape[0]} rows, {says} {n}")
            elif not digest_matches(read_shard_array(store, name, field), shard_digests(entry)[field]):
                problems.append(f"array '{field}' content differs from {digest}")
        except DatasetError as e:
            problems.append(str(e).removeprefix(f"shard {name}: "))
        if problems and first_only:
            break
    return problems


def verify(root: str | Path) -> tuple[list[str], list[str]]:
    """Re-read every committed shard and compare with the manifest.

    Returns (problems, notes): each problem names a shard and what is wrong with it; notes list
    what is present but not committed (ignored by readers).
    """
    root = Path(root)
    ds = Dataset.open(root, allow_empty=True)
    problems, notes = [], []
    for name, s in ds.shards.items():
        n = s["num_frames"]
        problems += [f"shard {name}: {p}" for p in _array_problems(root, s, "manifest says", "the manifest's digest")]
        ends = [e["start"] + e["length"] for e in s["episodes"]]
        if sorted(e["start"] for e in s["episodes"]) != [0] + sorted(ends)[:-1] or max(ends) != n:
            problems.append(f"shard {name}: episodes do not tile its {n} rows")
    sdir = root / "shards"
    if sdir.is_dir():
        for p in sorted(sdir.iterdir()):
            if p.is_dir() and p.name not in ds.shards:
                notes.append(f"shard {p.name} is not committed (left by an interrupted writer; ignored)")
    return problems, notes


# ---------------------------------------------------------------------------------------------
# A directory whose manifest is lost: refuse to write into it; rebuild the manifest from shards.


def shard_groups(root: str | Path) -> list[Path]:
    sdir = Path(root) / "shards"
    return sorted(p for p in sdir.iterdir() if p.is_dir()) if sdir.is_dir() else []


def refuse_orphaned_shards(
    root: str | Path, why: str = "refusing to write into it, which would overwrite them"
) -> None:
    """Raise if `root` holds shard groups but no manifest: writing there would destroy them."""
    root = Path(root)
    if manifest_path(root).exists():
        return
    groups = shard_groups(root)
    if groups:
        names = ", ".join(p.name for p in groups[:3]) + (", ..." if len(groups) > 3 else "")
        raise DatasetError(
            f"{root} holds {len(groups)} shard group(s) ({names}) but no {MANIFEST}; {why}: restore the "
            f"manifest with `dreamer4 dataset rebuild-manifest {root}` (or move them aside with `dreamer4 dataset rebuild-manifest --move-aside {root}`)"
        )


def _shard_attributes(d: Path) -> dict:
    try:
        return json.loads((d / "zarr.json").read_text()).get("attributes", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


def _shard_ok(root: Path, entry: dict) -> str | None:
    """None if every array of the shard reads back with its recorded digest, else the first problem."""
    return next(iter(_array_problems(root, entry, "its attributes say", "its recorded digest", first_only=True)), None)


def rebuild_manifest(root: str | Path, move_aside: bool = False, log=print) -> dict:
    """Rebuild `root`'s manifest from the metadata its shards carry (or move them aside).

    Shards written since the metadata existed carry their manifest entry and the dataset header
    in their zarr.json attributes (written after the arrays, so a shard with attributes is whole).
    Each is re-read against its digests; per writer the contiguous run of good shards from index 0
    is committed, and an import batch of videos only when all its shards are there. Shards that
    cannot be restored (written before the metadata existed, damaged, or beyond a gap) are listed
    and left where they are; with `move_aside` every shard group and the collector state are moved
    to `shards-aside-<time>/` next to them instead (nothing is deleted), so that the directory can
    be collected into afresh. Returns a summary.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset directory {root} does not exist")
    mp = manifest_path(root)
    if mp.exists():
        try:
            m = json.loads(mp.read_text())
            raise DatasetError(
                f"{mp} exists and is readable ({len(m.get('shards', []))} committed shards); "
                f"nothing to rebuild (move it aside first to rebuild it from the shards)"
            )
        except json.JSONDecodeError:
            bad = mp.with_name(f"{MANIFEST}.damaged-{int(time.time())}")
            os.replace(mp, bad)
            log(f"{mp} is not valid JSON: moved it to {bad.name}")
    lp = manifest_log_path(root)
    if lp.exists():  # commits on top of the lost manifest: not applied to the rebuilt one, kept
        kept = lp.with_name(f"{MANIFEST_LOG}.orphaned-{int(time.time())}")
        os.replace(lp, kept)
        log(f"{lp} belonged to the lost manifest: moved it to {kept.name}")
    groups = shard_groups(root)
    if move_aside:
        aside = root / f"shards-aside-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for p in groups:
            os.replace(p, aside / p.name)
        if (root / "collector").is_dir():
            os.replace(root / "collector", aside / "collector")
        log(f"moved {len(groups)} shard group(s) and the collector state to {aside}; nothing was deleted")
        return {"moved": len(groups), "to": str(aside)}
    found, skipped = [], []
    for d in groups:
        attrs = _shard_attributes(d)
        entry, header = attrs.get(SHARD_ATTR), attrs.get(HEADER_ATTR)
        if not entry or not header:
            skipped.append(f"{d.name}: no shard metadata (written before it existed, or interrupted)")
            continue
        problem = _shard_ok(root, entry)
        if problem:
            skipped.append(f"{d.name}: {problem}")
            continue
        found.append((entry, header))
    by_writer: dict[Any, list] = {}
    for entry, header in found:
        by_writer.setdefault(entry["writer"], []).append((entry, header))
    committed = []
    writers = {}
    for w, items in by_writer.items():
        items.sort(key=lambda x: x[0]["index"])
        run = []
        for entry, header in items:
            if entry["index"] != len(run):
                skipped.append(f"{entry['name']}: shard index {len(run)} of writer {w} is missing before it")
                continue
            run.append((entry, header))
        if w == "video":  # an import batch commits all its shards together, or none
            batches: dict[int, list] = {}
            for item in run:
                batches.setdefault(item[0]["batch"]["first"], []).append(item)
            run = []
            for first, b in sorted(batches.items()):
                if len(b) != b[0][0]["batch"]["count"] or first != len(run):
                    skipped.extend(f"{e['name']}: its import was interrupted before the commit" for e, _ in b)
                    break
                run.extend(b)
        # A writer commits in index order, each shard once it and every one before it is written;
        # shards written concurrently finish in any order, so a shard's write time alone is not
        # its commit time, while the latest write time up to it bounds that from below.
        written = float("-inf")
        for entry, header in run:
            written = max(written, entry["written_at"])
            committed.append(((written, str(w), entry["index"]), entry, header))
        if w != "video" and run:
            last = run[-1][0]
            writers[str(w)] = {
                "committed_shards": len(run),
                "episodes": sum(len(e["episodes"]) for e, _ in run),
                "target_episodes": last["target_episodes"],
                "complete": last["final"],
            }
    if not committed:
        raise DatasetError(
            f"{root}: no shard carries the metadata a rebuild needs ({len(skipped)} shard group(s): "
            f"{'; '.join(skipped[:3])}); move them aside with `dreamer4 dataset rebuild-manifest --move-aside {root}`"
        )
    # each writer's commit order; writers interleaved close to (not always exactly) their commit order
    committed = [(e, h) for _, e, h in sorted(committed, key=lambda x: x[0])]
    headers = [h for _, h in committed]
    video = [h for e, h in committed if e["writer"] == "video"]
    collectors = [h for e, h in committed if e["writer"] != "video"]
    m = {}
    if video:  # as collect does when it adds play to imported videos: adopt the collect header
        m.update(video[0])
    if collectors:
        m.update({k: v for k, v in collectors[0].items() if not (video and k in ("has_actions", "has_rewards"))})
    for h in headers[1:]:
        for key in ("env", "frame_shape", "num_actions", "seed"):
            if h.get(key) != headers[0].get(key):
                raise DatasetError(
                    f"{root}: shards disagree on the dataset's {key} ({h.get(key)!r} vs "
                    f"{headers[0].get(key)!r}); rebuild refused"
                )
    if video:
        m["has_actions"] = m["has_rewards"] = False
    m["shards"] = [
        {k: v for k, v in e.items() if k not in ("written_at", "target_episodes", "final", "batch")}
        for e, _ in committed
    ]
    m["writers"] = writers
    with locked_manifest(root) as current:
        if current:
            raise DatasetError(f"{mp} appeared while rebuilding (another process?); nothing changed")
        current.update(m)
    for s in skipped:
        log(f"not restored: {s}")
    eps = sum(len(s["episodes"]) for s in m["shards"])
    log(
        f"rebuilt {mp}: {len(m['shards'])} shards, {eps} episodes; {len(skipped)} shard group(s) not restored "
        f"(left in place)"
    )
    return {"shards": len(m["shards"]), "episodes": eps, "skipped": skipped}

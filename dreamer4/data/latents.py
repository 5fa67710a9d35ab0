"""The latent cache: the frozen tokenizer's latents of every training window, stored once.

    RUN_DIR/latents/<split>-T<seq_len>-s<stride>/
      zarr.json        zarr v3 array metadata; its attributes hold the cache's identity (below)
      c/<b>/0/0/0      block b: latents of windows [b * block, (b + 1) * block), one file each

One array `latents_WTLN` (window, step, latent token, channel) in the order of the loader's
windows (`WindowSource.base_windows`: labeled repeats read their original's row). A window's
latents are exactly what the dynamics step would compute from its frames: the encoder is causal in
time, so latents depend on the window start, and each window is stored, not each frame (T /
stride copies of a frame's latent; still smaller than the uint8 frames for the classic preset).

Each block is one `sharding_indexed` chunk (the write unit: one file, written whole by one
process), with one window per inner chunk (the read unit: a loader reads only the windows it
needs). A block file exists only once written, so the blocks present are the committed work of a
killed build, and a rerun encodes only the rest. The identity (tokenizer parameters' digest, the
windows' digest, split, seq_len, stride) decides whether an existing cache can be continued or
read; anything else is rebuilt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import tensorstore as ts

from dreamer4.data.store import DatasetError
from dreamer4.runtime.faults import disk_guard

ARRAY_ATTR = "dreamer4_latents"
READ_CACHE_BYTES = 32 << 20  # per reading process (each loader worker): shard indices, and some windows
_DTYPES = ("float32", "bfloat16", "float16")  # stored as zarr v3 data types of these names


def cache_name(split: str, seq_len: int, stride: int) -> str:
    return f"{split}-T{seq_len}-s{stride}"


def _zarr_dtype(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"latent cache: unsupported latent dtype {name} (expected one of {sorted(_DTYPES)})")
    return name


class LatentCache:
    """A latent cache directory; opened lazily (TensorStore handles do not cross processes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._store = None
        self._read_store = None  # `_reader()`: for a complete cache only
        self._meta = None

    # -- identity and layout --------------------------------------------------------------------
    @property
    def meta(self) -> dict | None:
        """The cache's attributes (identity, shape, block), or None if there is no cache here."""
        if self._meta is None:
            f = self.path / "zarr.json"
            if not f.exists():
                return None
            try:
                self._meta = json.loads(f.read_text()).get("attributes", {}).get(ARRAY_ATTR)
            except json.JSONDecodeError:
                return None
        return self._meta

    @property
    def num_blocks(self) -> int:
        m = self.meta
        return -(-m["shape"][0] // m["block"])

    def matches(self, identity: dict, shape: tuple[int, ...], dtype) -> bool:
        """Whether this cache holds (or is building) these latents. Its block size is not compared:
        a block is only the write unit (reads are per window), and a build continues with its own."""
        m = self.meta
        return (
            m is not None
            and m.get("identity") == identity
            and tuple(m.get("shape", ())) == tuple(shape)
            and m.get("dtype") == _zarr_dtype(dtype)
        )

    def create(self, identity: dict, shape: tuple[int, ...], dtype, block: int) -> None:
        """A new, empty cache here (anything already here is deleted)."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        meta = {"identity": identity, "shape": list(shape), "dtype": _zarr_dtype(dtype), "block": block}
        ts.open(
            {
                "driver": "zarr3",
                "kvstore": {"driver": "file", "path": str(self.path)},
                "metadata": {
                    "shape": list(shape),
                    "data_type": meta["dtype"],
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [block, *shape[1:]]}},
                    "codecs": [
                        {
                            "name": "sharding_indexed",
                            "configuration": {
                                "chunk_shape": [1, *shape[1:]],
                                # float latents do not compress; crc32c makes damage fail loudly
                                "codecs": [
                                    {"name": "bytes", "configuration": {"endian": "little"}},
                                    {"name": "crc32c"},
                                ],
                                "index_codecs": [
                                    {"name": "bytes", "configuration": {"endian": "little"}},
                                    {"name": "crc32c"},
                                ],
                            },
                        }
                    ],
                    "attributes": {ARRAY_ATTR: meta},
                },
                "create": True,
                "delete_existing": True,
            }
        ).result()
        self._meta, self._store, self._read_store = meta, None, None

    def _array(self):
        if self._store is None:
            self._store = self._open()
        return self._store

    def _open(self, **spec):
        """The array, opened with these extra TensorStore spec keys; DatasetError if it cannot be."""
        try:
            return ts.open(
                {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path)}, **spec}, open=True
            ).result()
        except Exception as e:  # TensorStore raises ValueError / its own status errors
            raise DatasetError(f"latent cache {self.path}: cannot open ({e}); delete it to rebuild") from None

    # -- blocks ----------------------------------------------------------------------------------
    def present_blocks(self) -> set[int]:
        """Indices of the blocks whose file exists (written whole)."""
        root = self.path / "c"
        if not root.is_dir():
            return set()
        return {int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "0" / "0" / "0").is_file()}

    def block_range(self, b: int) -> tuple[int, int]:
        m = self.meta
        return b * m["block"], min((b + 1) * m["block"], m["shape"][0])

    def write_block(self, b: int, latents_WTLN: np.ndarray) -> None:
        lo, hi = self.block_range(b)
        if latents_WTLN.shape != (hi - lo, *self.meta["shape"][1:]):
            raise ValueError(
                f"latent cache block {b}: got shape {latents_WTLN.shape}, expected {(hi - lo, *self.meta['shape'][1:])}"
            )
        with disk_guard(self.path, latents_WTLN.nbytes, f"latent cache block {b} of {self.path}"):
            self._array()[lo:hi].write(latents_WTLN).result()

    def missing(self) -> list[int]:
        have = self.present_blocks()
        return [b for b in range(self.num_blocks) if b not in have]

    # -- reading ---------------------------------------------------------------------------------
    def check_readable(self, identity: dict) -> None:
        """DatasetError unless this cache is complete and was built for `identity` (the keys given)."""
        m = self.meta
        if m is None:
            raise DatasetError(f"latent cache {self.path} does not exist (train-dynamics builds it)")
        if {k: m.get("identity", {}).get(k) for k in identity} != identity:
            raise DatasetError(
                f"latent cache {self.path} was built for other windows or another tokenizer "
                f"({m.get('identity')}; the loader expects {identity}); rerun train-dynamics to rebuild it"
            )
        missing = self.missing()
        if missing:
            raise DatasetError(
                f"latent cache {self.path} is incomplete: {len(missing)} of {self.num_blocks} blocks missing "
                f"(first: {missing[0]}); rerun train-dynamics to finish it"
            )

    def read(self, window: int) -> np.ndarray:
        try:
            return self._reader()[window].read().result()
        except Exception as e:
            raise DatasetError(f"latent cache {self.path}: window {window} is damaged or unreadable: {e}") from None

    def read_many(self, windows: np.ndarray) -> np.ndarray:
        """latents_WTLN of these windows (in this order; repeats allowed) in one TensorStore read,
        which runs the windows' reads concurrently: a batch of 32 windows took 25-37 us per window
        on a 2-core VM, one read per window 150-220 us (BENCHMARKS.md, "After the third lease")."""
        windows = np.asarray(windows, np.int64)
        try:
            return self._reader()[windows].read().result()
        except Exception as e:
            raise DatasetError(
                f"latent cache {self.path}: one of windows {windows.tolist()} is damaged or unreadable: {e}"
            ) from None

    def _reader(self):
        """The array opened for reading a complete cache: a small cache pool keeps the blocks'
        shard indices, which every window's read would otherwise read again from its file (a
        window's read: 217 -> 160 us on a 2-core VM)."""
        if self._read_store is None:
            self._read_store = self._open(
                context={
                    "cache_pool": {"total_bytes_limit": READ_CACHE_BYTES},
                    # one copy thread per reader: loader workers are processes already, and
                    # TensorStore's default (a thread per core in each) halved 2 workers' rate
                    "data_copy_concurrency": {"limit": 1},
                },
                recheck_cached_data="open",  # a complete cache does not change
            )
        return self._read_store

    def __getstate__(self):  # TensorStore handles stay in their process; reopen lazily
        return {"path": self.path, "_store": None, "_read_store": None, "_meta": self._meta}

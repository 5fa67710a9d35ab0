"""Faults a user can cause, as one sentence each: a full disk, a damaged checkpoint, a busy stage.

A full disk: which directory, what was being written, how much it needs.

Every writer of bulk data (dataset shards, collector resume state, manifests, checkpoints,
metrics, images, videos) runs inside `disk_guard`: an ENOSPC from Python, TensorStore or orbax
(they report it as an OSError with errno 28 or as a message holding "No space left on device")
removes the partial files the write left, and becomes a `DiskFullError` naming the directory, the
size of the write and the space that is free. Committed data is never touched, so rerunning the
same command after freeing space resumes.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path


class CheckpointError(RuntimeError):
    """No checkpoint of a stage can be restored; the message names the directory and why."""


class StageLockedError(RuntimeError):
    """Another live job holds the stage's lock (runtime/lock.py); the message names the file and holder."""


class DiskFullError(OSError):
    """The disk filled up; the message says where and how much the next write needs."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def is_disk_full(exc: BaseException | None) -> bool:
    """True if `exc` or anything in its cause/context chain is an ENOSPC."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def free_bytes(directory: str | Path) -> int | None:
    d = Path(directory)
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        return shutil.disk_usage(d).free
    except OSError:
        return None


def remove_quietly(paths: Iterable[str | Path]) -> None:
    for p in paths:
        p = Path(p)
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists() or p.is_symlink():
                p.unlink()
        except OSError:
            pass


def disk_full_error(directory: str | Path, need_bytes: int | None, what: str, bound: str = "about") -> DiskFullError:
    """`bound`: "about", or "up to" where the size is before compression."""
    free = free_bytes(directory)
    need = f"{bound} {human_bytes(need_bytes)}" if need_bytes else "more space"
    have = f"{human_bytes(free)} is free" if free is not None else "the free space is unknown"
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on device in {directory} while writing {what}: it needs {need} and {have}; "
        f"the partial write was removed and committed data is intact: free some space and rerun the "
        f"same command to continue",
    )


@contextlib.contextmanager
def disk_guard(
    directory: str | Path,
    need_bytes: int | None,
    what: str,
    cleanup: Iterable[str | Path] = (),
    bound: str = "about",
) -> Iterator[None]:
    """Turn an ENOSPC inside the block into one `DiskFullError`, removing `cleanup` first."""
    cleanup = list(cleanup)
    try:
        yield
    except DiskFullError:
        remove_quietly(cleanup)
        raise
    except BaseException as e:
        if not is_disk_full(e):
            raise
        remove_quietly(cleanup)
        raise disk_full_error(directory, need_bytes, what, bound) from None

"""One writer per stage directory: a lock that names its holder and frees itself when the holder dies.

A training stage holds STAGE_DIR/lock while it runs (a collection writer holds
DATASET/collector/wNNN/lock). A second job started on the same stage of the same run directory
(a forgotten job, a resubmission while the first still runs) stops before writing anything with
one sentence naming the lock file and the holder (host, pid, Slurm job id, start time) — a
`StageLockedError`, exit code 2.

The lock is an exclusive `fcntl.flock` on the file, held for the whole stage, and the file holds
the holder's description (JSON). The kernel (or the NFS server, once the holder's lease lapses)
drops a flock when its process dies however it dies, so a lock left by a killed job (SIGKILL,
node failure, time limit) is stale by construction: the next run takes it and says whose it was.
On a clean exit the description is cleared. Where a file system does not really share flocks
between hosts, a description left behind is checked as well: a holder on this host whose process
is still alive, or another Slurm job that squeue still lists as running, keeps the lock.

A process may nest `stage_lock` calls on one file (a stage function takes it before building its
model, so a refusal comes at once, and its train loop takes it again): the inner ones are no-ops.
One multi-process job shares one lock: process 0 takes it; the others learn the outcome through
the coordination service, so every process of the job starts, or every process stops with the
same sentence. File systems without flock support (e.g. Lustre mounted with `noflock`) run
unlocked, with a warning (the dataset manifest's lock needs flock too).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax

from dreamer4.runtime.distributed import coordination_client
from dreamer4.runtime.faults import StageLockedError

_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING"}
_shared_locks = 0  # shared acquisitions so far (the same sequence on every process of a job)
_held: set[Path] = set()  # lock files this process holds (a nested stage_lock of one is a no-op)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), if known."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def holder_info(what: str) -> dict:
    """Who holds a lock: this process, its host and (under Slurm) its job."""
    env = os.environ
    info = {
        "what": what,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _start_time(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "processes": jax.process_count(),
        "command": " ".join(sys.argv)[:1000],
    }
    if env.get("SLURM_JOB_ID"):
        info.update(
            slurm_job_id=env["SLURM_JOB_ID"],
            slurm_step_id=env.get("SLURM_STEP_ID"),
            slurm_restart_count=env.get("SLURM_RESTART_COUNT", "0"),
        )
    return info


def describe(h: dict) -> str:
    if not h:
        return "a process that has not written its name yet"
    job = f" in Slurm job {h['slurm_job_id']}" if h.get("slurm_job_id") else ""
    return f"pid {h.get('pid')} on host {h.get('host')}{job} (since {h.get('started')})"


def _alive_here(h: dict) -> bool:
    """A holder on this host whose process (same pid, same start time) still runs."""
    if h.get("host") != socket.gethostname() or not h.get("pid"):
        return False
    pid = int(h["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return h.get("pid_start") is None or _start_time(pid) == h.get("pid_start")


def _slurm_job_running(h: dict) -> bool:
    """A holder in another Slurm job that squeue lists as running (False when unknown)."""
    job = h.get("slurm_job_id")
    if not job:
        return False
    if job == os.environ.get("SLURM_JOB_ID"):
        return False  # an earlier step or run (before a requeue) of this very job: not running now
    try:
        r = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and r.stdout.strip().split("\n")[0] in _RUNNING


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 16).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"host": "?", "pid": "?", "started": "?", "command": "an unreadable lock file"}


def _write(fd: int, h: dict) -> None:
    data = json.dumps(h, indent=1).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _refusal(path: Path, what: str, h: dict, why: str = "") -> StageLockedError:
    return StageLockedError(
        f"{what}: {path} is held by {describe(h)}{why}: another job is already working on this stage "
        f"of this run directory; wait for it to finish, or stop it, or use another directory"
    )


class _Lock:
    def __init__(self, path: Path, what: str, log):
        self.path, self.what, self.log = path, what, log
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            h = _read(fd)
            os.close(fd)
            raise _refusal(self.path, self.what, h) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self.log(f"[{self.what}] warning: {self.path} cannot be locked here ({e.strerror}); running unlocked")
                return
            raise
        left = _read(fd)
        if left:  # its writer did not clear it: it was killed, or the file system does not share flocks
            if _alive_here(left):
                os.close(fd)
                raise _refusal(self.path, self.what, left, " (its process still runs)")
            if _slurm_job_running(left):
                os.close(fd)
                raise _refusal(self.path, self.what, left, " (squeue lists the job as running)")
            self.log(f"[{self.what}] {self.path} was left by {describe(left)}, which is gone; taking it over")
        _write(fd, holder_info(self.what))
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def stage_lock(path: str | Path, what: str, shared: bool = True, log=print) -> Iterator[None]:
    """Hold the lock file `path` while the block runs; `StageLockedError` if another job holds it.

    shared=True: every process of a multi-process job calls this at the same point; process 0 takes
    the lock for all of them. shared=False: each process locks for itself (a collection writer)."""
    global _shared_locks
    path = Path(path).absolute()
    if path in _held:  # already held by this process (a stage function, then its train loop)
        yield
        return
    lock = _Lock(path, what, log)
    multi = shared and jax.process_count() > 1 and coordination_client() is not None
    if not multi:
        lock.acquire()
    else:
        _shared_locks += 1
        key = f"dreamer4/lock/{_shared_locks}"
        client = coordination_client()
        if jax.process_index() == 0:
            try:
                lock.acquire()
            except BaseException as e:  # the others must not wait for an answer that never comes
                client.key_value_set(key, str(e) or e.__class__.__name__)
                raise
            client.key_value_set(key, "")
        else:
            refusal = client.blocking_key_value_get(key, 4 * 3600 * 1000)
            if refusal:
                raise StageLockedError(refusal)
    _held.add(path)
    try:
        yield
    finally:
        _held.discard(path)
        lock.release()

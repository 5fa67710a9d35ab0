"""A real single-node Slurm for tests: munged + slurmctld + slurmd on 127.0.0.1, configured in a
temporary directory, started as root and stopped by their pids.

    cluster = SlurmCluster.start(tmp_dir)     # raises SlurmUnavailable (with the reason) where it cannot
    subprocess.run(["sbatch", "--wait", ...], env=cluster.env(...))
    cluster.stop()

Needs Debian's `slurm-wlm` and `munge` packages (`.ci/run` installs them where apt is available as
root) and root (slurmd runs the jobs as the submitting user; munged and the daemons use files in
the temporary directory only). The node has the machine's CPUs and two stand-in GPUs declared in
gres.conf (no device files), so the sbatch scripts' `--gpus-per-node` is accepted.
`ProctrackType=proctrack/linuxproc` and `TaskPlugin=task/none`: no cgroups are needed.

Run by hand: `python tests/slurm_cluster.py DIR` starts one, prints the SLURM_CONF to export and
stops it on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scontrol", "scancel")
NODE = "localhost"  # what SLURM_STEP_NODELIST names: JAX resolves it to reach the coordinator


class SlurmUnavailable(RuntimeError):
    """Why no test cluster could be started (tests skip with this reason)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def why_unavailable() -> str | None:
    """None when a cluster can be started here, else the reason."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "a test Slurm needs a POSIX system"
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return (
            f"Slurm/munge are not installed ({', '.join(missing)} missing; `apt-get install slurm-wlm munge` "
            "as root, which .ci/run does where it can)"
        )
    if os.geteuid() != 0:
        return "the test Slurm's daemons (slurmd, munged) must be started as root"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class SlurmCluster:
    root: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    kill_wait: int = 30

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, **extra) -> dict:
        """The environment for slurm client commands (sbatch, squeue, ...) talking to this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    # -- start / stop ------------------------------------------------------------------------------
    @classmethod
    def start(cls, root: str | Path, cpus: int | None = None, timeout_s: float = 60) -> SlurmCluster:
        why = why_unavailable()
        if why:
            raise SlurmUnavailable(why)
        root = Path(root).absolute()
        root.mkdir(parents=True, exist_ok=True)
        self = cls(root)
        try:
            self._write_config(cpus or os.cpu_count() or 1)
            self._start_munge()
            self._start("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._start("slurmd", [_which("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])
            self._wait_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _write_config(self, cpus: int) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(exist_ok=True)
        (r / "munge").chmod(0o700)
        ctld, slurmd = _free_port(), _free_port()
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "root")
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=d4test",
                    "SlurmctldHost=localhost(127.0.0.1)",
                    f"SlurmUser={user}",
                    f"SlurmctldPort={ctld}",
                    f"SlurmdPort={slurmd}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # a requeued job may start again once its old credential expired (default 120 s)
                    f"AuthInfo=socket={r / 'munge' / 'munge.socket'},cred_expire=5",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SchedulerType=sched/builtin",
                    "SchedulerParameters=sched_interval=1",  # pending jobs are looked at every second
                    "GresTypes=gpu",
                    "MpiDefault=none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    f"KillWait={self.kill_wait}",
                    "MinJobAge=300",
                    "SlurmctldTimeout=30",
                    "SlurmdTimeout=30",
                    "InactiveLimit=0",
                    f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:2 State=UNKNOWN",
                    f"PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
                    "",
                ]
            )
        )
        # Two stand-in GPUs (empty files as their device files): enough for --gpus-per-node.
        (r / "dev").mkdir(exist_ok=True)
        for i in range(2):
            (r / "dev" / f"gpu{i}").touch()
        (r / "gres.conf").write_text(f"NodeName={NODE} Name=gpu File={r / 'dev'}/gpu[0-1]\n")
        (r / "cgroup.conf").write_text("CgroupAutomount=no\n")

    def _start_munge(self) -> None:
        m = self.root / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._start(
            "munged",
            [
                _which("munged"),
                "-F",
                "--force",
                f"--socket={m / 'munge.socket'}",
                f"--key-file={key}",
                f"--pid-file={m / 'munged.pid'}",
                f"--log-file={m / 'munged.log'}",
                f"--seed-file={m / 'munged.seed'}",
            ],
        )
        deadline = time.time() + 15
        while not (m / "munge.socket").exists():
            if self.procs["munged"].poll() is not None or time.time() > deadline:
                raise SlurmUnavailable(f"munged did not start: {self._tail('munged')}")
            time.sleep(0.1)

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
        )
        log.close()

    def _tail(self, name: str, n: int = 2000) -> str:
        texts = []
        for p in (
            self.root / "log" / f"{name}.out",
            self.root / "log" / f"{name}.log",
            self.root / "munge" / "munged.log",
        ):
            if p.exists() and name in p.name:
                texts.append(p.read_text()[-n:])
        return "\n".join(texts) or "(no log)"

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        state = ""
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {p.returncode}: {self._tail(name)}")
            r = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"], env=self.env(), capture_output=True, text=True, timeout=10
            )
            state = r.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"the node did not become idle in {timeout_s:.0f} s (sinfo: {state!r})")

    def stop(self) -> None:
        """Cancel what is left (and wait for it to end), then stop slurmd, slurmctld and munged by pid."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "-u", str(os.getuid()), check=False, timeout=10)
                deadline = time.time() + self.kill_wait + 5
                while time.time() < deadline and self.run("squeue", "-h", check=False, timeout=10).stdout.strip():
                    time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    # -- helpers for tests ---------------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(list(argv), env=kw.pop("env", self.env()), capture_output=True, text=True, **kw)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(argv)} exited with {r.returncode}: {r.stderr.strip()}")
        return r

    def job_state(self, job_id: str) -> str:
        r = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        fields = dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)
        return fields.get("JobState", "")


if __name__ == "__main__":
    c = SlurmCluster.start(sys.argv[1] if len(sys.argv) > 1 else "/tmp/d4slurm")
    print(f"export SLURM_CONF={c.conf}", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()

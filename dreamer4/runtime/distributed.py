"""Multi-controller JAX: start `jax.distributed` once per process, before any backend use.

A multi-host job runs the same command in every process (one per GPU by default, or one per node
seeing all its GPUs, or one per TPU host). Each process calls `initialize()` first thing; after it,
`jax.devices()` lists the devices of all processes and every jitted step runs as one program over
them. Three ways in, checked in this order:

1. explicit flags `--coordinator HOST:PORT --num-processes N --process-id I` (all three, or none);
2. Slurm: inside an `srun` step with more than one task, JAX's own cluster detection reads
   SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID; the coordinator
   is the step's first node (port from the job id, or $JAX_COORDINATOR_PORT);
3. otherwise a single process: nothing is initialised and nothing changes.
TPU pod slices need no flags: JAX's TPU detection does the same from the TPU metadata when the
command is started on every host (`gcloud ... ssh --worker=all`); set DREAMER4_DISTRIBUTED=auto
there to force the call. DREAMER4_DISTRIBUTED=off disables every automatic initialisation.

Rule for the code that runs afterwards: process-dependent control flow (`if process_index() == 0`)
may only wrap process-local work (writing a file, printing); never a jitted step, a checkpoint
save/restore or any other collective, or the other processes wait for it forever.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import jax

from dreamer4.config import ConfigError

PROCESS_PER = ("device", "node")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_initialized: DistributedInfo | None = None


@dataclass(frozen=True)
class DistributedInfo:
    mode: str  # "single", "explicit", "slurm" or "auto"
    process_id: int
    num_processes: int
    coordinator: str | None = None


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """The flags every stage command takes (see the module docstring)."""
    g = p.add_argument_group("multi-host (optional; detected automatically under Slurm)")
    g.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="address of process 0's coordinator service (explicit multi-process launch)",
    )
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes in the job")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's index in [0, N)")
    g.add_argument(
        "--process-per",
        choices=PROCESS_PER,
        default=os.environ.get("DREAMER4_PROCESS_PER", "device"),
        help="under Slurm: one process per GPU (device, the default) or one per node seeing all "
        "its GPUs (node); default $DREAMER4_PROCESS_PER or device",
    )


def initialize_from_args(args: argparse.Namespace) -> DistributedInfo:
    return initialize(
        getattr(args, "coordinator", None),
        getattr(args, "num_processes", None),
        getattr(args, "process_id", None),
        getattr(args, "process_per", "device"),
    )


def slurm_task_count(env=os.environ) -> int:
    """Tasks of the current srun step (0 when not inside one)."""
    if not all(v in env for v in _SLURM_VARS):
        return 0
    return int(env["SLURM_NTASKS"])


def require_single_process(command: str, env=os.environ) -> None:
    """Refuse a single-process command started inside a multi-task srun step (it would run N times)."""
    if slurm_task_count(env) > 1:
        raise ConfigError(
            f"`dreamer4 {command}` is a single-process evaluation; start it with one task "
            "(srun --ntasks=1 ...), not inside a multi-task srun step"
        )


def _visible_gpus(env) -> list[str] | None:
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip():
        return [d for d in cvd.split(",") if d.strip()]
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return [str(i) for i in range(int(env["SLURM_GPUS_ON_NODE"]))]
    return None


def slurm_local_device_ids(process_per: str, env=os.environ) -> list[int] | None:
    """Which of the node's visible GPUs this task drives (None: let JAX decide).

    device: JAX picks GPU SLURM_LOCALID, which is right when every task sees all the node's GPUs;
    when Slurm already bound one GPU to the task (--gpus-per-task=1 / --gpu-bind), that GPU is the
    only visible one and has index 0. node: every visible GPU.
    """
    gpus = _visible_gpus(env)
    if process_per == "node":
        return list(range(len(gpus))) if gpus else None
    if gpus is not None and len(gpus) == 1:
        return [0]
    return None


def _explicit_flags(coordinator, num_processes, process_id) -> bool:
    """Whether --coordinator/--num-processes/--process-id were given; a bad combination is an error."""
    explicit = (coordinator, num_processes, process_id)
    if all(v is None for v in explicit):
        return False
    if any(v is None for v in explicit):
        raise ConfigError(
            "--coordinator, --num-processes and --process-id must be given together "
            f"(got {coordinator!r}, {num_processes!r}, {process_id!r})"
        )
    if ":" not in coordinator:
        raise ConfigError(f"--coordinator {coordinator!r} must look like HOST:PORT")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id {process_id} must be in [0, --num-processes={num_processes})")
    return True


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    process_per: str = "device",
    env=os.environ,
) -> DistributedInfo:
    """Initialise jax.distributed exactly once for this process (see the module docstring)."""
    global _initialized
    # Checked first: bad flags are an error even when an earlier command in this interpreter initialised.
    explicit = _explicit_flags(coordinator, num_processes, process_id)
    if _initialized is not None:
        return _initialized
    policy = env.get("DREAMER4_DISTRIBUTED", "").lower()
    if explicit:
        if num_processes == 1:
            _initialized = DistributedInfo("single", 0, 1)
            return _initialized
        _use_gloo_on_cpu()
        _disable_jax_preemption_notifier()
        jax.distributed.initialize(coordinator, num_processes, process_id, cluster_detection_method="deactivate")
        _initialized = DistributedInfo("explicit", process_id, num_processes, coordinator)
    elif policy != "off" and slurm_task_count(env) > 1:
        if process_per not in PROCESS_PER:
            raise ConfigError(f"--process-per {process_per!r} must be one of {list(PROCESS_PER)}")
        _use_gloo_on_cpu()
        _disable_jax_preemption_notifier()
        jax.distributed.initialize(local_device_ids=slurm_local_device_ids(process_per, env))
        _initialized = DistributedInfo("slurm", jax.process_index(), jax.process_count())
    elif policy == "auto":  # TPU pods and other environments JAX detects by itself
        _use_gloo_on_cpu()
        _disable_jax_preemption_notifier()
        jax.distributed.initialize()
        _initialized = DistributedInfo("auto", jax.process_index(), jax.process_count())
    else:
        _initialized = DistributedInfo("single", 0, 1)
    if _initialized.num_processes > 1 and jax.process_index() == 0:
        print(
            f"[distributed] {_initialized.mode}: {jax.process_count()} processes, "
            f"{jax.device_count()} devices ({jax.local_device_count()} per process, "
            f"{jax.devices()[0].platform})",
            flush=True,
        )
    return _initialized


def _disable_jax_preemption_notifier() -> None:
    """JAX's preemption service installs a C-level SIGTERM handler that only records the notice for
    `reached_preemption_sync_point`; dreamer4 handles SIGTERM/SIGUSR1/SIGINT itself
    (runtime/preempt.py), so it is turned off before jax.distributed starts."""
    try:
        jax.config.update("jax_enable_preemption_service", False)
    except (AttributeError, KeyError, ValueError):  # a jax without the option
        pass


def _use_gloo_on_cpu() -> None:
    """CPU devices of different processes talk over gloo (TCP); GPUs/TPUs ignore the setting."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):  # older jax: the option does not exist
        pass


def is_main_process() -> bool:
    return jax.process_index() == 0


def log0(msg: str) -> None:
    """Print once per job (process 0), not once per process."""
    if jax.process_index() == 0:
        print(msg, flush=True)


def coordination_client():
    """The coordination service's client of this process (None before jax.distributed is up)."""
    from jax._src import distributed as _dist  # no public handle exists

    return _dist.global_state.client


_barriers = 0


def barrier(name: str, timeout_s: float = 4 * 3600) -> None:
    """Wait until every process reaches this point (a no-op with one process).

    Call it unconditionally from every process, in the same order. It waits on the coordination
    service (no device collective), so a process may arrive hours after another (e.g. after a long
    collection or evaluation); CPU gloo collectives give up after 30 s.
    """
    global _barriers
    if jax.process_count() == 1:
        return
    _barriers += 1
    client = coordination_client()
    if client is not None and hasattr(client, "wait_at_barrier"):
        client.wait_at_barrier(f"dreamer4/{_barriers}/{name}", int(timeout_s * 1000))
    else:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

"""Weak-scaling benchmark of the shared train step: 1, 2, 4 devices and 2 processes.

    python benchmarks/scaling.py [--stage tokenizer|dynamics] [--config configs/tiny.yaml]
                                 [--per-device-batch 2] [--steps 10] [--platform cpu]

Every case runs in fresh subprocesses (the device count of a JAX process is fixed at start-up):
one process with 1, 2 and 4 devices, and a real 2-process job (loopback coordinator, gloo
collectives) with 1 and 2 devices per process. The per-device batch is fixed, so the global
batch grows with the device count (weak scaling); the state is FSDP-sharded over all devices as in
training (runtime.fsdp = 0; --fsdp 1 for pure data parallelism). Reported: step time, frames/s
and tokens/s of the global batch, and the weak-scaling efficiency step_time(1) / step_time(n).

On CPU (--platform cpu, the default) the devices are fake: XLA_FLAGS=
--xla_force_host_platform_device_count=N splits one machine's cores into N "devices", so the
figures measure the runtime's overhead (sharding, collectives, multi-process startup), not the
speed-up of real hardware. On a GPU machine use --platform gpu --cases 1x1 (one process per GPU
needs a multi-GPU node). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ["1x1", "1x2", "1x4", "2x1", "2x2"]  # processes x devices per process


def worker(args) -> None:
    """One process of one case: time the compiled train step on random frames."""
    sys.path.insert(0, str(Path(__file__).parent))
    from dreamer4.runtime.distributed import initialize
    from dreamer4.runtime.jax_setup import enable_compilation_cache

    enable_compilation_cache()
    if args.num_processes > 1:
        initialize(args.coordinator, args.num_processes, args.process_id)
    import jax
    import numpy as np
    from flax import nnx
    from train_step import dynamics_case, tokenizer_case

    from dreamer4.config import load_config
    from dreamer4.runtime.loading import TRAINABLE
    from dreamer4.runtime.mesh import global_batch, make_mesh
    from dreamer4.runtime.train_loop import compile_train_step, place_train_state

    cfg = load_config(args.config, args.overrides + [f"runtime.fsdp={args.fsdp}"])
    tc = cfg.tokenizer.train if args.stage == "tokenizer" else cfg.dynamics.train
    n_dev, n_local = jax.device_count(), jax.local_device_count()
    batch = args.per_device_batch * n_dev
    case = tokenizer_case if args.stage == "tokenizer" else dynamics_case
    model, loss_fn, data, _, tokens, n_params, frames = case(cfg, batch, tc.seq_len)
    trainable = nnx.Param
    if args.stage == "dynamics":
        trainable = TRAINABLE["dynamics"]
    mesh = make_mesh(args.fsdp)
    graphdef, state, shardings = place_train_state(model, tc, mesh, trainable)
    step = compile_train_step(graphdef, loss_fn, shardings, mesh, trainable)
    lo = jax.process_index() * args.per_device_batch * n_local
    local = {k: v[lo : lo + args.per_device_batch * n_local] for k, v in data.items()}  # this process's rows
    gb = global_batch(mesh, local)
    key = jax.random.PRNGKey(0)
    t0 = time.time()
    state, m = step(state, gb, key)
    jax.block_until_ready(m)
    compile_s = time.time() - t0
    for i in range(2):
        state, m = step(state, gb, jax.random.fold_in(key, i))
    jax.block_until_ready(m)
    times = []
    for i in range(args.steps):
        t = time.time()
        state, m = step(state, gb, jax.random.fold_in(key, 100 + i))
        jax.block_until_ready(m)
        times.append(time.time() - t)
    dt = float(np.median(times))
    if jax.process_index() == 0:
        Path(args.out).write_text(
            json.dumps(
                {
                    "processes": jax.process_count(),
                    "devices": n_dev,
                    "devices_per_process": n_local,
                    "device": jax.devices()[0].device_kind,
                    "global_batch": batch,
                    "seq_len": tc.seq_len,
                    "params": n_params,
                    "step_s": dt,
                    "compile_s": compile_s,
                    "frames_per_s": frames / dt,
                    "tokens_per_s": tokens / dt,
                    "loss": float(m["loss"]),
                }
            )
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(case: str, args, tmp: Path) -> dict:
    procs, devs = (int(x) for x in case.split("x"))
    port = free_port()
    out = tmp / f"{case}.json"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        JAX_PLATFORMS=args.platform,
        WANDB_MODE="disabled",
        JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
    )
    if args.platform == "cpu":
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devs}"
    env.pop("SLURM_JOB_ID", None)
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--stage",
        args.stage,
        "--config",
        args.config,
        "--fsdp",
        str(args.fsdp),
        "--per-device-batch",
        str(args.per_device_batch),
        "--steps",
        str(args.steps),
        "--out",
        str(out),
        "--num-processes",
        str(procs),
        "--coordinator",
        f"127.0.0.1:{port}",
    ]
    for o in args.overrides:
        cmd += ["--set", o]
    t0 = time.time()
    ps = [
        subprocess.Popen(
            cmd + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for i in range(procs)
    ]
    logs = [p.communicate(timeout=1200)[0] for p in ps]
    for p, log in zip(ps, logs):
        if p.returncode:
            raise RuntimeError(f"case {case} failed:\n{log[-3000:]}")
    res = json.loads(out.read_text())
    res["case"], res["wall_s"] = case, time.time() - t0
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=["tokenizer", "dynamics"], default="tokenizer")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--per-device-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cases", default=",".join(CASES), help="PROCESSESxDEVICES, comma-separated")
    ap.add_argument("--platform", default="cpu")
    ap.add_argument("--fsdp", type=int, default=0, help="runtime.fsdp (0 = all devices, 1 = pure data parallel)")
    ap.add_argument("--json", default="bench_out/scaling.json")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    tmp = Path(args.json).parent / "scaling_cases"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases.split(","):
        rows.append(run_case(case, args, tmp))
        print(f"  {case}: {rows[-1]['step_s'] * 1e3:.1f} ms/step", flush=True)
    base = next((r["step_s"] for r in rows if r["devices"] == 1), None)
    print(
        f"\n{args.stage} weak scaling, fsdp={args.fsdp or 'all'}, {args.per_device_batch} sequences/device, "
        f"seq_len {rows[0]['seq_len']}, "
        f"{rows[0]['params'] / 1e6:.2f}M params, {rows[0]['device']}"
    )
    print(
        f"{'procs x dev':>11} {'devices':>7} {'batch':>5} {'step ms':>9} {'frames/s':>9} {'tokens/s':>10} "
        f"{'efficiency':>10} {'compile s':>9}"
    )
    for r in rows:
        r["weak_scaling_efficiency"] = base / r["step_s"] if base else None
        eff = f"{r['weak_scaling_efficiency']:.2f}" if base else "n/a"
        print(
            f"{r['case']:>11} {r['devices']:>7} {r['global_batch']:>5} {r['step_s'] * 1e3:>9.1f} "
            f"{r['frames_per_s']:>9.1f} {r['tokens_per_s']:>10.0f} {eff:>10} {r['compile_s']:>9.1f}"
        )
    res = {
        "stage": args.stage,
        "fsdp": args.fsdp,
        "config": args.config,
        "overrides": args.overrides,
        "per_device_batch": args.per_device_batch,
        "platform": args.platform,
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "cases": rows,
    }
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Multi-host proof on CPU: real JAX multi-controller jobs of 2 processes over loopback (gloo).

* 2 processes x 2 fake CPU devices train the tokenizer, the dynamics and the agent (BC, then
  imagination) with state FSDP-sharded over all 4 devices; their losses equal a 1-process x
  4-device run of the same config and seed;
* the 2-process checkpoint restores in a 1-process, 1-device run that continues training exactly
  like the 1-process reference's checkpoint does;
* (2 processes collecting into one dataset run under the real Slurm: tests/test_slurm.py);
* the slurm/ scripts parse and their srun lines pass what the tasks rely on.
The subprocess runs share one module fixture and run concurrently to keep the wall time small.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TEST_OVERRIDES, TOK_OVERRIDES, xla_flags
from test_agent import AGENT_OVERRIDES
from test_dynamics import DYN_OVERRIDES

from dreamer4.config import ConfigError
from dreamer4.runtime import distributed
from dreamer4.runtime.mesh import check_process_layout, device_grid

WORKER = Path(__file__).parent / "multihost_worker.py"
STEPS = 4
SETS = [
    a
    for kv in TEST_OVERRIDES
    + TOK_OVERRIDES
    + DYN_OVERRIDES
    + [
        f"tokenizer.train.steps={STEPS}",
        f"dynamics.train.steps={STEPS}",
        "tokenizer.train.log_every=1",
        "dynamics.train.log_every=1",
        f"tokenizer.train.ckpt_every={STEPS}",
        f"dynamics.train.ckpt_every={STEPS}",
        "tokenizer.eval_episodes=1",
        "dynamics.eval_windows=2",  # the evaluation only has to run (eval.json); keep it small
        "dynamics.eval_transitions=2",
    ]
    for a in ("--set", kv)
]
# The agent's two phases on the same train loop (agent tokens, BC + reward MTP, then imagination).
AGENT_SETS = [
    a
    for kv in AGENT_OVERRIDES
    + [
        f"agent.bc.steps={STEPS}",
        f"agent.imagine.steps={STEPS}",
        "agent.bc.log_every=1",
        "agent.imagine.log_every=1",
        f"agent.bc.ckpt_every={STEPS}",
        f"agent.imagine.ckpt_every={STEPS}",
    ]
    for a in ("--set", kv)
]
CONFIG = ["--config", str(REPO / "configs" / "tiny.yaml")]
AGENT_CRITIC_WARMUP = int(next(kv.split("=")[1] for kv in AGENT_OVERRIDES if kv.startswith("agent.critic_warmup=")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(commands, processes: int, devices: int, tag: str, log_dir: Path) -> list:
    """Start one job of `processes` processes with `devices` fake CPU devices each (not waited for)."""
    port = free_port()
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        WANDB_MODE="disabled",
        XLA_FLAGS=xla_flags(devices),
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
    )  # loopback only
    env.pop("SLURM_JOB_ID", None)  # never pick up a surrounding Slurm job
    procs = []
    for i in range(processes):
        flags = (
            ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)]
            if processes > 1
            else []
        )
        log = open(log_dir / f"{tag}_p{i}.log", "w")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(WORKER), json.dumps([c + flags for c in commands])],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log_dir / f"{tag}_p{i}.log",
            )
        )
    return procs


def wait(procs, timeout=480) -> list[str]:
    """Wait for a job; on a timeout every process first dumps its Python stacks into its log."""
    import signal
    import time

    deadline = time.time() + timeout
    outs = []
    for p, log in procs:
        try:
            rc = p.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                if q.poll() is None:
                    q.send_signal(signal.SIGUSR2)  # multihost_worker.py: faulthandler stack dump
            time.sleep(3)
            for q, _ in procs:
                q.kill()
            rc = "timeout"
        outs.append(log.read_text())
        assert rc == 0, f"{log} exited with {rc}:\n" + "\n".join(l.read_text()[-4000:] for _, l in procs)
    return outs


def train_cmds(data, run, steps=None):
    extra = [] if steps is None else ["--set", f"tokenizer.train.steps={steps}"]
    tok = ["train-tokenizer", *CONFIG, *SETS, *extra, "--data", str(data), "--run", str(run)]
    # (fsdp over all 4 devices; the hybrid layout, fsdp=2 here, is checked without training in
    # test_hybrid_mesh_*: XLA's CPU gloo collectives were seen to deadlock, 2 runs in 4, on a step
    # mixing in-process fsdp groups with cross-process data groups)
    dyn = ["train-dynamics", *CONFIG, *SETS, "--data", str(data), "--run", str(run)]
    agent = ["train-agent", *CONFIG, *SETS, *AGENT_SETS, "--data", str(data), "--run", str(run)]
    return [tok] if steps is not None else [tok, dyn, agent]


def losses(stage_dir: Path, name: str = "loss") -> dict[int, float]:
    """{step: the logged metric `name`} of a stage's training rows."""
    rows = [json.loads(l) for l in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[name] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def jobs(dataset, tmp_path_factory):
    """Reference (1 x 4 devices) and 2 x 2 devices; then both continued in 1 x 1. (A 2-process
    collect runs under the real Slurm in tests/test_slurm.py, which checks the same writer facts.)"""
    data, _ = dataset
    base = tmp_path_factory.mktemp("multihost")
    # Phase 1 runs the two jobs side by side (the 2 cores are shared). Phase 2 continues both
    # tokenizers to STEPS + 2 in one process with one device (another process and device count
    # than the 2-process run that saved one of them).
    phases = [
        lambda: {
            "ref": launch(train_cmds(data, base / "ref"), 1, 4, "ref", base),
            "mp": launch(train_cmds(data, base / "mp"), 2, 2, "mp", base),
        },
        lambda: {
            f"cont_{k}": launch(train_cmds(data, base / k, STEPS + 2), 1, 1, f"cont_{k}", base) for k in ("ref", "mp")
        },
    ]
    out = {}
    for phase in phases:
        started = phase()
        try:
            out.update({k: wait(v) for k, v in started.items()})
        finally:  # a failed job must not leave the others running
            for p, _ in [x for v in started.values() for x in v]:
                if p.poll() is None:
                    p.kill()
    return base, out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["tokenizer", "dynamics", "agent_bc", "agent"])
def test_two_processes_equal_one_process(jobs, stage):
    base, out = jobs
    assert "[distributed] explicit: 2 processes, 4 devices (2 per process, cpu)" in out["mp"][0]
    # the state really is sharded, over both processes' devices
    mesh = "data=1 x fsdp=4"
    assert f"[{stage}] mesh {mesh} over 2 process(es)" in out["mp"][0]
    assert " 0/" not in out["mp"][0].split(f"[{stage}] mesh")[1].splitlines()[0]
    assert f"[{stage}] mesh {mesh} over 1 process(es)" in out["ref"][0]
    assert "[tokenizer] mesh" not in out["mp"][1]  # only process 0 reports
    ref, mp = losses(base / "ref" / stage), losses(base / "mp" / stage)
    first = list(range(1, STEPS + 1))  # (the tokenizers were continued afterwards: steps 5, 6)
    assert sorted(ref)[:STEPS] == first and sorted(mp)[:STEPS] == first
    # the losses move, so equality is not trivial; the agent's first two losses are both its value
    # loss at ~ln(num_bins) (the value head starts at zero logits and its first, warm-up update
    # moves them by ~1e-7), so they may round alike
    distinct = len({round(ref[s], 6) for s in first})
    assert distinct == STEPS or (stage == "agent" and distinct == STEPS - 1), sorted(ref.items())
    if stage == "agent":
        # PMPO reads only sign(A - mean A). Here the imagined returns are ~1e-4 after the critic
        # warm-up's value-only updates, so the collectives' float rounding (1e-7; it depends on
        # the process layout) decides the sign of some centred advantages, and from the first
        # policy update on the loss differs by design (a CI run: pmpo_pos_frac 0.50 vs 0.42 at
        # step 3, value loss equal to 1e-7). Compared: the loss of the warm-up steps, then at the
        # first policy step what is computed before the sign split (value loss, policy entropy).
        warm = [s for s in first if s <= AGENT_CRITIC_WARMUP]
        assert warm and len(warm) < STEPS
        np.testing.assert_allclose([mp[s] for s in warm], [ref[s] for s in warm], rtol=2e-5)
        s = AGENT_CRITIC_WARMUP + 1
        for name in ("value", "entropy"):
            a, b = losses(base / "mp" / stage, name)[s], losses(base / "ref" / stage, name)[s]
            np.testing.assert_allclose(a, b, rtol=2e-5, err_msg=f"{name} at step {s}")
        return
    np.testing.assert_allclose([mp[s] for s in first], [ref[s] for s in first], rtol=2e-5)
    if stage == "dynamics":  # both trained on a latent cache; the 2-process one built by both processes
        assert "[latents] building" in out["mp"][0] and "[latents] building" in out["ref"][0]
        assert len(list((base / "mp" / "latents").iterdir())) == 2  # dynamics' windows, then agent_bc's
    if stage in ("tokenizer", "dynamics"):
        assert (base / "mp" / stage / "eval.json").exists()


@pytest.mark.slow
def test_two_process_checkpoint_continues_in_one_process(jobs):
    base, out = jobs
    log = out["cont_mp"][0]
    assert "process count changed (2 -> 1)" in log
    assert "resumed from checkpoint step 4" in log and "(saved by 2 processes, now 1)" in log
    ref, mp = losses(base / "ref" / "tokenizer"), losses(base / "mp" / "tokenizer")
    assert sorted(mp) == list(range(1, STEPS + 3))  # continued from 4: steps 5, 6 once each
    # model and optimizer state restored onto 1 device continue exactly as the 4-device reference
    np.testing.assert_allclose([mp[s] for s in (5, 6)], [ref[s] for s in (5, 6)], rtol=2e-5)
    assert "process count changed" not in out["cont_ref"][0]


# --- distributed init and mesh layout, without subprocesses -----------------------------------


def test_explicit_flags_must_come_together():
    distributed.initialize(env={})  # single process, as any earlier CLI call in this interpreter does
    with pytest.raises(ConfigError, match="must be given together"):
        distributed.initialize("127.0.0.1:1234", None, 0)
    with pytest.raises(ConfigError, match=r"--process-id 2 must be in \[0, --num-processes=2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        distributed.initialize("localhost", 2, 0)


def test_slurm_detection_and_gpu_choice():
    step = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "n[1-2]",
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "3",
    }
    assert distributed.slurm_task_count(step) == 8
    assert distributed.slurm_task_count({k: v for k, v in step.items() if k != "SLURM_STEP_NODELIST"}) == 0
    four = dict(step, CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert distributed.slurm_local_device_ids("device", four) is None  # JAX picks SLURM_LOCALID
    assert distributed.slurm_local_device_ids("device", dict(step, CUDA_VISIBLE_DEVICES="3")) == [0]
    assert distributed.slurm_local_device_ids("node", four) == [0, 1, 2, 3]
    assert distributed.slurm_local_device_ids("node", dict(step, SLURM_GPUS_ON_NODE="2")) == [0, 1]
    assert distributed.slurm_local_device_ids("node", step) is None  # no GPUs: CPU/TPU


class FakeDevice:
    def __init__(self, process, i):
        self.process_index, self.id, self.platform, self.device_kind = process, i, "cpu", "cpu"


def test_single_process_commands_refuse_a_multi_task_step():
    step = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "n1",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }
    for command in ("dream", "evaluate"):
        with pytest.raises(ConfigError, match=f"`dreamer4 {command}` is a single-process evaluation"):
            distributed.require_single_process(command, step)
    distributed.require_single_process("evaluate", dict(step, SLURM_NTASKS="1"))
    distributed.require_single_process("evaluate", {})


def test_hybrid_mesh_keeps_fsdp_inside_a_process():
    devs = [FakeDevice(p, 4 * p + i) for p in range(2) for i in range(4)]
    grid = device_grid(devs, 2)
    assert grid.shape == (4, 2)
    assert all(len({d.process_index for d in row}) == 1 for row in grid)  # fsdp groups never cross
    assert [d.process_index for d in grid.reshape(-1)] == [0] * 4 + [1] * 4
    assert device_grid(devs, 8).shape == (1, 8)  # fsdp over everything: crosses processes
    # one device per process (one process per GPU): consecutive processes form the fsdp groups
    single = [FakeDevice(p, p) for p in range(8)]
    assert [[d.process_index for d in row] for row in device_grid(single, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    interleaved = np.asarray([[devs[0], devs[4]], [devs[1], devs[5]]], dtype=object)
    with pytest.raises(ValueError, match="contiguous block"):
        check_process_layout(interleaved)


# --- slurm scripts ---------------------------------------------------------------------------

SLURM = REPO / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))


def test_sbatch_scripts_parse():
    assert {p.name for p in SCRIPTS} >= {
        "collect.sbatch",
        "train_tokenizer.sbatch",
        "train_dynamics.sbatch",
        "dream.sbatch",
        "train_agent.sbatch",
        "evaluate.sbatch",
        "train_behavior.sbatch",
        "pipeline.sbatch",
    }
    for p in SCRIPTS + [SLURM / "launch.sh"]:
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, (p, r.stderr)


def run_script(script: Path, tmp_path: Path, **env_over) -> list[dict]:
    """Run an sbatch script with a fake `srun` that records each call (argv and --export)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    record = tmp_path / "srun_calls.jsonl"
    record.unlink(missing_ok=True)
    (bindir / "srun").write_text(
        f"#!{sys.executable}\nimport json, sys\nopen({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    (bindir / "srun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "DREAMER4_", "WANDB_"))}
    env.update(
        PATH=f"{bindir}:{env['PATH']}",
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_JOB_ID="12345",
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_PER_NODE="a100:4",
        HOME=str(tmp_path),
        **env_over,
    )
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    calls = []
    for line in record.read_text().splitlines():
        argv = json.loads(line)
        opts = {
            a.split("=", 1)[0]: a.split("=", 1)[1]
            for a in argv
            if a.startswith("--") and "=" in a and argv.index(a) < argv.index("-m")
        }
        export = dict(kv.split("=", 1) for kv in opts["--export"].split(",")[1:])
        calls.append({"argv": argv, "opts": opts, "export": export, "command": argv[argv.index("dreamer4.cli") + 1 :]})
        assert opts["--export"].split(",")[0] == "ALL"  # keeps PATH/venv and the SLURM_* variables
    return calls


def test_srun_lines_pass_what_the_tasks_rely_on(tmp_path):
    calls = run_script(SLURM / "pipeline.sbatch", tmp_path, SETS="seed=3")
    assert [c["command"][0] for c in calls] == [
        "collect",
        "train-tokenizer",
        "train-dynamics",
        "dream",
        "train-agent",
        "evaluate",
        "report",
    ]
    for c in calls[:3] + calls[4:5]:
        # one process per GPU: 2 nodes x 4 tasks; JAX's Slurm detection reads SLURM_* set by srun
        assert c["opts"]["--nodes"] == "2" and c["opts"]["--ntasks-per-node"] == "4"
        assert c["export"]["DREAMER4_PROCESS_PER"] == "device"
        assert c["export"]["JAX_COORDINATOR_PORT"] == str(12345 % 4096 + 61440)
        assert c["export"]["DREAMER4_JAX_CACHE"] and c["export"]["WANDB_MODE"] == "offline"
        cmd = " ".join(c["command"])
        assert "--set runtime.fsdp=4" in cmd and "--set seed=3" in cmd  # fsdp inside a node
    assert calls[3]["opts"]["--ntasks"] == "1" and calls[3]["command"] == ["dream", "--run", "runs/classic"]
    for c in calls[5:]:
        assert c["opts"]["--ntasks"] == "1" and c["command"][1:] == ["--run", "runs/classic"]
    # every script's subcommand and flags parse with the CLI's own parser
    from dreamer4.cli import build_parser

    for c in calls:
        build_parser().parse_args(c["command"])
    one = run_script(SLURM / "evaluate.sbatch", tmp_path, EPISODES="7")
    assert [c["command"] for c in one] == [
        ["evaluate", "--run", "runs/classic", "--episodes", "7"],
        ["report", "--run", "runs/classic"],
    ]
    beh = run_script(SLURM / "train_behavior.sbatch", tmp_path, RUN="runs/ppo")
    assert beh[0]["opts"]["--ntasks"] == "1" and beh[0]["command"][0] == "train-behavior"
    build_parser().parse_args(beh[0]["command"])
    agent = run_script(SLURM / "train_agent.sbatch", tmp_path, PHASE="imagine")
    assert agent[0]["opts"]["--ntasks-per-node"] == "4" and agent[0]["command"][-2:] == ["--phase", "imagine"]
    # one process per node: 1 task per node, told so through the environment
    node = run_script(SLURM / "train_tokenizer.sbatch", tmp_path, PROCESS_PER="node", RUN="runs/x")
    assert len(node) == 1 and node[0]["opts"]["--ntasks-per-node"] == "1"
    assert node[0]["export"]["DREAMER4_PROCESS_PER"] == "node"
    assert node[0]["command"][:1] == ["train-tokenizer"] and "runs/x" in node[0]["command"]
    # the CLI's default for --process-per is the variable srun passes
    os_env = dict(os.environ)
    try:
        os.environ["DREAMER4_PROCESS_PER"] = "node"
        args = build_parser().parse_args(["train-tokenizer", "--data", "d", "--run", "r"])
    finally:
        os.environ.clear()
        os.environ.update(os_env)
    assert args.process_per == "node"


def _fake_slurm_bin(tmp_path: Path) -> tuple[Path, Path]:
    """A fake `srun` (records its command, runs until a signal, then exits 75 like a dreamer4 stage
    that checkpointed) and a fake `scontrol` (records its arguments)."""
    bindir, record = tmp_path / "fakebin", tmp_path / "calls.txt"
    bindir.mkdir(exist_ok=True)
    (bindir / "srun").write_text(
        "#!/bin/bash\n"
        "trap 'exit 75' USR1 TERM\n"  # before the record: the test signals once it sees it
        f'echo "srun ${{@: -5}}" >> {record}\n'
        "for i in $(seq 1 600); do sleep 0.05; done\n"
    )
    (bindir / "scontrol").write_text(f'#!/bin/bash\necho "scontrol $*" >> {record}\n')
    for f in ("srun", "scontrol"):
        (bindir / f).chmod(0o755)
    return bindir, record


def _start_with_fake_slurm(tmp_path: Path, script: Path, srun_on_signal: str = "") -> tuple[Path, subprocess.Popen]:
    """Start `bash SCRIPT` with the fake srun/scontrol first on PATH; returns once srun runs.
    `srun_on_signal`: shell code the fake srun runs on a signal instead of `exit 75`."""
    import time

    bindir, record = _fake_slurm_bin(tmp_path)
    if srun_on_signal:
        srun = bindir / "srun"
        srun.write_text(srun.read_text().replace("trap 'exit 75' USR1 TERM", f"trap '{srun_on_signal}' USR1 TERM"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "DREAMER4_"))}
    env.update(PATH=f"{bindir}:{env['PATH']}", SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="777", HOME=str(tmp_path))
    env["RUN"] = str(tmp_path / "run")  # where launch.sh's preemption mark goes (not the repository)
    p = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not (record.exists() and "srun" in record.read_text()):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    return record, p


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_launch_forwards_signals_and_requeues_before_the_time_limit(tmp_path, sig):
    """slurm/launch.sh without Slurm: a signal to the batch shell reaches the running step; after
    SIGUSR1 (the time-limit warning) the job requeues itself, after SIGTERM it does not; either way
    no later stage starts and the script exits 75. (tests/test_slurm.py does this on a real Slurm.)"""
    import signal

    record, p = _start_with_fake_slurm(tmp_path, SLURM / "pipeline.sbatch")
    p.send_signal(getattr(signal, f"SIG{sig}"))
    err = p.communicate(timeout=20)[1]
    assert p.returncode == 75, err
    calls = record.read_text().splitlines()
    assert len([c for c in calls if c.startswith("srun")]) == 1  # collect ran; the tokenizer never started
    assert f"launch.sh: SIG{sig} received" in err
    if sig == "USR1":
        assert calls[-1] == "scontrol requeue 777" and "requeueing job 777" in err
    else:
        assert not [c for c in calls if c.startswith("scontrol")]


def test_launch_keeps_the_steps_exit_code_when_the_step_ends_before_it_is_checked(tmp_path):
    """A CI run saw launch.sh exit 143 after SIGTERM, not 75: the batch shell passed the signal on,
    was descheduled, and the step checkpointed, exited and was reaped before the shell checked
    whether it still ran; the interrupted `wait`'s 143 was taken for the step's code. Made certain
    here: the forwarding sleeps after signalling the step."""
    import signal

    script = tmp_path / "slow_forward.sh"
    script.write_text(
        f"source {SLURM / 'launch.sh'}\n"
        "eval \"$(declare -f _d4_forward | sed '1s/_d4_forward/_d4_forward_now/')\"\n"
        "_d4_forward() { _d4_forward_now; sleep 0.5; }\n"
        "_d4_step srun stage\n"
        "echo 'not reached' >&2\n"
    )
    _, p = _start_with_fake_slurm(tmp_path, script)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=20)[1]
    assert p.returncode == 75 and "not reached" not in err, (p.returncode, err)


@pytest.mark.parametrize("saved", [True, False])
def test_launch_requeues_when_a_task_saved_though_srun_killed_the_others(tmp_path, saved):
    """A real-Slurm run (tests/test_slurm.py) failed once: after SIGUSR1 both tasks saved their
    checkpoint, task 1 exited 75, and srun's --kill-on-bad-exit killed task 0 before it exited 75,
    so the step's status was neither 0 nor 75 and launch.sh did not requeue. A task that saved now
    writes launch.sh's mark (dreamer4/cli.py), which counts as the step's 75. Without the mark a
    status of 143 is still a failed step: no requeue, the status passed on."""
    import signal

    mark_then = (
        'mkdir -p "$(dirname "$DREAMER4_PREEMPT_MARK")"; echo saved > "$DREAMER4_PREEMPT_MARK"; ' if saved else ""
    )
    record, p = _start_with_fake_slurm(tmp_path, SLURM / "pipeline.sbatch", f"{mark_then}exit 143")
    p.send_signal(signal.SIGUSR1)
    err = p.communicate(timeout=20)[1]
    calls = record.read_text().splitlines()
    assert len([c for c in calls if c.startswith("srun")]) == 1
    if saved:
        assert p.returncode == 75, err
        assert "ended with status 143 after a task reported its checkpoint saved" in err
        assert calls[-1] == "scontrol requeue 777" and "requeueing job 777" in err
        assert (tmp_path / "run" / ".preempted-job777").read_text() == "saved\n"
    else:
        assert p.returncode == 143, err
        assert not [c for c in calls if c.startswith("scontrol")]


def test_a_preempted_command_writes_the_launchers_mark(tmp_path, monkeypatch):
    """`dreamer4 ...` stopped by a signal with everything saved exits 75 and, where slurm/launch.sh
    set DREAMER4_PREEMPT_MARK, writes that file first (its directory created); other exits do not."""
    from dreamer4 import cli
    from dreamer4.runtime.preempt import Preempted

    def stop(args):
        raise Preempted("tokenizer", "SIGUSR1", step=4, saved="checkpoint 4 saved")

    commands = (
        cli.Command("stops", "raises Preempted", lambda p: None, stop, preemptible=True),
        cli.Command("fails", "exits 2", lambda p: None, lambda a: 2, preemptible=True),
    )
    monkeypatch.setattr(cli, "COMMANDS", commands)
    mark = tmp_path / "run" / ".preempted-job1"
    monkeypatch.setenv("DREAMER4_PREEMPT_MARK", str(mark))
    assert cli.main(["fails"]) == 2 and not mark.exists()
    assert cli.main(["stops"]) == 75
    assert "[tokenizer] stopped by SIGUSR1 at step 4; checkpoint 4 saved" in mark.read_text()
    monkeypatch.delenv("DREAMER4_PREEMPT_MARK")
    mark.unlink()
    assert cli.main(["stops"]) == 75 and not mark.exists()  # outside launch.sh: no file


def test_sbatch_scripts_ask_for_a_warning_and_requeue():
    for p in SCRIPTS:
        text = p.read_text()
        long_running = p.name not in ("dream.sbatch", "evaluate.sbatch")
        for directive in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
            assert (directive in text) == long_running, (p.name, directive)

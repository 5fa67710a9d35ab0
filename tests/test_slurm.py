"""The project's own slurm/*.sbatch scripts, unchanged, under a real single-node Slurm.

tests/slurm_cluster.py brings up munged + slurmctld + slurmd on 127.0.0.1 (root and Debian's
slurm-wlm/munge needed; otherwise these tests skip and say why) with two stand-in GPUs, and stops
them by their pids afterwards. Jobs are submitted as a user would (`sbatch --gpus-per-node=2
--cpus-per-gpu=1 slurm/X.sbatch`), differing only by environment variables: the tiny preset
with the test sizes, CPU (2 fake devices per task, fsdp over all 4), this interpreter and source
tree. Each job is 2 tasks = 2 JAX processes (slurm/launch.sh, JAX's Slurm detection):

1. collect: 2 writers fill one dataset, which verifies;
2. train-tokenizer: mid-training the batch shell gets SIGUSR1 (`scancel --signal=USR1 --batch`, as
   Slurm sends it before the time limit with `--signal=B:USR1@300`); launch.sh forwards it, both
   processes checkpoint the same step and exit 75, the job requeues itself and the rerun (the same
   job, Restarts=1; it starts by itself a few seconds later: the test cluster's credentials expire
   after 5 s, where Slurm's default makes a requeued job wait two minutes) resumes there and
   finishes. Every step's loss equals an uninterrupted 1-process run of the same config on the
   same dataset;
3. train-dynamics on that tokenizer, 2 tasks, the config of tests/test_multihost.py's 2-process
   job (4 steps, a small evaluation): it runs to the end (its losses equal 1 process's there).
The jobs poll `scontrol show job` every 0.2 s instead of `sbatch --wait` (which polls at up to
10 s intervals and would add that much per job).
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TEST_OVERRIDES, TOK_OVERRIDES, make_test_config, xla_flags
from slurm_cluster import SlurmCluster, SlurmUnavailable, why_unavailable
from test_multihost import SETS as MULTIHOST_SETS

from dreamer4.data.store import verify
from dreamer4.runtime.logging import read_metrics
from dreamer4.tokenizer.train import train_tokenizer

pytestmark = pytest.mark.slow

TOK_STEPS = 20
# Collection with the registered policies only (the test-only framehash policy is not in `dreamer4`).
SETS = [o for o in TEST_OVERRIDES if not o.startswith("collect.policy")] + ["collect.policy=random"]
TOK_SETS = TOK_OVERRIDES + [
    f"tokenizer.train.steps={TOK_STEPS}",
    "tokenizer.train.log_every=1",
    "tokenizer.train.ckpt_every=1000",  # no regular checkpoint: the signal's is the only one before the end
    "tokenizer.eval_episodes=1",
]
# The dynamics of tests/test_multihost.py's 2-process job, on the same 2 x 2 devices with fsdp over
# all 4 (JOB_ENV): the same compiled programs, so this job finds them in the compilation cache that
# job filled (only process 0 of a job writes it; both read it) when that module has finished first
# (conftest queues it first; under `pytest -n 2` the two may overlap, and then this job compiles).
DYN_SETS = [kv for kv in MULTIHOST_SETS if kv != "--set" and not kv.startswith("collect.policy")]
JOB_ENV = {"XLA_FLAGS": xla_flags(2), "FSDP": "4"}
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = why_unavailable()
    if why:
        pytest.skip(why)
    try:
        c = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as e:
        pytest.skip(f"no test Slurm: {e}")
    try:
        yield c
    finally:
        c.stop()


def submit(cluster: SlurmCluster, script: str, base: Path, sets: list[str]) -> str:
    env = cluster.env(
        CONFIG="configs/tiny.yaml",
        RUN=base / "run",
        DATA=base / "dataset",
        SETS=" ".join(sets),
        PYTHON=sys.executable,
        PYTHONPATH=REPO,
        DREAMER4_REPO=REPO,
        JAX_PLATFORMS="cpu",
        DREAMER4_JAX_CACHE=os.environ["DREAMER4_JAX_CACHE"],
        WANDB_MODE="disabled",
        **JOB_ENV,
    )
    argv = ["sbatch", "--parsable", "--gpus-per-node=2", "--cpus-per-gpu=1", str(REPO / "slurm" / script)]
    return cluster.run(*argv, cwd=base, env=env).stdout.strip().split(";")[0]


def wait(cluster: SlurmCluster, job: str, timeout: float = 400, each=None) -> list[str]:
    """Poll the job's state (every 0.5 s) until it ends; `each(state)` runs every 0.1 s with the last
    state seen. Returns the states seen."""
    states, deadline, polled = [], time.time() + timeout, 0.0
    while time.time() < deadline:
        if time.time() - polled >= 0.5:
            st, polled = cluster.job_state(job), time.time()
            if not states or states[-1] != st:
                states.append(st)
            if st in DONE:
                return states
        if each:
            each(states[-1])
        time.sleep(0.1)
    cluster.run("scancel", job, check=False)
    raise AssertionError(f"job {job} did not end in {timeout} s (states {states})")


def log_of(base: Path, name: str, job: str) -> str:
    return (base / f"slurm-{name}-{job}.out").read_text()


def job_field(cluster: SlurmCluster, job: str, key: str) -> str:
    out = cluster.run("scontrol", "-o", "show", "job", job).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)[key]


def test_collect_tokenizer_dynamics_as_two_task_jobs_with_a_requeue(cluster, tmp_path):
    base = tmp_path
    t0 = time.time()
    # 1. collect: two writers
    job = submit(cluster, "collect.sbatch", base, SETS)
    states = wait(cluster, job)
    log = log_of(base, "d4-collect", job)
    assert states[-1] == "COMPLETED", log[-3000:]
    assert "2 processes" in log and "writer 0:" in log and "writer 1:" in log
    data = base / "dataset"
    assert verify(data) == ([], [])
    m = json.loads((data / "manifest.json").read_text())
    assert m["num_writers"] == 2 and {s["writer"] for s in m["shards"]} == {0, 1}
    # writer ids came from the process index (no --writer-id given): disjoint, prefixed shards
    by_writer = {w: [s["name"] for s in m["shards"] if s["writer"] == w] for w in (0, 1)}
    assert not set(by_writer[0]) & set(by_writer[1])
    assert all(n.startswith(f"w{w:03d}-") for w, names in by_writer.items() for n in names)
    assert m["writers"]["0"]["complete"] and m["writers"]["1"]["complete"]
    ids = [e["id"] for s in m["shards"] for e in s["episodes"]]
    assert len(ids) == len(set(ids)) == 8  # collect.num_episodes of the test config
    t_collect = time.time() - t0

    # 2. tokenizer: SIGUSR1 to the batch shell mid-training -> checkpoint, exit 75, requeue, resume
    job = submit(cluster, "train_tokenizer.sbatch", base, SETS + TOK_SETS)
    metrics = base / "run" / "tokenizer" / "metrics.jsonl"
    sent = []

    def signal_mid_training(state):
        steps = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if not sent and state == "RUNNING" and steps >= 3:
            cluster.run("scancel", "--signal=USR1", "--batch", job)
            sent.append(steps)

    states = wait(cluster, job, each=signal_mid_training)
    log = log_of(base, "d4-tokenizer", job)
    assert states[-1] == "COMPLETED" and "PENDING" in states[1:], (states, log[-3000:])
    assert job_field(cluster, job, "Restarts") == "1"
    assert "launch.sh: SIGUSR1 received" in log and f"launch.sh: requeueing job {job}" in log
    stop = int(log.split("[tokenizer] stopped by SIGUSR1 at step ")[1].split(";")[0])
    assert sent[0] <= stop < TOK_STEPS
    assert f"checkpoint {stop} saved" in log and f"resumed from checkpoint step {stop} " in log
    assert "Exited with exit code 75" in log  # both tasks
    ckpts = sorted(int(p.name) for p in (base / "run" / "tokenizer" / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == [stop, TOK_STEPS]
    got = {r["step"]: r["loss"] for r in read_metrics(base / "run" / "tokenizer") if "loss" in r}
    assert sorted(got) == list(range(1, TOK_STEPS + 1))  # no step lost or repeated across the requeue
    t_tok = time.time() - t0 - t_collect

    # 3. dynamics on that tokenizer (submitted first: the reference below runs while its tasks start)
    job = submit(cluster, "train_dynamics.sbatch", base, SETS + DYN_SETS)

    # the same tokenizer config in one process, uninterrupted, on the same dataset
    ref_run = base / "ref"
    train_tokenizer(make_test_config(TOK_SETS), data, ref_run)
    ref = {r["step"]: r["loss"] for r in read_metrics(ref_run / "tokenizer") if "loss" in r}
    assert sorted(ref) == sorted(got)
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-4, abs=1e-6), (s, got[s], ref[s])
    assert len({round(v, 6) for v in ref.values()}) > TOK_STEPS // 2  # the losses move

    states = wait(cluster, job)
    log = log_of(base, "d4-dynamics", job)
    assert states[-1] == "COMPLETED", log[-3000:]
    assert "[dynamics] mesh data=1 x fsdp=4 over 2 process(es)" in log
    assert (base / "run" / "dynamics" / "eval.json").exists()
    steps = [r["step"] for r in read_metrics(base / "run" / "dynamics") if "loss" in r]
    assert steps and max(steps) == 4
    t_dyn = time.time() - t0 - t_collect - t_tok
    print(f"slurm jobs: collect {t_collect:.0f}s, tokenizer {t_tok:.0f}s, dynamics (+ reference) {t_dyn:.0f}s")

"""Preemption and the one-writer lock (runtime/preempt.py, runtime/lock.py), one test per loop kind.

* the signal handlers: first signal recorded, repeats ignored, a second Ctrl-C stops at once;
* the shared train loop (tokenizer here; dynamics and both agent phases run the same loop): a
  SIGUSR1 at step 10 checkpoints step 10 (not a checkpoint step) with the data position and raises
  `Preempted`; the rerun's losses equal an uninterrupted run's at every logged step;
* collection: a SIGINT (Ctrl-C) after the 7th chunk commits the finished episodes and stops; the
  rerun completes a dataset with the same episodes as an uninterrupted collection;
* (PPO's host loop: tests/test_behavior.py's `trained_ppo` is stopped by a SIGUSR1);
* agreement: two processes, the signal sent to one of them while they are at different steps,
  stop at the same step; both stop with the same sentence when another job holds their lock;
* the lock: a second `train-tokenizer` on the same run exits 2 with one sentence naming the lock
  and its holder; after a SIGKILL of the first, the next run takes the stale lock over.
The Slurm path (sbatch scripts, forwarding, requeue) is tests/test_slurm.py.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, TEST_OVERRIDES, TOK_OVERRIDES, make_test_config

from dreamer4.data.collect import ROW_FIELDS, collect
from dreamer4.data.store import Dataset, read_manifest, verify
from dreamer4.runtime import preempt, train_loop
from dreamer4.runtime.checkpoint import checkpoint_steps, read_meta
from dreamer4.runtime.host_loop import HostLoop
from dreamer4.runtime.logging import read_metrics
from dreamer4.runtime.preempt import Preempted
from dreamer4.tokenizer.train import train_tokenizer


def signal_at(step: int, sig=signal.SIGUSR1):
    """A HostLoop that sends `sig` to this process when step `step` is recorded (deterministic)."""

    class Signalling(HostLoop):
        def record(self, s, metrics):
            if s == step:
                signal.raise_signal(sig)
            super().record(s, metrics)

    return Signalling


def test_handlers_record_the_first_signal_and_restore_the_old_ones():
    before = signal.getsignal(signal.SIGTERM)
    with preempt.handling():
        assert preempt.requested() is None
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGUSR1)  # a repeat of any kind is ignored
        assert preempt.requested() == "SIGTERM" and preempt.agreed_stop() == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # ... except a second Ctrl-C, which stops at once
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == before and preempt.requested() is None


def test_train_loop_checkpoints_at_the_signal_and_resumes_exactly(dataset, trained_tokenizer, tmp_path, monkeypatch):
    root, _ = dataset
    cfg = make_test_config(TOK_OVERRIDES + ["tokenizer.train.steps=24"])  # as trained_tokenizer (reference)
    run = tmp_path / "run"
    monkeypatch.setattr(train_loop, "HostLoop", signal_at(10))
    with preempt.handling(), pytest.raises(Preempted) as e:
        train_tokenizer(cfg, root, run)
    assert (e.value.step, e.value.signal_name) == (10, "SIGUSR1")
    assert "stopped by SIGUSR1 at step 10; checkpoint 10 saved" in str(e.value)
    ckpts = run / "tokenizer" / "checkpoints"
    assert checkpoint_steps(ckpts) == [4, 8, 10]  # 10 is no checkpoint step (ckpt_every 4): the signal's
    assert json.loads(read_meta(ckpts, 10)["data_state"])  # the loader's position is saved with it
    assert not (run / "tokenizer" / "lock").read_text()  # released on the way out

    monkeypatch.setattr(train_loop, "HostLoop", HostLoop)
    with preempt.handling():
        train_tokenizer(cfg, root, run)
    ref = {r["step"]: r["loss"] for r in read_metrics(trained_tokenizer[0] / "tokenizer") if "loss" in r}
    got = {r["step"]: r["loss"] for r in read_metrics(run / "tokenizer") if "loss" in r}
    assert sorted(got) == sorted(ref) == list(range(2, 25, 2))  # no step logged twice
    for s in ref:  # the interrupted-and-resumed run equals the uninterrupted one at every logged step
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-7), (s, got[s], ref[s])


def _episodes(root):
    ds = Dataset.open(root, hide_unlabeled_actions=False)
    return {e.id: ds.read(e, 0, e.length, ROW_FIELDS) for e in ds.episodes}


def test_collection_commits_and_stops_at_the_signal(dataset, cfg, tmp_path):
    ref_root, _ = dataset
    out = tmp_path / "ds"
    chunks = []

    def sink(rows):  # called once per chunk as it leaves the device
        chunks.append(1)
        if len(chunks) == 7:  # chunk 7 of this seed ends one episode (112 rows): pending, not committed
            signal.raise_signal(signal.SIGINT)  # Ctrl-C

    with preempt.handling(), pytest.raises(Preempted) as e:
        collect(cfg, out, log=lambda *a: None, row_sink=sink)
    assert e.value.signal_name == "SIGINT" and "committed" in str(e.value)
    m = read_manifest(out)
    assert not m["writers"]["0"]["complete"]
    sizes = [s["num_frames"] for s in m["shards"]]
    assert len(sizes) == 3 and sizes[-1] < cfg.collect.shard_frames  # the finished episode, committed early
    with preempt.handling():
        summary = collect(cfg, out, log=lambda *a: None)
    assert summary["complete"] and verify(out) == ([], [])
    # the same episodes (frames, actions, rewards, flags), labels and split as an uninterrupted run
    got, ref = _episodes(out), _episodes(ref_root)
    assert got.keys() == ref.keys()
    for k in ref:
        for f in ROW_FIELDS:
            assert got[k][f].tobytes() == ref[k][f].tobytes(), (k, f)
    meta = lambda r: [
        {k: v for k, v in e.items() if k != "start"} for s in read_manifest(r)["shards"] for e in s["episodes"]
    ]
    assert meta(out) == meta(ref_root)


AGREE = r"""
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from dreamer4.runtime import distributed, lock, preempt
from dreamer4.runtime.faults import StageLockedError
pid = int(sys.argv[1])
distributed.initialize("127.0.0.1:" + sys.argv[2], 2, pid)
with preempt.handling():
    for step in range(1, 200):
        if pid == 1 and step == 5:
            os.kill(os.getpid(), signal.SIGUSR1)  # only process 1 hears it
        time.sleep(0.01 if pid == 1 else 0.03)  # different paces; the check lines them up
        if preempt.agreed_stop():
            print("stopped at", step, "heard", preempt.requested(), flush=True)
            break
try:  # the job's lock: process 0 asks, process 1 hears the answer
    with lock.stage_lock(sys.argv[3], "tokenizer", log=print):
        print("locked", flush=True)
except StageLockedError as e:
    print("refused:", e, flush=True)
"""


def test_processes_agree_on_the_stop_step_and_share_the_lock(tmp_path):
    from test_multihost import free_port

    from dreamer4.runtime.lock import _Lock

    held = _Lock(tmp_path / "lock", "tokenizer", print)  # another job holds the stage
    held.acquire()
    port = str(free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("SLURM_JOB_ID", None)
    code = AGREE.format(repo=str(REPO))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(i), port, str(tmp_path / "lock")],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    held.release()
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = [next(line for line in o.splitlines() if line.startswith("stopped")) for o in outs]
    assert lines[0].split()[2] == lines[1].split()[2] == "5"  # the same step on both
    assert lines[0].endswith("heard None") and lines[1].endswith("heard SIGUSR1")
    refusals = [next(line for line in o.splitlines() if line.startswith(("refused", "locked"))) for o in outs]
    assert refusals[0] == refusals[1] and f"is held by pid {os.getpid()} on host" in refusals[0]


def _tok_cli(data, run, extra=()):
    args = [sys.executable, "-m", "dreamer4.cli", "train-tokenizer", "--config", "configs/tiny.yaml"]
    for o in TEST_OVERRIDES + TOK_OVERRIDES + list(extra):
        if not o.startswith("collect.policy"):
            args += ["--set", o]
    return args + ["--data", str(data), "--run", str(run)]


@pytest.mark.slow
def test_second_job_on_a_stage_is_refused_and_a_killed_ones_lock_is_taken_over(dataset, tmp_path, capsys):
    root, _ = dataset
    run = tmp_path / "run"
    lock = run / "tokenizer" / "lock"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = subprocess.Popen(
        _tok_cli(root, run, ["tokenizer.train.steps=100000"]), cwd=REPO, env=env, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 300
        while not (lock.exists() and lock.read_text()):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        second = subprocess.run(_tok_cli(root, run), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert first.poll() is None  # the first still holds it
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2, second.stdout + second.stderr
    err = second.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error: tokenizer: ") and str(lock) in err
    assert f"held by pid {first.pid} on host " in err and "another job is already working on this stage" in err
    assert json.loads(lock.read_text())["pid"] == first.pid  # the killed job's description stays behind
    # the next run takes the stale lock over, says whose it was, trains, and clears it on the way out
    with preempt.handling():
        train_tokenizer(make_test_config(TOK_OVERRIDES + ["tokenizer.train.steps=2"]), root, run)
    out = capsys.readouterr().out
    assert f"{lock} was left by pid {first.pid} on host " in out and "which is gone; taking it over" in out
    assert not lock.read_text()
    rows = [r for r in read_metrics(run / "tokenizer") if "loss" in r]
    assert rows and np.isfinite(rows[-1]["loss"])

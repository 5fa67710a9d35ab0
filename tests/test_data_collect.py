"""The data stage end to end on real Craftax: round trip, step convention, resume, writers, damage."""

import json
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest
from conftest import TEST_OVERRIDES, cli_subprocess, make_test_config
from framehash_policy import framehash_action

from dreamer4.data import store
from dreamer4.data.collect import ROW_FIELDS, build_stepper, collect
from dreamer4.data.loader import WindowSource
from dreamer4.data.store import Dataset, DatasetError, verify


def _episodes_from_raw(raw, num_envs):
    """Independent re-cut of the device's raw rows into finished episodes, in completion order."""
    streams = {k: np.concatenate([r[k] for r in raw]) for k in ROW_FIELDS}  # (T_total, N, ...)
    found = []
    for n in range(num_envs):
        start = None
        for t in range(streams["is_first"].shape[0]):
            if streams["is_first"][t, n]:
                start = t
            if streams["is_last"][t, n] and start is not None:
                found.append((t, n, {k: v[start : t + 1, n] for k, v in streams.items()}))
                start = None
    found.sort(key=lambda x: (x[0], x[1]))
    return [ep for _, _, ep in found]


def _read_all(ds, ep):
    return ds.read(ep, 0, ep.length, ROW_FIELDS)


def test_round_trip_equals_what_the_env_produced(dataset, cfg):
    root, raw = dataset
    ds = Dataset.open(root, env_name="classic", hide_unlabeled_actions=False)
    expected = _episodes_from_raw(raw, cfg.collect.num_envs)[: cfg.collect.num_episodes]
    assert len(ds.episodes) == cfg.collect.num_episodes == len(expected)
    for ep, exp in zip(ds.episodes, expected):
        got = _read_all(ds, ep)
        for k in ROW_FIELDS:
            np.testing.assert_array_equal(got[k], exp[k], err_msg=f"{ep.id} field {k}")
        assert ep.ret == pytest.approx(float(exp["reward"][1:].sum()), abs=1e-5)
    assert ds.frame_shape == (63, 63, 3)
    assert verify(root) == ([], [])


def test_step_convention(dataset):
    root, _ = dataset
    ds = Dataset.open(root, hide_unlabeled_actions=False)
    names = ds.achievement_names
    unlocks = 0
    for ep in ds.episodes:
        r = _read_all(ds, ep)
        # exactly one first row (row 0) and one last row (the final one)
        assert r["is_first"][0] and r["is_first"].sum() == 1
        assert r["is_last"][-1] and r["is_last"].sum() == 1
        assert not r["is_terminal"][:-1].any()
        # no action led into the first frame; no reward was received there
        assert r["action"][0] == -1 and r["reward"][0] == 0 and not r["achievements"][0].any()
        # action_t is what the policy chose while frame_{t-1} was shown, i.e. it led INTO frame_t
        chosen = np.asarray(framehash_action(r["frame"][:-1], ds.num_actions))
        np.testing.assert_array_equal(r["action"][1:], chosen, err_msg=ep.id)
        # reward_t is received on arriving at frame_t: Craftax pays +1 per unlock plus 0.1 x the
        # health change (|change| <= 9), so reward_t - unlocks_t stays within 0.9 on every row;
        # a reward shifted by one row would break this at each unlock.
        unlocks += int(r["achievements"].sum())
        assert np.all(np.abs(r["reward"] - r["achievements"].sum(1)) < 0.95), ep.id
        # an achievement unlocks at most once per episode, and the manifest agrees
        assert r["achievements"].sum(0).max() <= 1
        assert set(ep.achievements) == {names[i] for i in np.flatnonzero(r["achievements"].any(0))}
        # terminal frames are deaths (time limit is 10000 steps)
        assert r["is_terminal"][-1] == (len(r["frame"]) < 10000)
    assert unlocks > 0


def test_labels_and_split(dataset, cfg):
    root, _ = dataset
    ds = Dataset.open(root)
    train, evals = ds.split("train"), ds.split("eval")
    assert len(evals) == 2  # eval_fraction 0.25 of 8, exact by stratified picking
    assert all(e.labeled for e in evals)
    assert sum(e.labeled for e in train) == 3  # labeled_fraction 0.5 of 6 train episodes
    m = json.loads((root / "manifest.json").read_text())
    assert m["labeled_fraction"] == 0.5 and m["behavior_policy"] == "framehash:none"
    assert (root / "config.yaml").exists()


def test_loader_masks_unlabeled_actions_and_never_reads_them(dataset, cfg, monkeypatch):
    root, _ = dataset
    src = WindowSource(root, "train", seq_len=8, stride=4, env_name="classic")
    raw_ds = Dataset.open(root, hide_unlabeled_actions=False)
    reads = []
    orig = Dataset.read

    def spy(self, ep, a, b, fields):
        reads.append((ep.labeled, fields))
        return orig(self, ep, a, b, fields)

    monkeypatch.setattr(Dataset, "read", spy)
    seen_labeled = seen_unlabeled = 0
    for i in range(len(src)):
        rec = src[i]
        ei, start = src.windows[i]
        ep = src.episodes[ei]
        stored = orig(raw_ds, ep, start, start + 8, ("action", "is_first"))
        if ep.labeled:
            seen_labeled += 1
            want = np.where(stored["is_first"], -1, stored["action"])
            np.testing.assert_array_equal(rec["actions"], want)
            np.testing.assert_array_equal(rec["action_mask"], ~stored["is_first"])
        else:
            seen_unlabeled += 1
            assert (rec["actions"] == -1).all() and not rec["action_mask"].any()
        # windows never cross an episode: a first row can only be row 0, a last row only the end
        assert not rec["is_first"][1:].any() and not rec["is_last"][:-1].any()
    assert seen_labeled and seen_unlabeled
    # the reader's own copy of the actions holds -1 for unlabeled episodes
    for ep in src.episodes:
        a = orig(src.ds, ep, 0, ep.length, ("action",))["action"]
        assert (a == -1).all() == (not ep.labeled)
    assert all("action" not in fields for labeled, fields in reads if not labeled)


def test_bad_inputs_are_clear_errors(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(DatasetError, match="does not exist"):
        Dataset.open(tmp_path / "nope")
    with pytest.raises(DatasetError, match=r"not a dreamer4 dataset: .*manifest.json is missing"):
        Dataset.open(tmp_path)
    with pytest.raises(DatasetError, match=r"holds Craftax-Classic-Pixels-v1 episodes .* env.name='full'"):
        Dataset.open(root, env_name="full")
    empty = tmp_path / "empty"
    empty.mkdir()
    m = json.loads((root / "manifest.json").read_text())
    m["shards"] = []
    (empty / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="no committed episodes"):
        Dataset.open(empty)
    with pytest.raises(DatasetError, match="seq_len=100000"):
        WindowSource(root, "train", seq_len=100000, stride=1)
    # a second collect into the same dir with another seed is refused, naming the key
    with pytest.raises(DatasetError, match=r"created with seed=7.*seed=8"):
        collect(make_test_config(["seed=8"]), root, log=lambda *a: None)


def _copy(root, dst):
    shutil.copytree(root, dst)
    return dst


def test_damaged_and_truncated_shards_are_named(dataset, tmp_path):
    root, _ = dataset
    bad = _copy(root, tmp_path / "bad")
    name = Dataset.open(bad).episodes[0].shard
    shard_file = bad / "shards" / name / "frame" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    problems, _ = verify(bad)
    assert problems and all(name in p for p in problems), problems
    ds = Dataset.open(bad)
    with pytest.raises(DatasetError, match=f"shard {name}: array 'frame'"):
        # the corrupted byte is in the middle of the shard; read all of the shard's episodes
        for e in [e for e in ds.episodes if e.shard == name]:
            ds.read(e, 0, e.length, ("frame",))

    trunc = _copy(root, tmp_path / "trunc")
    reward_file = trunc / "shards" / name / "reward" / "c" / "0"
    reward_file.write_bytes(reward_file.read_bytes()[:-20])
    problems, _ = verify(trunc)
    assert any(name in p and "reward" in p for p in problems), problems


def test_uncommitted_shard_is_ignored_and_reported(dataset, tmp_path):
    root, _ = dataset
    d = _copy(root, tmp_path / "left")
    shutil.copytree(d / "shards" / "w000-s000000", d / "shards" / "w000-s000099")
    problems, notes = verify(d)
    assert problems == [] and any("w000-s000099" in n for n in notes)
    assert all(e.shard != "w000-s000099" for e in Dataset.open(d).episodes)


def _frames_by_episode(root):
    ds = Dataset.open(root, hide_unlabeled_actions=False)
    return {e.id: _read_all(ds, e) for e in ds.episodes}


def _assert_same_dataset(a, b):
    fa, fb = _frames_by_episode(a), _frames_by_episode(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        for f in ROW_FIELDS:
            assert fa[k][f].tobytes() == fb[k][f].tobytes(), (k, f)
    ma, mb = (json.loads((r / "manifest.json").read_text()) for r in (a, b))
    assert [e for s in ma["shards"] for e in s["episodes"]] == [e for s in mb["shards"] for e in s["episodes"]]


def test_stop_after_seconds_with_a_prebuilt_stepper(dataset, cfg, tmp_path):
    """collect(stop_after_s=, stepper=) (the GPU suite's timed collection): it stops after the time
    given, committing the episodes finished by then, reuses the stepper's compiled chunk, and a
    rerun completes the dataset with the episodes of an uninterrupted run."""
    root, _ = dataset
    stepper = build_stepper(cfg, 0)
    out = tmp_path / "timed"
    s = collect(cfg, out, log=lambda *a: None, stop_after_s=0.0, stepper=stepper)
    c = cfg.collect
    assert not s["complete"] and s["new_steps"] == c.num_envs * c.chunk_steps  # one chunk, then stop
    m = store.read_manifest(out)
    assert s["episodes"] == sum(len(sh["episodes"]) for sh in m["shards"]) < c.num_episodes
    with pytest.raises(ValueError, match="another config"):
        collect(make_test_config(["seed=8"]), tmp_path / "other", log=lambda *a: None, stepper=stepper)
    assert collect(cfg, out, log=lambda *a: None, stepper=stepper)["complete"]
    fa, fb = _frames_by_episode(root), _frames_by_episode(out)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert all(fa[k][f].tobytes() == fb[k][f].tobytes() for f in ROW_FIELDS), k
    strip = lambda r: [
        {k: v for k, v in e.items() if k != "start"} for s in store.read_manifest(r)["shards"] for e in s["episodes"]
    ]  # noqa: E731
    assert strip(root) == strip(out)
    # chunk ran from init's carry, then from its own: one compilation (init returns strong types)
    assert stepper.chunk_fn._cache_size() == 1


def _manifest_shards(root):
    return store.read_manifest(root)["shards"]


def test_commits_in_flight_write_the_same_dataset_and_fail_in_order(dataset, cfg, tmp_path, monkeypatch):
    """Commits at once (collect.commits_in_flight: the fixture's default 2, here 3 with the rows
    copied through pinned host memory, then 1) write the same dataset, shard for shard; a failed
    commit stops the run, and no later shard enters the manifest or leaves a resume state, even
    one written meanwhile; a rerun with another setting (not a data key) continues it."""
    import threading

    from dreamer4.data import collect as collect_mod

    root, _ = dataset
    stepper = build_stepper(cfg, 0)
    real_write, lock, active, most, fail_at = store.write_shard, threading.Lock(), [0], [0], [None]
    started = []

    def slow_write(root_, name, arrays, **kw):  # slower than a chunk: commits pile up
        with lock:
            started.append(name)
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.3)
            if name == fail_at[0]:
                raise OSError(f"injected failure writing {name}")
            return real_write(root_, name, arrays, **kw)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(collect_mod.store, "write_shard", slow_write)
    # ...and the rows reach the host through pinned host memory (collect.host_copy), not a data key
    real_copy, kinds = collect_mod._with_host_copy, set()

    def spy_copy(out_, mode="async"):
        carry, rows = real_copy(out_, mode)
        kinds.update(x.sharding.memory_kind for x in jax.tree.leaves(rows))
        return carry, rows

    monkeypatch.setattr(collect_mod, "_with_host_copy", spy_copy)
    three = make_test_config(["collect.commits_in_flight=3", "collect.host_copy=pinned"])
    out = tmp_path / "three"
    collect(three, out, log=lambda *a: None, stepper=stepper)
    assert kinds == {"pinned_host"}
    assert most[0] >= 2  # commits did run at once
    assert len(_manifest_shards(root)) >= 4
    assert _manifest_shards(out) == _manifest_shards(root)  # names, frames, digests, episodes, labels
    _assert_same_dataset(root, out)

    out, most[0] = tmp_path / "failed", 0
    fail_at[0] = store.shard_name(0, 1)
    started.clear()
    with pytest.raises(OSError, match="injected failure writing w000-s000001"):
        collect(three, out, log=lambda *a: None, stepper=stepper)
    assert most[0] >= 2 and store.shard_name(0, 2) in started  # shard 2 was written meanwhile
    assert [s["name"] for s in _manifest_shards(out)] == [store.shard_name(0, 0)]
    assert sorted(p.name for p in (out / "collector" / "w000").glob("state-*")) == ["state-000001.pkl.zp"]
    fail_at[0] = None
    one = make_test_config(["collect.commits_in_flight=1"])
    collect(one, out, log=lambda *a: None, stepper=stepper)  # one at a time: the dataset's header agrees
    assert verify(out) == ([], [])
    assert _manifest_shards(out) == _manifest_shards(root)
    _assert_same_dataset(root, out)


def test_resume_after_sigkill_is_byte_identical(dataset, tmp_path):
    root, _ = dataset
    out = tmp_path / "killed"
    args = ["collect", "--config", "configs/tiny.yaml", "--out", str(out)]
    for o in TEST_OVERRIDES:
        args += ["--set", o]
    repo = os.path.dirname(os.path.dirname(__file__))
    proc = cli_subprocess(args, cwd=repo)
    # wait for the first committed shard, then kill while the next one is being collected
    deadline = time.time() + 300
    while time.time() < deadline:
        m = store.read_manifest(out) if (out / "manifest.json").exists() else None
        if m and m["shards"]:
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    m = store.read_manifest(out)
    assert 1 <= len(m["shards"]) and not m["writers"]["0"]["complete"]
    # simulate the worst moment too: a half-written next shard left on disk
    (out / "shards" / store.shard_name(0, len(m["shards"])) / "frame").mkdir(parents=True, exist_ok=True)
    proc = cli_subprocess(args, cwd=repo)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log
    assert "resuming after" in log
    assert re.search(r"replayed \d+ chunks: [1-9]\d* running episodes restored", log), log  # rows made again
    assert verify(out) == ([], [])
    _assert_same_dataset(root, out)
    # a third run finds the work done
    proc = cli_subprocess(args, cwd=repo)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0 and "already complete" in log, log


def test_two_concurrent_writers_fill_one_dataset(tmp_path):
    out = tmp_path / "two"
    repo = os.path.dirname(os.path.dirname(__file__))
    procs = []
    for w in range(2):
        args = [
            "collect",
            "--config",
            "configs/tiny.yaml",
            "--out",
            str(out),
            "--writer-id",
            str(w),
            "--num-writers",
            "2",
        ]
        for o in TEST_OVERRIDES:
            args += ["--set", o]
        procs.append(cli_subprocess(args, cwd=repo))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    m = store.read_manifest(out)
    names = [s["name"] for s in m["shards"]]
    assert len(names) == len(set(names))
    assert {s["writer"] for s in m["shards"]} == {0, 1}
    assert all(s["name"].startswith(f"w{s['writer']:03d}-") for s in m["shards"])
    assert sum(len(s["episodes"]) for s in m["shards"]) == 8
    assert m["writers"]["0"]["complete"] and m["writers"]["1"]["complete"]
    assert verify(out) == ([], [])
    ids = [e.id for e in Dataset.open(out).episodes]
    assert len(ids) == len(set(ids)) == 8

"""Faults a user can cause (issue 14), each tried for real: a lost manifest, a damaged newest
checkpoint, a full disk, impossible config values, a refusal that must come before the env is
built, a non-video file, and metrics after a resume."""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, cli_subprocess, make_test_config
from flax import nnx

from dreamer4.config import ConfigError, load_config
from dreamer4.data import collect as collect_mod
from dreamer4.data import resume_state, store
from dreamer4.data.collect import collect
from dreamer4.data.store import DatasetError, rebuild_manifest, verify
from dreamer4.runtime.checkpoint import Checkpointer
from dreamer4.runtime.faults import CheckpointError, DiskFullError
from dreamer4.runtime.logging import MetricLogger, read_metrics
from dreamer4.runtime.train_loop import Stage, train

QUIET = dict(log=lambda *a: None)


def _tree_digest(d: Path) -> dict:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


def _no_env(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the environment was built before the refusal")

    monkeypatch.setattr(collect_mod, "make_env", refuse)


# 1. A directory with shards but no manifest is never overwritten; the manifest can be rebuilt.


def test_lost_manifest_refused_then_rebuilt(dataset, tmp_path, monkeypatch, capsys):
    root, _ = dataset
    d = tmp_path / "ds"
    shutil.copytree(root, d)
    original = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").unlink()
    before = _tree_digest(d / "shards")
    with monkeypatch.context() as mp:
        _no_env(mp)
        with pytest.raises(
            DatasetError,
            match=r"holds \d+ shard group\(s\) .* but no manifest.json; refusing",
        ):
            collect(make_test_config(), d, **QUIET)
        with pytest.raises(DatasetError, match="rebuild-manifest"):  # another seed: same refusal
            collect(make_test_config(["seed=8"]), d, **QUIET)
    assert _tree_digest(d / "shards") == before  # nothing deleted or changed
    # Shards in flight together finish writing in any order (a short last one often first): make
    # their write times run backwards, so that the rebuild must follow the commit order instead.
    for g in store.shard_groups(d):
        group = json.loads((g / "zarr.json").read_text())
        entry = group["attributes"][store.SHARD_ATTR]
        entry["written_at"] = -entry["index"]
        (g / "zarr.json").write_text(json.dumps(group))

    from dreamer4.cli import main

    assert main(["dataset", "rebuild-manifest", str(d)]) == 0
    rebuilt = json.loads((d / "manifest.json").read_text())
    assert rebuilt == original
    assert verify(d) == ([], [])
    # the dataset is whole again: collect finds its work done
    assert collect(make_test_config(), d, **QUIET)["new_steps"] == 0
    # a readable manifest is never replaced
    with pytest.raises(DatasetError, match="nothing to rebuild"):
        rebuild_manifest(d, **QUIET)


def test_shards_without_metadata_can_only_be_moved_aside(dataset, tmp_path):
    root, _ = dataset
    d = tmp_path / "old"
    shutil.copytree(root, d)
    (d / "manifest.json").unlink()
    for g in store.shard_groups(d):  # as written before shards carried their manifest entry
        store.write_group_json(g)
    before = {k: v for k, v in _tree_digest(d / "shards").items() if "/" in k}
    with pytest.raises(DatasetError, match="no shard carries the metadata .* --move-aside"):
        rebuild_manifest(d, **QUIET)
    out = rebuild_manifest(d, move_aside=True, **QUIET)
    moved = {k: v for k, v in _tree_digest(Path(out["to"])).items() if not k.startswith("collector")}
    assert moved == before and store.shard_groups(d) == []  # moved, not deleted
    store.refuse_orphaned_shards(d)  # the directory can be collected into afresh


def test_earlier_sha256_digests_still_verify_and_rebuild(dataset, tmp_path):
    """A dataset written before the XXH3 digests records a sha256 per array under `sha256`, in its
    manifest and in each shard's metadata: it verifies, a wrong digest is caught, and a rebuild
    restores the manifest as it was."""
    root, _ = dataset
    d = tmp_path / "sha"
    shutil.copytree(root, d)
    m = json.loads((d / "manifest.json").read_text())
    for s in m["shards"]:
        arrays = {
            f: store.read_shard_array(store.open_shard_array(d, s["name"], f), s["name"], f) for f in store.FIELD_DTYPES
        }
        del s["digests"]
        s["sha256"] = {f: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for f, a in arrays.items()}
        group = json.loads((store.shard_dir(d, s["name"]) / "zarr.json").read_text())
        entry = group["attributes"][store.SHARD_ATTR]
        entry["sha256"] = s["sha256"]
        del entry["digests"]
        (store.shard_dir(d, s["name"]) / "zarr.json").write_text(json.dumps(group))
    (d / "manifest.json").write_text(json.dumps(m))
    assert verify(d) == ([], [])
    (d / "manifest.json").unlink()
    rebuild_manifest(d, **QUIET)
    assert json.loads((d / "manifest.json").read_text()) == m
    m["shards"][1]["sha256"]["reward"] = hashlib.sha256(b"other").hexdigest()
    (d / "manifest.json").write_text(json.dumps(m))
    problems, _ = verify(d)
    assert problems == [f"shard {m['shards'][1]['name']}: array 'reward' content differs from the manifest's digest"]


def test_rebuild_restores_only_shards_that_read_back_whole_and_verify_names_each_problem(dataset, tmp_path):
    """A rebuild re-reads every shard against the digests in its own attributes: a damaged shard
    and the shards after it (a writer commits in order) stay out, each listed with why; verify
    names each array's problem against the manifest."""
    root, _ = dataset
    d = tmp_path / "damaged"
    shutil.copytree(root, d)
    m = json.loads((d / "manifest.json").read_text())
    names = [s["name"] for s in m["shards"]]
    assert len(names) >= 3 and len({s["writer"] for s in m["shards"]}) == 1, names
    # the manifest claims another row count for shard 0 and another reward digest for shard 1
    m["shards"][0]["num_frames"] += 1
    m["shards"][1]["digests"]["reward"] = store.digest(np.zeros(3, np.float32))
    (d / "manifest.json").write_text(json.dumps(m))
    problems, _ = verify(d)
    n0 = m["shards"][0]["num_frames"]
    assert problems[: len(store.FIELD_DTYPES)] == [
        f"shard {names[0]}: array '{f}' has {n0 - 1} rows, manifest says {n0}" for f in store.FIELD_DTYPES
    ]
    assert f"shard {names[1]}: array 'reward' content differs from the manifest's digest" in problems
    # the shard's own record of its reward digest is wrong too: it cannot be restored
    g = store.shard_dir(d, names[1]) / "zarr.json"
    group = json.loads(g.read_text())
    group["attributes"][store.SHARD_ATTR]["digests"]["reward"] = m["shards"][1]["digests"]["reward"]
    g.write_text(json.dumps(group))
    (d / "manifest.json").unlink()
    # commits logged on top of the lost manifest are not applied to the rebuilt one, but kept
    log = d / store.MANIFEST_LOG
    log.write_text(json.dumps({"shards": m["shards"][1:], "writers": m["writers"]}) + "\n")
    out = rebuild_manifest(d, **QUIET)
    assert not log.exists() and len(list(d.glob(f"{store.MANIFEST_LOG}.orphaned-*"))) == 1
    assert (
        out["shards"] == 1
        and out["skipped"][0] == f"{names[1]}: array 'reward' content differs from its recorded digest"
    )
    w = m["shards"][0]["writer"]
    assert out["skipped"][1:] == [f"{n}: shard index 1 of writer {w} is missing before it" for n in names[2:]]
    assert [s["name"] for s in json.loads((d / "manifest.json").read_text())["shards"]] == names[:1]


# 2. A damaged newest checkpoint: resume from the previous one, move the bad one aside.


class _Counter:
    """Batches x_t = t; the state is the position."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"x": np.full((2, 3), float(self.i), np.float32)}

    def get_state(self):
        return str(self.i).encode()

    def set_state(self, s):
        self.i = int(s.decode())


def _toy_stage(stage_dir, steps, it, seed=0):
    cfg = make_test_config(["runtime.wandb=disabled"])
    tc = cfg.tokenizer.train.__class__(
        steps=steps,
        batch_size=2,
        log_every=1,
        ckpt_every=2,
        warmup_steps=1,
        keep_checkpoints=5,
    )

    def loss_fn(m, batch, key):
        return jnp.mean(m(batch["x"]) ** 2), {}

    return Stage(
        name="toy",
        stage_dir=stage_dir,
        cfg=cfg,
        train=tc,
        model=nnx.Linear(3, 1, rngs=nnx.Rngs(seed)),
        loss_fn=loss_fn,
        make_iterator=lambda: it,
        prepare=lambda b, step: b,
    )


def _steps(d):
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def test_damaged_newest_checkpoint_falls_back(tmp_path, capsys):
    sd = tmp_path / "toy"
    train(_toy_stage(sd, 6, _Counter()))
    ck = sd / "checkpoints"
    assert _steps(ck) == [2, 4, 6]
    victim = max(
        (p for p in (ck / "6" / "state").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    victim.unlink()  # one file missing in the newest step
    it = _Counter()
    train(_toy_stage(sd, 8, it, seed=1))
    out = capsys.readouterr().out
    assert "checkpoint step 6" in out and "is damaged" in out and "resuming from checkpoint step 4" in out, out
    assert it.i == 8  # restored at position 4, then four more batches
    aside = list((sd / "checkpoints-damaged").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("6-")
    assert _steps(ck) == [2, 4, 6, 8]  # step 6 was trained again and saved

    # none restorable: one sentence, nothing moved
    for s in _steps(ck):
        shutil.rmtree(ck / str(s) / "state")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be restored \(newest: step 8"):
        train(_toy_stage(sd, 10, _Counter()))
    assert _steps(ck) == [2, 4, 6, 8]


# 7. metrics.jsonl after a resume: no repeated steps.


def test_metrics_do_not_repeat_steps_after_resume(tmp_path):
    sd = tmp_path / "toy"
    train(_toy_stage(sd, 6, _Counter()))
    # a run killed after logging step 6 but before its checkpoint 6 was written
    shutil.rmtree(sd / "checkpoints" / "6")
    with open(sd / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1')  # and a line cut short by the kill
    train(_toy_stage(sd, 8, _Counter()))
    steps = [m["step"] for m in read_metrics(sd)]
    assert steps == sorted(set(steps)) == list(range(1, 9)), steps


# 3. A full disk: one sentence, partial files removed, a rerun after freeing space finishes.


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for ENOSPC needs root")
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(d)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def _fill(d: Path, leave: int, name: str = "filler") -> Path:
    filler = d / name
    free = shutil.disk_usage(d).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free - leave, 0))
    return filler


def test_disk_full_is_one_sentence_and_rerun_finishes(dataset, small_disk):
    root, _ = dataset
    out = small_disk / "ds"
    filler = _fill(small_disk, 200_000)
    with pytest.raises(DiskFullError) as e:
        collect(make_test_config(), out, **QUIET)
    msg = str(e.value)
    assert msg.startswith(f"no space left on device in {small_disk}") and " needs " in msg, msg
    assert "\n" not in msg
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # partial files removed
    assert verify(out)[0] == []  # what was committed is valid
    filler.unlink()
    collect(make_test_config(), out, **QUIET)
    assert verify(out) == ([], [])
    a = store.Dataset.open(root, hide_unlabeled_actions=False)
    b = store.Dataset.open(out, hide_unlabeled_actions=False)
    assert [e.id for e in a.episodes] == [e.id for e in b.episodes]
    for ea, eb in zip(a.episodes, b.episodes):
        assert (a.read(ea, 0, ea.length, ("frame",))["frame"] == b.read(eb, 0, eb.length, ("frame",))["frame"]).all()


def test_disk_full_in_state_checkpoint_and_logs(small_disk):
    filler = _fill(small_disk, 100_000)
    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (400_000,), np.uint8)  # incompressible
    with pytest.raises(DiskFullError, match="collector resume state"):
        resume_state.save(small_disk, 0, 1, big.tobytes())
    assert not list((small_disk / "collector").rglob("*.tmp"))

    ck = Checkpointer(small_disk / "ckpt", async_save=False)
    with pytest.raises(DiskFullError, match=r"in .*ckpt while writing a checkpoint"):
        ck.save(1, {"w": jnp.asarray(big.astype(np.float32))}, {"step": 1})
        ck.wait()
    assert not [p for p in (small_disk / "ckpt").iterdir() if "tmp" in p.name]
    ck.manager.close()

    logger = MetricLogger(small_disk / "stage", "toy", {}, mode="disabled")
    _fill(small_disk, 0, "filler2")
    with pytest.raises(DiskFullError, match="metrics.jsonl"):
        for i in range(10_000):
            logger.log(i, {"loss": 1.0})
    filler.unlink()


# 4. Impossible values of the right type: one error naming the key the user set.


@pytest.mark.parametrize(
    "override,key",
    [
        ("tokenizer.train.log_every=0", "tokenizer.train.log_every"),
        ("tokenizer.train.batch_size=0", "tokenizer.train.batch_size"),
        ("dynamics.train.seq_len=0", "dynamics.train.seq_len"),
        ("agent.bc.ckpt_every=-1", "agent.bc.ckpt_every"),
        ("tokenizer.num_kv_heads=0", "tokenizer.num_kv_heads"),
        ("dynamics.spatial_tokens=3", "dynamics.spatial_tokens"),
        ("tokenizer.latent_layout=grid", "tokenizer.latent_layout"),
        ("dynamics.space_rope_base=1", "dynamics.space_rope_base"),
        ("dynamics.space_rope=true", "dynamics.space_rope"),  # tiny: learned latents, no grid
        ("dynamics.time_neighbourhood=1", "dynamics.time_neighbourhood"),
        ("dynamics.time_neighbourhood=-1", "dynamics.time_neighbourhood"),
        ("dynamics.sample_steps=32", "dynamics.sample_steps"),
        ("dynamics.short_seq_len=13", "dynamics.short_seq_len"),  # tiny: dynamics.train.seq_len=12
        ("behavior.gamma=1.5", "behavior.gamma"),
        ("dynamics.flow_share=1.0", "dynamics.flow_share"),
        ("dynamics.context_prob=-0.1", "dynamics.context_prob"),
        ("dynamics.eval_transitions=0", "dynamics.eval_transitions"),
        ("loader.worker_buffer_size=0", "loader.worker_buffer_size"),
        ("loader.read_threads=0", "loader.read_threads"),
        ("loader.latent_worker_count=-1", "loader.latent_worker_count"),
        ("loader.labeled_repeat=0", "loader.labeled_repeat"),
    ],
)
def test_impossible_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(REPO / "configs" / "tiny.yaml", [override])


def test_sequence_too_long_names_the_stage_key(dataset):
    from dreamer4.data.loader import make_loader

    root, _ = dataset
    with pytest.raises(DatasetError, match="tokenizer.train.seq_len=100000"):
        make_loader(
            root,
            make_test_config(),
            batch_size=4,
            seq_len=100000,
            seq_len_key="tokenizer.train.seq_len",
        )


def test_batch_not_divisible_by_devices_names_the_key():
    from types import SimpleNamespace

    from dreamer4.runtime.train_loop import _check_batch

    cfg = make_test_config()
    three_devices = SimpleNamespace(devices=np.empty(3))
    with pytest.raises(
        ConfigError,
        match=r"config key 'dynamics.train.batch_size' \(8\) must be divisible",
    ):
        _check_batch("dynamics", cfg.dynamics.train.__class__(batch_size=8), three_devices)


# 5. The dataset header is checked against the config before any environment is built.


def test_header_refusal_comes_before_the_env(dataset, monkeypatch):
    root, _ = dataset
    _no_env(monkeypatch)
    with pytest.raises(DatasetError, match=r"env.name='classic'.*env.name='full'"):
        collect(make_test_config(["env.name=full"]), root, **QUIET)
    with pytest.raises(DatasetError, match=r"created with seed=7.*seed=8"):
        collect(make_test_config(["seed=8"]), root, **QUIET)


# 6. import-video of a file that is no video: the one-line error only.


def test_import_of_a_non_video_is_one_line(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video\n")
    proc = cli_subprocess(["dataset", "import-video", "--out", str(tmp_path / "v"), str(bad)], cwd=REPO)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: cannot read as a video"), out
    assert not (tmp_path / "v").exists()

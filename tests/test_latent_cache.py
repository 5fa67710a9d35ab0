"""The latent cache (data/latents.py, dynamics/latent_cache.py): the frozen tokenizer's latents of
every training window, encoded once. They must equal what the dynamics step computes on the fly,
survive an interrupted build, and never be read for another tokenizer or other windows."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from conftest import TEST_OVERRIDES, TOK_OVERRIDES, bench_module, make_test_config
from flax import nnx
from test_dynamics import DYN_OVERRIDES

from dreamer4.data.latents import LatentCache, cache_name
from dreamer4.data.loader import make_loader, window_source
from dreamer4.data.store import DatasetError
from dreamer4.dynamics.latent_cache import build_latent_cache, tokenizer_digest
from dreamer4.dynamics.model import encode_frames
from dreamer4.runtime.loading import load_tokenizer
from dreamer4.tokenizer.model import Tokenizer

# labeled_repeat > 1: records of labeled windows are listed twice and must read their original's row
CFG = ["loader.labeled_repeat=2", "loader.window_stride=2"]
T = 4  # dynamics.train.seq_len of DYN_OVERRIDES
TEST_SETS = TEST_OVERRIDES + TOK_OVERRIDES + DYN_OVERRIDES


def config(extra=()):
    return make_test_config(TOK_OVERRIDES + DYN_OVERRIDES + CFG + list(extra))


encode = nnx.jit(encode_frames)  # the on-the-fly encoding (compiled: eager dispatch is slow on CPU)


@pytest.fixture(scope="module")
def built(dataset, trained_tokenizer, tmp_path_factory):
    """(tokenizer, source, cache path, build log, tokenizer config) of a cache built in blocks of 3 windows."""
    root, _ = dataset
    tok, tok_cfg, _ = load_tokenizer(trained_tokenizer[0])
    source = window_source(root, config(), "train", T)
    out = tmp_path_factory.mktemp("latents")
    log = []
    cached = build_latent_cache(tok, source, out, block=3, log=log.append)
    assert cached.latents is not None and source.latents is None  # a copy of the source, reading the cache
    assert len(cached) == len(source) and "latents" in cached[0] and "frames" not in cached[0]
    return tok, source, cached.latents.path, log, tok_cfg


def test_cached_latents_equal_the_online_encoding(built):
    tok, source, path, log, _ = built
    assert path.name == cache_name("train", T, source.stride) and "building" in log[0]
    cache = LatentCache(path)
    W = len(source.base_windows)
    assert W > 6 and cache.num_blocks == -(-W // 3) and not cache.missing()
    for w in (0, 4, W - 1):  # the last window sits in the padded last block
        online = np.asarray(encode(tok, source.read_frames(w)[None]))[0]
        np.testing.assert_allclose(cache.read(w), online, rtol=0, atol=1e-5)
        assert cache.read(w).dtype == online.dtype
    # a window's latents depend on its start (causal encoder): overlapping windows' shared frames
    # are encoded in different contexts, so they are stored per window, not per frame
    assert source.stride < T


def test_loader_reads_latents_in_the_same_order_as_frames(built, dataset):
    tok, source, path, *_ = built
    root, _ = dataset
    kw = dict(batch_size=4, seq_len=T, seed=3)
    frames = make_loader(root, config(), **kw)
    latents = make_loader(root, config(), latents=path, **kw)
    assert len(latents.source) > len(latents.source.base_windows)  # labeled windows repeated
    assert frames.stream_id == latents.stream_id  # same windows, same order: resumable either way
    for a, b in zip(iter(frames), list(zip(range(6), iter(latents)))):
        b = b[1]
        assert "frames" not in b and b["latents"].shape[:2] == (4, T)
        np.testing.assert_allclose(b["latents"], np.asarray(encode(tok, a["frames"])), rtol=0, atol=1e-5)
        for k in ("actions", "action_mask", "rewards", "is_first"):
            np.testing.assert_array_equal(a[k], b[k])


def test_latent_reads_take_their_own_worker_count_and_threads_keep_the_order(built, dataset):
    """A latent cache's batches are read by `loader.latent_worker_count` workers (default 0: in
    this process), frames by `loader.worker_count`; reading threads do not change the batches."""
    _, _, path, *_ = built
    root, _ = dataset
    kw = dict(batch_size=4, seq_len=T, seed=5, latents=path)
    split = config(["loader.worker_count=2"])
    assert split.loader.latent_worker_count == 0 and split.loader.read_threads == 2  # the defaults
    frames, latents = make_loader(root, split, batch_size=4, seq_len=T), make_loader(root, split, **kw)
    assert frames.stream_id["worker_count"] == 2 and latents.stream_id["worker_count"] == 0
    # the train loop logs how its loader reads
    assert "; frames read by 2 worker processes; global batch 4" in frames.describe()
    assert f"; latents from {path} read by 2 threads in this process; global batch 4" in latents.describe()

    def batches(threads: int, n: int = 6) -> list[dict]:
        it = iter(make_loader(root, config([f"loader.read_threads={threads}"]), **kw))
        return [next(it) for _ in range(n)]

    one, three = batches(1), batches(3)
    assert len({b["latents"].tobytes() for b in one}) == 6  # six different batches
    for a, b in zip(one, three, strict=True):
        assert list(a) == list(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_batch_read_equals_the_records_read_one_by_one(built, tmp_path):
    """The loader reads a batch with its large reads started together (all latents in one
    TensorStore read, or every window's frames before waiting): the same arrays as stacking the
    records one at a time, repeats and labeled oversampling included; a damaged block is named."""
    _, source, path, *_ = built
    cached = source.with_latents(path)
    n = len(cached)
    idx = [n - 1, 0, 3, 0, len(source.base_windows)]  # a repeat, and a labeled window's second listing
    for src, concurrent in ((source, True), (source, False), (cached, True)):
        got = src.read_batch(np.asarray(idx), concurrent_frames=concurrent)
        want = {k: np.stack([src[i][k] for i in idx]) for k in src[0]}
        assert list(got) == list(want)
        for k in want:
            assert got[k].dtype == want[k].dtype, k
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # a damaged block: the batch read names the cache
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    block = next(p for p in sorted((bad / "c").rglob("*")) if p.is_file())
    data = bytearray(block.read_bytes())
    data[len(data) // 3] ^= 0xFF
    block.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=f"latent cache {bad}: one of windows"):
        LatentCache(bad).read_many(np.arange(3))


KILLED_BUILD = """
import sys, time
from conftest import TEST_OVERRIDES, TOK_OVERRIDES, make_test_config
from test_dynamics import DYN_OVERRIDES
from dreamer4.data.latents import LatentCache
from dreamer4.data.loader import window_source
from dreamer4.dynamics.latent_cache import build_latent_cache
from dreamer4.runtime.loading import load_tokenizer

data, tok_run, out, sets = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
real = LatentCache.write_block

def write_and_say(self, b, x):  # slow enough for the parent to kill between blocks
    real(self, b, x)
    print("wrote", b, flush=True)
    time.sleep(0.5)

LatentCache.write_block = write_and_say
source = window_source(data, make_test_config(TOK_OVERRIDES + DYN_OVERRIDES + sets), "train", 4)
build_latent_cache(load_tokenizer(tok_run)[0], source, out, block=3, log=print)
"""


def test_build_killed_by_sigkill_keeps_its_blocks(built, dataset, trained_tokenizer, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    tok, source, path, *_ = built
    out = tmp_path / "latents"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    args = [str(dataset[0]), str(trained_tokenizer[0]), str(out), *CFG]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("wrote") and sum(l.startswith("wrote") for l in seen) == 2:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    partial = LatentCache(out / path.name)
    written = partial.present_blocks()
    assert 2 <= len(written) < partial.num_blocks, (written, "".join(seen))
    with pytest.raises(DatasetError, match="incomplete: .* blocks missing"):
        partial.check_readable(source.identity())
    kept = {b: (partial.path / "c" / str(b) / "0" / "0" / "0").stat().st_mtime_ns for b in written}
    log = []
    build_latent_cache(tok, source, out, block=3, log=log.append)
    assert f"{len(written)} of {partial.num_blocks} blocks present, continuing" in log[0]
    for b, t in kept.items():  # not encoded again
        assert (partial.path / "c" / str(b) / "0" / "0" / "0").stat().st_mtime_ns == t
    done = LatentCache(out / path.name)
    for w in range(len(source.base_windows)):
        np.testing.assert_array_equal(done.read(w), LatentCache(path).read(w))


def test_another_tokenizer_or_other_windows_rebuild_or_refuse(built, dataset, tmp_path):
    tok, source, path, *_ = built
    root, _ = dataset
    out = tmp_path / "latents"
    shutil.copytree(path, out / path.name)
    log = []
    build_latent_cache(tok, source, out, block=3, log=log.append)
    assert "continuing" in log[0]  # same tokenizer, same windows: reused
    # another block size (the BC phase's batch differs from the dynamics'): reused as well, and a
    # missing block is encoded in the cache's own blocks, not rebuilt in the new size
    shutil.rmtree(out / path.name / "c" / "1")
    assert LatentCache(out / path.name).missing() == [1]
    log = []
    build_latent_cache(tok, source, out, block=5, log=log.append)
    again = LatentCache(out / path.name)
    assert "continuing" in log[0] and again.meta["block"] == 3 and not again.missing()
    for w in range(3, 6):  # block 1's windows
        np.testing.assert_array_equal(again.read(w), LatentCache(path).read(w))
    # other weights: another digest, rebuilt
    other = nnx.clone(tok)
    leaf = nnx.state(other, nnx.Param)
    nnx.update(other, jax.tree.map(lambda a: a + 1e-3, leaf))
    assert tokenizer_digest(other) != tokenizer_digest(tok)
    # the same weights with another context length encode otherwise: another digest too
    narrow = Tokenizer(dataclasses.replace(tok.cfg, time_window=1), tok.frame_shape, rngs=nnx.Rngs(1))
    nnx.update(narrow, nnx.state(tok))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, nnx.state(narrow), nnx.state(tok))))
    assert tokenizer_digest(narrow) != tokenizer_digest(tok)
    log = []
    build_latent_cache(other, source, out, block=3, log=log.append)
    assert "building" in log[0] and "another tokenizer or other windows" in log[0]
    assert not np.array_equal(LatentCache(out / path.name).read(0), LatentCache(path).read(0))
    # the loader refuses a cache of other windows (another seq_len's cache put in this one's place)
    with pytest.raises(DatasetError, match="built for other windows or another tokenizer"):
        make_loader(root, config(), batch_size=4, seq_len=T + 1, latents=path)


def test_the_dynamics_loss_is_the_same_on_cached_latents(built, dataset):
    """One batch through the dynamics' training loss: from the frames (encoded in the step) and from
    the cache's latents of the same windows, same key: the same loss and metrics. (The tiny
    preset's whole stage, both ways, to 9e-8: BENCHMARKS.md, "The latent cache".)"""
    from dreamer4.dynamics.model import WorldModel
    from dreamer4.dynamics.train import make_dynamics_loss, make_prepare
    from dreamer4.runtime.loading import build_dynamics

    tok, source, path, _, tok_cfg = built
    root, _ = dataset
    cfg = config()
    world = WorldModel(tok, build_dynamics(cfg, tok_cfg, source.ds.num_actions, latent_grid=tok.latent_grid))
    loss_fn, prepare = make_dynamics_loss(cfg), make_prepare(cfg)
    kw = dict(batch_size=4, seq_len=T, seed=5)
    a = prepare(next(iter(make_loader(root, cfg, **kw))), 1)
    b = prepare(next(iter(make_loader(root, cfg, latents=path, **kw))), 1)
    assert set(a) - set(b) == {"frames"} and set(b) - set(a) == {"latents"}

    loss = nnx.jit(lambda w, batch: loss_fn(w, batch, jax.random.PRNGKey(0)))
    (la, ma), (lb, mb) = loss(world, a), loss(world, b)
    assert float(la) > 0
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    for k in ma:  # every term of shortcut forcing, on sequences and single images
        np.testing.assert_allclose(mb[k], ma[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # (the latents enter as data, behind stop_gradient, so equal latents give equal gradients)


def test_train_dynamics_wrote_the_cache_of_its_tokenizer(world_run):
    """The stage itself built and used a cache (tests/conftest.py's world_run), of the run's tokenizer."""
    caches = sorted((world_run / "latents").iterdir())  # the dynamics' windows (and agent_bc's, once trained)
    assert caches and all(d.name.startswith("train-T") for d in caches)
    digest = tokenizer_digest(load_tokenizer(world_run)[0])
    for d in caches:
        assert (
            json.loads((d / "zarr.json").read_text())["attributes"]["dreamer4_latents"]["identity"]["tokenizer"]
            == digest
        )
        assert not LatentCache(d).missing()


def test_benchmark_script_reports_build_and_loader(dataset, tmp_path):

    from conftest import REPO

    bench = bench_module("latent_cache")
    sets = [a for kv in TEST_SETS + CFG for a in ("--set", kv)]
    out = tmp_path / "b.json"
    res = bench.main(
        ["--data", str(dataset[0]), "--config", str(REPO / "configs" / "tiny.yaml"), *sets]
        + ["--workers", "0", "--batches", "3", "--step-ms", "100", "--json", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["windows"] > 6 and res["build"]["windows_per_s"] > 0 and res["build"]["bytes"] > 0
    for kind in ("frames", "latents"):
        r = res["loader"][f"{kind}_workers0"]
        assert r["windows_per_s"] > 0 and r["ratio_over_train_step"] == pytest.approx(r["windows_per_s"] / 40)


def test_loader_feed_benchmark_pairs_its_cases(dataset, tmp_path):
    """benchmarks/loader_feed.py: every case runs once per repetition; differences are paired
    against the first case of the same reads; a malformed case is refused by name."""

    from conftest import REPO

    bench = bench_module("loader_feed")
    sets = [a for kv in TEST_SETS + CFG for a in ("--set", kv)]
    args = ["--data", str(dataset[0]), "--config", str(REPO / "configs" / "tiny.yaml"), *sets, "--work", str(tmp_path)]
    out = tmp_path / "f.json"
    res = bench.main(
        args
        + ["--cases", "latents:t1,frames:t1,latents:t2", "--reps", "2", "--seconds", "0.2", "--warm", "1"]
        + ["--json", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    lat1, fr1, lat2 = res["rows"]
    assert [r["case"] for r in res["rows"]] == ["latents:t1", "frames:t1", "latents:t2"]
    assert lat2["threads"] == 2 and lat2["workers"] == 0 and lat2["batch"] == [4, T]  # dynamics.train batch
    for r in res["rows"]:
        assert len(r["frames_per_s"]) == 2 and min(r["frames_per_s"]) > 0
    d = lat2["minus_latents:t1"]
    assert d["n"] == 2 and d["mean"] == pytest.approx(np.mean(np.subtract(lat2["frames_per_s"], lat1["frames_per_s"])))
    assert not any(k.startswith("minus_") for k in fr1)  # the first frames case is its own baseline
    with pytest.raises(SystemExit, match="'latents:x2' is not READS:HOW"):
        bench.main(args + ["--cases", "latents:x2"])


def test_a_signal_stops_the_build_after_a_block_with_it_kept(built, tmp_path):
    import os
    import signal

    from dreamer4.runtime import preempt

    tok, source, path, *_ = built
    out = tmp_path / "latents"
    with preempt.handling():
        os.kill(os.getpid(), signal.SIGUSR1)  # as Slurm's warning before the time limit
        with pytest.raises(preempt.Preempted, match=r"stopped by SIGUSR1; 1 of \d+ blocks kept in .*exit code 75"):
            build_latent_cache(tok, source, out, block=3, log=lambda m: None)
    assert len(LatentCache(out / path.name).present_blocks()) == 1
    log = []
    build_latent_cache(tok, source, out, block=3, log=log.append)  # the rerun continues
    assert "1 of" in log[0] and "continuing" in log[0]
    assert not LatentCache(out / path.name).missing()

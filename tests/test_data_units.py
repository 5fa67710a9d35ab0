"""Collector pieces that need no Craftax env (split/label picking, episode assembly, the store, the
manifest log), and the guard around Craftax's texture cache."""

import pickle
from pathlib import Path

import jax
import numpy as np
import pytest

from dreamer4.data.collect import ROW_FIELDS, EpisodeAssembler, episodes_for_writer, join_pieces, stratified_pick


def test_stratified_pick_worked_values():
    # f = 0.25, u = 0: floor((n+1)/4) - floor(n/4) = 1 exactly at n = 3, 7, 11, ...
    picked = [n for n in range(12) if stratified_pick(n, 0.25, 0.0)]
    assert picked == [3, 7, 11]
    # u = 0.5 shifts the pattern: floor((n+1)/4 + .5) - floor(n/4 + .5) = 1 at n = 1, 5, 9
    assert [n for n in range(12) if stratified_pick(n, 0.25, 0.5)] == [1, 5, 9]
    assert all(stratified_pick(n, 1.0, 0.3) for n in range(20))
    assert not any(stratified_pick(n, 0.0, 0.3) for n in range(20))
    # every prefix holds the fraction to within one item
    for f, u in [(0.1, 0.37), (0.33, 0.9)]:
        picks = np.cumsum([stratified_pick(n, f, u) for n in range(500)])
        assert np.all(np.abs(picks - f * np.arange(1, 501)) <= 1)


def test_episodes_for_writer_splits_exactly():
    assert [episodes_for_writer(10, w, 3) for w in range(3)] == [4, 3, 3]
    assert sum(episodes_for_writer(7, w, 7) for w in range(7)) == 7


def _rows(T, N, firsts, lasts, base):
    """Synthetic (T, N) rows whose frame value encodes (chunk base + t, env)."""
    rows = {k: np.zeros((T, N), np.int32) for k in ROW_FIELDS}
    rows["frame"] = (base + np.arange(T))[:, None] * 10 + np.arange(N)[None, :]
    rows["is_first"] = np.zeros((T, N), bool)
    rows["is_last"] = np.zeros((T, N), bool)
    for t, n in firsts:
        rows["is_first"][t, n] = True
    for t, n in lasts:
        rows["is_last"][t, n] = True
    return rows


def test_assembler_joins_episodes_across_chunks_in_order():
    asm = EpisodeAssembler(num_envs=2)
    # env 0: episode rows t=0..4 (ends in chunk 2); env 1: t=0..1, then t=2..5 (ends chunk 2)
    out1 = asm.add(_rows(3, 2, firsts=[(0, 0), (0, 1), (2, 1)], lasts=[(1, 1)], base=0))
    assert len(out1) == 1 and list(out1[0]["frame"]) == [1, 11]
    out2 = asm.add(_rows(3, 2, firsts=[(2, 0)], lasts=[(1, 0), (2, 1)], base=3))
    assert [list(e["frame"]) for e in out2] == [[0, 10, 20, 30, 40], [21, 31, 41, 51]]
    # env 0's next episode has begun at t=5 and stays pending; env 1 has nothing pending
    assert [list(p["frame"]) for p in asm.partial[0]] == [[50]] and asm.partial[1] == []


def test_assembler_pieces_join_to_the_same_episodes():
    # join=False (what collect uses: pieces joined once, on the commit thread) gives the pieces of
    # exactly the episodes join=True gives, and leaves the same partial rows behind
    chunks = [
        _rows(3, 2, firsts=[(0, 0), (0, 1), (2, 1)], lasts=[(1, 1)], base=0),
        _rows(3, 2, firsts=[(2, 0)], lasts=[(1, 0), (2, 1)], base=3),
    ]
    joined, pieces = EpisodeAssembler(num_envs=2), EpisodeAssembler(num_envs=2)
    for rows, n_pieces in zip(chunks, ([1], [2, 2]), strict=True):  # chunk 2 ends two spanning episodes
        a, b = joined.add(rows), pieces.add(rows, join=False)
        assert [len(ep) for ep in b] == n_pieces
        assert [{k: v.tolist() for k, v in ep.items()} for ep in a] == [
            {k: v.tolist() for k, v in join_pieces(ep).items()} for ep in b
        ]
    assert [[p["frame"].tolist() for p in ps] for ps in joined.partial] == [
        [p["frame"].tolist() for p in ps] for ps in pieces.partial
    ]
    with pytest.raises(AssertionError, match="does not start with is_first"):
        EpisodeAssembler(num_envs=1).add(_rows(2, 1, firsts=[], lasts=[(1, 0)], base=0), join=False)


def test_assembler_with_many_envs_copies_running_episodes_in_threads(monkeypatch):
    # 96 envs (the threaded copy starts at 64 running episodes), random episode ends over three
    # chunks, against a plain per-env reference: each env's stream cut after every is_last
    from dreamer4.data import collect as collect_mod

    monkeypatch.setattr(collect_mod.os, "cpu_count", lambda: 4)  # threads even on a 1-core runner
    rng = np.random.default_rng(0)
    T, N, chunks = 5, 96, 3
    lasts_LN = rng.random((T * chunks, N)) < 0.15
    firsts_LN = np.zeros_like(lasts_LN)
    firsts_LN[0] = True
    firsts_LN[1:] = lasts_LN[:-1]
    asm, got = EpisodeAssembler(num_envs=N), []
    for c in range(chunks):
        sl = slice(c * T, (c + 1) * T)
        rows = _rows(T, N, firsts=np.argwhere(firsts_LN[sl]), lasts=np.argwhere(lasts_LN[sl]), base=c * T)
        got += [join_pieces(ep)["frame"].tolist() for ep in asm.add(rows, join=False)]
        # rows of running episodes are copies, not views of the chunk (which may then be freed)
        assert not any(np.shares_memory(p["frame"], rows["frame"]) for ps in asm.partial for p in ps)
    want, left = [], []
    for n in range(N):
        frames, start = (np.arange(T * chunks) * 10 + n).tolist(), 0
        for t in np.flatnonzero(lasts_LN[:, n]):
            want.append((t, n, frames[start : t + 1]))
            start = t + 1
        left.append(frames[start:])
    assert got == [f for _, _, f in sorted(want)]  # ordered by (end step, env)
    assert [sum((p["frame"].tolist() for p in ps), []) for ps in asm.partial] == left


def _toy_chunk_fn(T: int, lengths):
    """A deterministic stand-in for the collector's chunk function (numpy, no env): env n's
    episode e lasts lengths(n, e) rows; a frame encodes (episode, step, env). Carry: each env's
    episode and step, and `done` (the next row resets), as the real carry has."""

    def chunk(carry):
        ep, step, done = (np.array(carry[k]) for k in ("ep", "step", "done"))
        rows = {k: [] for k in ("frame", "is_first", "is_last")}
        for _ in range(T):
            first = done.copy()
            ep, step = np.where(first, ep + 1, ep), np.where(first, 0, step + 1)
            done = step == np.array([lengths(n, e) - 1 for n, e in enumerate(ep)])
            rows["frame"].append(ep * 1000 + step * 10 + np.arange(len(ep)))
            rows["is_first"].append(first)
            rows["is_last"].append(done)
        return {"ep": ep, "step": step, "done": done}, {k: np.stack(v) for k, v in rows.items()}

    return chunk


def _toy_start(N):
    return {"ep": np.full(N, -1), "step": np.zeros(N, np.int64), "done": np.ones(N, bool)}


def _run(fn, carry, asm, log, chunks, first_index=0):
    """Collect `chunks` chunks the way collect does: record the carry before each, cut rows."""
    for j in range(first_index, first_index + chunks):
        log.record(j, carry)
        carry, rows = fn(carry)
        asm.add(rows, join=False)
    return carry


def _frames(partial):
    return [[p["frame"].tolist() for p in ps] for ps in partial]


def test_resume_state_replays_the_running_episodes_and_drops_them_if_replay_differs(tmp_path):
    """Format 4 saves no rows: the carry before the chunk in which the oldest running episode
    began, and how many of the replayed rows each env keeps. Resuming makes the same pieces and
    carry again; a replay that differs (another machine) drops the running episodes instead."""
    from dreamer4.data import resume_state as rs

    T, N = 4, 3
    fn = _toy_chunk_fn(T, lambda n, e: [3, 9, 14][n] + e)  # env 2's episodes span 4-5 chunks
    asm, log = EpisodeAssembler(N), rs.CarryLog()
    carry = _run(fn, _toy_start(N), asm, log, 6)
    plan = log.plan(carry, 5, asm.partial)
    # env 0: episodes of 3, 4, 5, 6 rows (18 rows) -> the running one began at row 18, in chunk 4;
    # env 1: 9 + 10 rows -> began at row 19 (chunk 4); env 2: 14 rows, then from row 14 (chunk 3)
    assert (plan.replay_chunks, plan.replay_index, plan.episode_rows) == (3, 3, [6, 5, 10])
    assert sorted(log._carries) == [3, 4, 5]  # the carries of chunks before 3 are forgotten
    assert plan.explicit == [[], [], []]
    data = rs.encode(plan, log)
    assert log.encoded(3, None) is log.encoded(3, None)  # the replay start is compressed once
    rs.save(tmp_path, 0, 7, data)
    saved = rs.load(tmp_path, 0, 7)
    assert saved.replay["chunks"] == 3 and pickle.loads(data)["carry"][:4] == b"\x28\xb5\x2f\xfd"  # zstd
    msgs = []
    carry2, partial2, log2, nxt = rs.resume(saved, fn, msgs.append)
    assert (
        nxt == 3
        and _frames(partial2) == _frames(asm.partial)
        and msgs[0].startswith("replayed 3 chunks: 3 running episodes restored (")
    )
    assert all(np.array_equal(np.asarray(carry2[k]), carry[k]) for k in carry)
    # continuing from the replay is continuing the original run
    asm2 = EpisodeAssembler(N, partial=partial2)
    carry = _run(fn, carry, asm, log, 3, first_index=6)
    carry2 = _run(fn, carry2, asm2, log2, 3, first_index=3)
    assert _frames(asm2.partial) == _frames(asm.partial)
    a, b = log.plan(carry, 8, asm.partial), log2.plan(carry2, 5, asm2.partial)
    assert (a.replay_chunks, a.episode_rows) == (b.replay_chunks, b.episode_rows)

    # replayed with other episode lengths, as if on a machine whose floats differ: dropped, reset
    other = _toy_chunk_fn(T, lambda n, e: [3, 9, 13][n] + e)
    carry3, partial3, log3, nxt = rs.resume(saved, other, msgs.append)
    assert nxt == 0 and partial3 == [[], [], []] and "did not reproduce the saved run" in msgs[-1]
    assert np.asarray(carry3["done"]).all()  # every env resets at the next step...
    _, rows = other(carry3)
    assert rows["is_first"][0].all()  # ...so the dataset still holds only whole episodes
    # nothing running: nothing to replay
    fin = _toy_chunk_fn(T, lambda n, e: 4)
    asm, log = EpisodeAssembler(N), rs.CarryLog()
    carry = _run(fin, _toy_start(N), asm, log, 2)
    plan = log.plan(carry, 1, asm.partial)
    assert plan.replay_chunks == 0 and plan.replay_carry is None and not log._carries


def test_resume_state_reads_every_earlier_format_and_keeps_their_rows(tmp_path):
    """Formats 3 (zstd pieces) and 2 (zlib pieces) of state-K.pkl.zp, .pkl.z and .pkl still
    load; their running episodes' rows are saved as rows (`explicit`) until those episodes end,
    the rows made since by replay."""
    import zlib

    from dreamer4.data import resume_state as rs

    T, N = 4, 2
    fn = _toy_chunk_fn(T, lambda n, e: [13, 6][n])
    asm = EpisodeAssembler(N)
    carry = _run(fn, _toy_start(N), asm, rs.CarryLog(), 2)  # rows 0-7: env 0 running since row 0
    d = tmp_path / "collector" / "w000"
    d.mkdir(parents=True)
    fmt3 = {"format": 3, "carry": carry, "partial": [[rs._compress_piece(p) for p in ps] for ps in asm.partial]}
    (d / "state-000002.pkl.zp").write_bytes(pickle.dumps(fmt3))
    fmt2 = {**fmt3, "format": 2}
    fmt2["partial"] = [
        [
            {k: (a.dtype.str, a.shape, zlib.compress(np.ascontiguousarray(a).tobytes(), 1)) for k, a in p.items()}
            for p in ps
        ]
        for ps in asm.partial
    ]
    (d / "state-000003.pkl.zp").write_bytes(pickle.dumps(fmt2))
    legacy = {"carry": carry, "partial": asm.partial}
    (d / "state-000004.pkl.z").write_bytes(zlib.compress(pickle.dumps(legacy), 1))
    (d / "state-000005.pkl").write_bytes(pickle.dumps(legacy))
    for k in (2, 3, 4, 5):
        saved = rs.load(tmp_path, 0, k)
        assert saved.replay is None and _frames(saved.explicit) == _frames(asm.partial)
        assert saved.carry["ep"].tolist() == carry["ep"].tolist()
    with pytest.raises(Exception, match="state-000006.pkl.zp is missing"):
        rs.load(tmp_path, 0, 6)

    # resumed from format 3, one more chunk (rows 8-11): env 0's episode (rows 0-12) still runs,
    # env 1's second (rows 6-11) has ended
    carry2, partial, log, nxt = rs.resume(rs.load(tmp_path, 0, 2), fn)
    assert nxt == 0 and _frames(partial) == _frames(asm.partial)
    asm2 = EpisodeAssembler(N, partial=partial)
    carry = _run(fn, carry, asm, rs.CarryLog(), 1)  # the original run, one chunk on: rows 8-11
    carry2 = _run(fn, carry2, asm2, log, 1)
    plan = log.plan(carry2, 0, asm2.partial)
    assert [len(ps) for ps in plan.explicit] == [2, 0] and plan.replay_chunks == 1
    assert plan.episode_rows == [4, 0]  # env 0: rows 8-11 replayed, rows 0-7 stored
    rs.save(tmp_path, 0, 7, rs.encode(plan, log))
    carry3, partial3, _, _ = rs.resume(rs.load(tmp_path, 0, 7), fn)
    assert _frames(partial3) == _frames(asm.partial) == _frames(asm2.partial)
    assert all(np.array_equal(np.asarray(carry3[k]), carry[k]) for k in carry)


def test_digest_is_xxh3_128_and_earlier_sha256_digests_still_verify():
    import hashlib

    from dreamer4.data import store

    # XXH3-128 (seed 0) of no bytes, from the reference implementation's published test vector
    assert store.digest(np.zeros(0, np.uint8)) == "xxh3-128:99aa06d3014798d86001c324468d497f"
    big = np.random.default_rng(0).integers(0, 256, store.DIGEST_BLOCK * 2 + 123, dtype=np.uint8)
    d = store.digest(big)
    assert d.startswith(store.DIGEST_PREFIX) and len(d) == len(store.DIGEST_PREFIX) + 32
    # the bytes in C order: a transposed view hashes as its contiguous copy, not as its buffer
    grid = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert store.digest(grid.T) == store.digest(np.ascontiguousarray(grid.T)) != store.digest(grid)
    # what earlier versions recorded: a plain sha256, and above 32 MiB a tree of 32 MiB blocks
    raw = big.tobytes()
    blocks = [raw[i : i + store.DIGEST_BLOCK] for i in range(0, len(raw), store.DIGEST_BLOCK)]
    tree = store.TREE_PREFIX + hashlib.sha256(b"".join(hashlib.sha256(b).digest() for b in blocks)).hexdigest()
    plain = hashlib.sha256(raw).hexdigest()
    assert len(blocks) == 3
    assert all(store.digest_matches(big, r) for r in (d, tree, plain))
    big[store.DIGEST_BLOCK + 7] ^= 1  # one flipped bit fails every form
    assert not any(store.digest_matches(big, r) for r in (d, tree, plain))
    assert store.shard_digests({"digests": {"frame": d}}) == {"frame": d}
    assert store.shard_digests({"sha256": {"frame": plain}}) == {"frame": plain}


def _shard_arrays(n: int, rng) -> dict[str, np.ndarray]:
    """A shard's fields, n random rows (frames 5 x 4 x 3)."""
    return {
        "frame": rng.integers(0, 256, (n, 5, 4, 3), dtype=np.uint8),
        "action": rng.integers(0, 17, n).astype(np.int32),
        "reward": rng.normal(size=n).astype(np.float32),
        "is_first": rng.random(n) < 0.1,
        "is_last": rng.random(n) < 0.1,
        "is_terminal": rng.random(n) < 0.05,
        "achievements": rng.random((n, 22)) < 0.3,
    }


def test_shard_inner_chunks_frames_by_read_chunk_step_fields_by_512_rows(tmp_path):
    """Frames are stored in inner chunks of read_chunk rows (the loader's read unit); the small
    per-step fields in chunks of STEP_FIELD_ROWS rows, so a shard is not mostly per-chunk overhead;
    any window reads back exactly, across chunk boundaries."""
    from dreamer4.data import store

    n = 1100
    arrays = _shard_arrays(n, np.random.default_rng(0))
    digests = store.write_shard(tmp_path, "w000-s000000", arrays, read_chunk=4, zstd_level=3)
    assert store.STEP_FIELD_ROWS == 512
    for field, a in arrays.items():
        arr = store.open_shard_array(tmp_path, "w000-s000000", field)
        want = 4 if field == "frame" else 512
        assert tuple(arr.chunk_layout.read_chunk.shape) == (want, *a.shape[1:]), field
        for start, stop in ((0, n), (510, 515), (1020, 1100), (3, 9)):
            np.testing.assert_array_equal(store.read_shard_array(arr, "s", field, start, stop), a[start:stop])
        assert store.digest_matches(a, digests[field])


def test_a_shards_arrays_may_be_overwritten_once_write_shard_returns(tmp_path):
    """write_shard lets TensorStore reference the arrays rather than copy them; the collector
    overwrites them with the next shard (RowBuffers). What was written must not change, and no
    later open in the same process (the loader in `dreamer4 run`) may see the new contents."""
    from dreamer4.data import store

    n = 103  # not a multiple of the read chunk: the last inner chunk is partly outside the array
    arrays = _shard_arrays(n, np.random.default_rng(1))
    want = {k: v.copy() for k, v in arrays.items()}
    store.write_shard(tmp_path, "w000-s000000", arrays, read_chunk=4, zstd_level=3)
    for a in arrays.values():
        a[...] = ~a if a.dtype == np.bool_ else a + 1  # the next shard's rows, in the same memory
    store.write_shard(tmp_path, "w000-s000001", arrays, read_chunk=4, zstd_level=3)
    for field in arrays:
        first = store.open_shard_array(tmp_path, "w000-s000000", field)
        np.testing.assert_array_equal(store.read_shard_array(first, "s", field), want[field])
        second = store.open_shard_array(tmp_path, "w000-s000001", field)
        np.testing.assert_array_equal(store.read_shard_array(second, "s", field), arrays[field])


def test_concat_rows_in_threads_equals_numpy_concatenate():
    from dreamer4.data.collect import concat_rows

    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 256, (int(n), 3, 2), dtype=np.uint8) for n in rng.integers(0, 9, 300)]
    want = np.concatenate(parts)
    got = concat_rows(parts, min_bytes=0)  # the threaded path at any size
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(concat_rows(parts), want)  # small: numpy's own
    # parts of another dtype or row shape are numpy's business (it promotes or refuses)
    mixed = [np.zeros((2, 2), np.int32), np.ones((3, 2), np.float32)]
    np.testing.assert_array_equal(concat_rows(mixed, min_bytes=0), np.concatenate(mixed))
    with pytest.raises(ValueError):
        concat_rows([np.zeros((2, 2)), np.zeros((2, 3))], min_bytes=0)


def test_row_buffers_reuse_one_array_per_field():
    """A commit joins each field's pieces into that field's reused array: equal to numpy's
    concatenate, the same memory at the next commit of no more rows, a larger array for more,
    never another field's array (bool flags share a row shape and dtype)."""
    from dreamer4.data.collect import RowBuffers, concat_rows

    rng = np.random.default_rng(2)
    bufs = RowBuffers()

    def parts(n_parts, dtype=np.uint8):
        return [rng.integers(0, 2, (int(n), 3, 2)).astype(dtype) for n in rng.integers(1, 9, n_parts)]

    p1, q1 = parts(40), parts(40, bool)
    a1, f1 = bufs.join("frame", p1), bufs.join("is_first", q1)
    np.testing.assert_array_equal(a1, np.concatenate(p1))
    np.testing.assert_array_equal(f1, np.concatenate(q1))
    first_rows = len(a1)
    g1 = bufs.join("is_last", q1[:5])
    assert not np.shares_memory(g1, f1)  # same row shape and dtype, another field
    p2 = [x for x in p1 if len(x) < 5]  # fewer rows: the same memory again
    a2 = bufs.join("frame", p2)
    assert len(a2) < first_rows and np.shares_memory(a2, a1)
    np.testing.assert_array_equal(a2, np.concatenate(p2))
    p3 = p1 + p1  # more rows than the capacity (1.25x the first): a new array
    a3 = bufs.join("frame", p3)
    assert not np.shares_memory(a3, a1)
    np.testing.assert_array_equal(a3, np.concatenate(p3))
    # the threaded path into a given array, and a wrong one refused by name
    out = np.empty((sum(len(x) for x in p1), 3, 2), np.uint8)
    assert concat_rows(p1, min_bytes=0, out=out) is out
    np.testing.assert_array_equal(out, np.concatenate(p1))
    with pytest.raises(ValueError, match="concat_rows: out is"):
        concat_rows(p1, min_bytes=0, out=out[1:])


def test_pinned_host_copy_keeps_the_rows_and_a_device_without_pinned_memory_is_refused():
    from dreamer4.config import ConfigError
    from dreamer4.data.collect import _with_host_copy, check_host_copy

    rows = {"frame": jax.numpy.arange(24, dtype=jax.numpy.uint8).reshape(2, 3, 4), "reward": jax.numpy.ones((2, 3))}
    carry, got = _with_host_copy(("carry", rows), "pinned")
    assert carry == "carry"
    assert {k: v.sharding.memory_kind for k, v in got.items()} == {"frame": "pinned_host", "reward": "pinned_host"}
    for k, v in jax.device_get(got).items():
        np.testing.assert_array_equal(v, np.asarray(rows[k]))
    assert _with_host_copy(("carry", rows))[1] is rows  # "async": the same arrays, copies started

    class NoPinned:
        def addressable_memories(self):
            return []

        def __str__(self):
            return "gpu:7"

    check_host_copy("async", NoPinned())  # nothing to check
    with pytest.raises(
        ConfigError, match=r"'collect.host_copy': 'pinned' needs .* but gpu:7 has only \[\]; use 'async'"
    ):
        check_host_copy("pinned", NoPinned())


def test_strong_types_keeps_dtypes_and_drops_weak_types():
    import jax
    import jax.numpy as jnp

    from dreamer4.data.env import strong_types

    tree = {"py_int": 3, "weak": jnp.full((2,), 1.5), "strong": jnp.zeros((2,), jnp.uint8), "weak_int": jnp.asarray(7)}
    assert jax.typeof(tree["weak"]).weak_type and jax.typeof(tree["weak_int"]).weak_type
    for out in (strong_types(tree), jax.jit(strong_types)(tree)):
        types = {k: (jax.typeof(v).dtype, jax.typeof(v).weak_type) for k, v in out.items()}
        assert types == {
            "py_int": (jnp.int32, False),
            "weak": (jnp.float32, False),
            "strong": (jnp.uint8, False),
            "weak_int": (jnp.int32, False),
        }
        np.testing.assert_array_equal(out["weak"], [1.5, 1.5])
        assert int(out["py_int"]) == 3


def test_texture_cache_is_built_once_under_a_lock_and_never_seen_half_written(tmp_path):
    """Craftax writes its texture cache in place, slowly; `texture_cache` builds it under a lock
    into a file renamed into place: a process waiting on the lock uses the other's file, and a
    reader meanwhile sees no file or the whole one."""
    import fcntl
    import functools
    import threading
    import time
    import types

    from dreamer4.data import env

    path = tmp_path / "assets" / "texture_cache.pbz2"
    path.parent.mkdir()
    whole = bytes(range(256)) * 64
    builds = []

    @functools.cache  # as Craftax's: one copy of the textures per process
    def load_all_textures():
        builds.append(C.TEXTURE_CACHE_FILE)
        with open(C.TEXTURE_CACHE_FILE, "wb") as f:  # where the module's global says, in place, slowly
            for i in range(0, len(whole), 1024):
                f.write(whole[i : i + 1024])
                f.flush()
                time.sleep(0.005)
        return "textures"

    C = types.SimpleNamespace(TEXTURE_CACHE_FILE=str(path), load_all_textures=load_all_textures)

    # 1. another process holds the lock while it builds: this one waits, then uses that file
    lock = open(path.with_name(path.name + ".lock"), "a+")
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    waiter = threading.Thread(target=env.texture_cache, args=(C,), kwargs={"log": lambda *a: None})
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()
    path.write_bytes(whole)
    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    lock.close()
    waiter.join(10)
    assert not waiter.is_alive() and builds == []

    # 2. missing: built once, and a reader polling meanwhile never sees part of it
    path.unlink()
    seen, done = set(), threading.Event()

    def poll():
        while not done.is_set():
            try:
                seen.add(path.read_bytes() == whole)
            except FileNotFoundError:
                seen.add(None)

    reader = threading.Thread(target=poll)
    reader.start()
    logs = []
    assert env.texture_cache(C, log=logs.append) == path
    done.set()
    reader.join()
    assert len(builds) == 1 and builds[0] != str(path) and C.TEXTURE_CACHE_FILE == str(path)
    assert path.read_bytes() == whole and None in seen and False not in seen
    assert "building Craftax's texture cache" in logs[0] and not list(path.parent.glob(".*.tmp"))
    env.texture_cache(C)  # 3. present: nothing to build
    assert len(builds) == 1
    path.unlink()  # 4. removed while this process holds the textures in memory: built again
    assert env.texture_cache(C, log=lambda *a: None) == path and path.read_bytes() == whole and len(builds) == 2


def test_texture_cache_of_a_read_only_craftax_lives_in_the_users_cache(tmp_path, monkeypatch):
    """A shared, read-only install: Craftax could not save its cache there; it goes to
    $XDG_CACHE_HOME/dreamer4/craftax-VERSION/ and Craftax's loader is pointed at it."""
    from importlib import metadata

    from dreamer4.data import env

    ro = tmp_path / "site-packages" / "craftax" / "assets"
    ro.mkdir(parents=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # tests run as root, for whom every folder is writable: say this one is not
    monkeypatch.setattr(env.os, "access", lambda p, mode: Path(p) != ro)
    builds = []

    class C:
        TEXTURE_CACHE_FILE = str(ro / "texture_cache.pbz2")

        @staticmethod
        def load_all_textures():
            builds.append(C.TEXTURE_CACHE_FILE)
            Path(C.TEXTURE_CACHE_FILE).write_bytes(b"textures")

    want = tmp_path / "cache" / "dreamer4" / f"craftax-{metadata.version('craftax')}" / "texture_cache.pbz2"
    assert env.texture_cache(C, log=lambda *a: None) == want
    assert want.read_bytes() == b"textures" and C.TEXTURE_CACHE_FILE == str(want) and not list(ro.iterdir())
    C.TEXTURE_CACHE_FILE = str(ro / "texture_cache.pbz2")  # a new process: found, not rebuilt
    assert env.texture_cache(C) == want and C.TEXTURE_CACHE_FILE == str(want) and len(builds) == 1


def test_a_damaged_texture_cache_is_named_with_what_to_do(tmp_path, monkeypatch):
    import bz2

    from craftax.craftax_classic import constants as C

    from dreamer4.data.env import make_env

    torn = tmp_path / "texture_cache_classic.pbz2"
    monkeypatch.setattr(C, "TEXTURE_CACHE_FILE", str(torn))
    C.load_all_textures.cache_clear()  # Craftax keeps textures per process: read the file again
    whole = bz2.compress(pickle.dumps({"textures": np.arange(100_000)}))
    for damaged in (whole[: len(whole) // 2], b"not bz2 at all"):  # a build killed part-way; another file
        torn.write_bytes(damaged)
        with pytest.raises(RuntimeError, match=rf"texture cache {torn} could not be read .*delete it and run again"):
            make_env("classic")


def test_chunk_clock_reports_the_runs_second_half_from_its_chunk_calls():
    """benchmarks/collect_host.py's ChunkClock (also the GPU suite's): one mark per chunk-function
    call; `late` covers the marks from the first one in the last half of the time between the
    second call and the last, against hand-worked values."""
    import dataclasses

    @dataclasses.dataclass
    class Stepper:
        chunk_fn: object

    from conftest import bench_module

    host = bench_module("collect_host")
    clock = host.ChunkClock()
    calls = []
    stepper = clock.wrap(Stepper(lambda c: calls.append(c) or c + 1))
    assert stepper.chunk_fn(41) == 42 and calls == [41] and len(clock.marks) == 1  # calls through
    # (wall s, user s, system s, faults) at each call; the first (before the loop) is left out.
    # Two calls after it span one chunk: too few
    clock.marks = [(0.0, 0, 0, 0), (1.0, 1, 0, 10), (7.0, 9, 1, 70)]
    assert clock.late(100) is None
    # span 1..9 s, last half from 5 s: marks at 5, 7, 9 s = 2 chunks in 4 s
    clock.marks = [
        (0.0, 0.0, 0.0, 0),
        (1.0, 1.0, 0.0, 10),
        (3.0, 2.0, 0.5, 20),
        (5.0, 3.0, 1.0, 30),
        (7.0, 5.0, 1.5, 60),
        (9.0, 6.0, 2.0, 100),
    ]
    late = clock.late(100)
    assert late["chunks"] == 2 and late["seconds"] == 4.0
    assert late["steps_per_s"] == 50.0  # 2 x 100 steps in 4 s
    assert late["cpu_s_per_chunk"] == 2.0  # (6 - 3) user + (2 - 1) system over 2 chunks
    assert late["cores_busy"] == 1.0 and late["system_cpu_share"] == 0.25
    assert late["minor_faults_per_chunk"] == 35.0  # (100 - 30) / 2


def test_collect_host_rows_cycle_with_episodes_running_over_every_chunk_end():
    """benchmarks/collect_host.py's stand-in rows: the first chunk resets every env, the cycle
    repeats as valid episodes (an episode may run over its end), and, unlike before session 36,
    not every episode ends at the cycle's last step: every chunk leaves episodes running, as a
    real collection's commits do."""
    import types

    from conftest import bench_module

    host = bench_module("collect_host")
    env = types.SimpleNamespace(achievement_names=["a", "b"], num_actions=5)
    frames = np.arange(7 * 2 * 2 * 3, dtype=np.uint8).reshape(7, 2, 2, 3)
    N, T, chunks = 16, 8, 3
    first, cycle = host.make_rows(N, T, chunks, env, 6.0, frames, False, np.random.default_rng(0))
    first, cycle = jax.device_get((first, cycle))
    assert first["is_first"][0].all() and (first["action"][0] == -1).all()
    np.testing.assert_array_equal(first["frame"], cycle[0]["frame"])
    asm, ended, running = EpisodeAssembler(N), 0, []
    for c in [first, *cycle[1:]] + cycle * 3:  # as collect_host's chunk_fn; the assembler checks every episode
        ended += len(asm.add(c))
        running.append(sum(bool(p) for p in asm.partial))
    assert ended > N and min(running) > 0
    is_first = np.concatenate([c["is_first"] for c in cycle])
    is_last = np.concatenate([c["is_last"] for c in cycle])
    np.testing.assert_array_equal(np.roll(is_last, 1, axis=0), is_first)  # circular: a reset follows each end
    assert not is_last[-1].all()


# The manifest's commit log (store.append_commit): a commit appends a line instead of rewriting
# manifest.json; readers apply the log; it is folded into manifest.json when it grows.


def _log_commit(root, i, writer="0"):
    from dreamer4.data import store

    entry = {"name": f"w000-s{i:06d}", "writer": 0, "index": i, "num_frames": 3, "episodes": [{"length": 3}]}
    status = {"committed_shards": i + 1, "episodes": i + 1, "target_episodes": 9, "complete": False}
    store.append_commit(root, [entry], {writer: status})
    return entry, status


def test_commit_log_appends_without_rewriting_the_manifest_and_folds_when_it_grows(tmp_path, monkeypatch):
    import json

    from dreamer4.data import store

    with store.locked_manifest(tmp_path) as m:
        m.update({"format": store.FORMAT, "seed": 1, "shards": [], "writers": {}})
    mp, lp = store.manifest_path(tmp_path), store.manifest_log_path(tmp_path)
    before = (mp.stat().st_ino, mp.read_bytes())
    entries = [_log_commit(tmp_path, i) for i in range(3)]
    assert (mp.stat().st_ino, mp.read_bytes()) == before  # the commits did not rewrite it
    assert len(lp.read_text().splitlines()) == 3
    m = store.read_manifest(tmp_path)
    assert m["shards"] == [e for e, _ in entries] and m["writers"] == {"0": entries[-1][1]} and m["seed"] == 1
    # the log folds into manifest.json once it holds LOG_FOLD_SHARE of it (here: of any size)
    monkeypatch.setattr(store, "LOG_FOLD_MIN_BYTES", 0)
    monkeypatch.setattr(store, "LOG_FOLD_SHARE", 100.0)
    _log_commit(tmp_path, 3)
    assert lp.exists()
    monkeypatch.setattr(store, "LOG_FOLD_SHARE", 0.25)
    _log_commit(tmp_path, 4)
    assert not lp.exists()
    folded = json.loads(mp.read_text())
    assert [s["index"] for s in folded["shards"]] == [0, 1, 2, 3, 4] and folded["writers"]["0"]["committed_shards"] == 5
    assert store.read_manifest(tmp_path) == folded
    # a writer that stops folds what is left (collect does, in its finally)
    monkeypatch.setattr(store, "LOG_FOLD_SHARE", 100.0)
    _log_commit(tmp_path, 5)
    store.fold_manifest_log(tmp_path)
    assert not lp.exists() and len(json.loads(mp.read_text())["shards"]) == 6


def test_commit_log_ignores_an_unfinished_line_and_applies_each_record_once(tmp_path):
    import json

    from dreamer4.data import store

    with store.locked_manifest(tmp_path) as m:
        m.update({"shards": [], "writers": {}})
    lp = store.manifest_log_path(tmp_path)
    _log_commit(tmp_path, 0)
    _log_commit(tmp_path, 1)
    # a commit killed mid-write leaves a line without its newline: not committed
    with open(lp, "a") as f:
        f.write('{"shards": [{"name": "w000-s000002"')
    m = store.read_manifest(tmp_path)
    assert [s["index"] for s in m["shards"]] == [0, 1] and m["writers"]["0"]["committed_shards"] == 2
    _log_commit(tmp_path, 2)  # cuts the unfinished line off, then appends
    assert all(json.loads(x) for x in lp.read_text().splitlines())
    assert [s["index"] for s in store.read_manifest(tmp_path)["shards"]] == [0, 1, 2]
    # a fold killed after writing manifest.json and before removing the log: nothing twice, and
    # a record older than manifest.json's writer status does not set it back
    full = store.read_manifest(tmp_path)
    kept = lp.read_text()
    store.fold_manifest_log(tmp_path)
    lp.write_text(kept.splitlines(keepends=True)[0])  # the log holds commit 0 only
    assert store.read_manifest(tmp_path) == full
    lp.write_text(kept)
    assert store.read_manifest(tmp_path) == full
    # a damaged complete line is an error naming the file and line
    lp.write_text(kept + "not json\n")
    with pytest.raises(store.DatasetError, match=r"manifest\.log: line 4 is not a commit record"):
        store.read_manifest(tmp_path)
    # a commit needs the manifest
    with pytest.raises(store.DatasetError, match=r"manifest\.json is missing"):
        _log_commit(tmp_path / "elsewhere", 0)


_LOG_WRITER = """
import sys
from dreamer4.data import store
root, w, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store.LOG_FOLD_MIN_BYTES, store.LOG_FOLD_SHARE = 0, 0.3  # a fold every few commits
for i in range(n):
    entry = {"name": f"w{w:03d}-s{i:06d}", "writer": w, "index": i, "num_frames": 1, "episodes": [{"x": "y" * 200}] * 5}
    store.append_commit(root, [entry], {str(w): {"committed_shards": i + 1}})
"""


def test_commit_log_readers_see_whole_commits_while_writers_append_and_fold(tmp_path):
    """Three writer processes commit through the log and fold it every few commits, while this
    process reads: every view holds each writer's shards 0..k-1 with its status saying k, and
    never fewer than a view before. Without the check that manifest.json was not replaced between
    reading it and the log, a stress run like this one saw 6 torn views in 3,463; with the check
    made after closing the file (whose inode number a new manifest.json may then reuse), this
    test failed 4 times in 5."""
    import subprocess
    import sys

    from conftest import REPO

    from dreamer4.data import store

    with store.locked_manifest(tmp_path) as m:
        m.update({"shards": [], "writers": {}})
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    n = 400
    procs = [
        subprocess.Popen([sys.executable, "-c", _LOG_WRITER, str(tmp_path), str(w), str(n)], env=env) for w in range(3)
    ]
    seen, reads = dict.fromkeys(range(3), 0), 0
    try:
        while any(p.poll() is None for p in procs) or reads == 0:
            m = store.read_manifest(tmp_path)
            reads += 1
            for w in range(3):
                idx = [s["index"] for s in m["shards"] if s["writer"] == w]
                assert idx == list(range(len(idx))), (w, idx)
                assert m["writers"].get(str(w), {}).get("committed_shards", 0) == len(idx) >= seen[w]
                seen[w] = len(idx)
    finally:
        for p in procs:
            p.wait(timeout=120)
    assert all(p.returncode == 0 for p in procs)
    final = store.read_manifest(tmp_path)
    assert len(final["shards"]) == 3 * n and reads > 10

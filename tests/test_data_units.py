"""Collector pieces that need no Craftax: split/label picking and episode assembly."""

import numpy as np

from dreamer4.data.collect import ROW_FIELDS, EpisodeAssembler, episodes_for_writer, stratified_pick


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

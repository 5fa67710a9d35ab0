"""The grain loader on the session dataset: batches, resumable state, process sharding."""

import numpy as np
import pytest

from dreamer4.data.loader import make_loader
from dreamer4.data.store import DatasetError


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_batch_shapes_and_dtypes(dataset, cfg):
    root, _ = dataset
    b = next(iter(make_loader(root, cfg)))
    B, T = cfg.loader.batch_size, cfg.loader.seq_len
    assert b["frames"].shape == (B, T, 63, 63, 3) and b["frames"].dtype == np.uint8
    assert b["actions"].shape == (B, T) and b["actions"].dtype == np.int32
    assert b["action_mask"].dtype == bool and b["rewards"].dtype == np.float32
    assert np.all((b["actions"] >= 0) == b["action_mask"])


def test_iterator_state_restores_the_same_stream(dataset, cfg):
    root, _ = dataset
    it = iter(make_loader(root, cfg))
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 4)
    it2 = iter(make_loader(root, cfg))
    it2.set_state(state)
    for a, b in zip(expected, _take(it2, 4)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # and a different seed gives a different stream (so the check above can fail)
    other = next(iter(make_loader(root, cfg, seed=123)))
    assert not np.array_equal(other["frames"], _take(iter(make_loader(root, cfg)), 1)[0]["frames"])


def test_process_shards_are_disjoint(dataset, cfg):
    root, _ = dataset
    keys = []
    for p in range(2):
        dl = make_loader(root, cfg, shard_index=p, shard_count=2, num_epochs=1)
        assert next(iter(dl))["frames"].shape[0] == cfg.loader.batch_size // 2
        keys.append({r.record_key for r in dl._sampler})
    n = len(dl._data_source)
    assert keys[0] and keys[1] and not (keys[0] & keys[1])
    assert len(keys[0] | keys[1]) >= n - 1  # grain drops the odd remainder record


def test_loader_errors(dataset, cfg, tmp_path):
    root, _ = dataset
    from conftest import make_test_config

    with pytest.raises(DatasetError, match="env.name='full'"):
        make_loader(root, make_test_config(["env.name=full"]))
    with pytest.raises(ValueError, match="batch size 3"):
        make_loader(root, make_test_config(["loader.batch_size=3"]), shard_index=0, shard_count=2)
    labeled = make_loader(root, cfg, labeled_only=True)._data_source
    assert labeled.episodes and all(e.labeled for e in labeled.episodes)

"""Shared runtime: FSDP specs, the NaN guard, checkpoint keep-last-N."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_test_config
from flax import nnx
from jax.sharding import PartitionSpec as P

from dreamer4.runtime.mesh import fsdp_spec, make_mesh
from dreamer4.runtime.train_loop import NonFiniteLoss, Stage, train


def test_fsdp_spec_picks_largest_divisible_dim():
    assert fsdp_spec((64, 12), 4) == P("fsdp", None)
    assert fsdp_spec((6, 16), 4) == P(None, "fsdp")
    assert fsdp_spec((6, 10), 4) == P()  # nothing divides: replicated
    assert fsdp_spec((64, 12), 1) == P()
    assert fsdp_spec((), 2) == P()


def test_mesh_axes():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "fsdp") and mesh.devices.size == len(jax.devices())
    with pytest.raises(ValueError, match="runtime.fsdp"):
        make_mesh(len(jax.devices()) + 1)


class ToyIterator:
    """Batches x_t = t, with a NaN from step `nan_at` on; state is the position."""

    def __init__(self, nan_at):
        self.i, self.nan_at = 0, nan_at

    def __next__(self):
        self.i += 1
        x = np.full((2, 3), float(self.i), np.float32)
        if self.i >= self.nan_at:
            x[0, 0] = np.nan
        return {"x": x}

    def get_state(self):
        return str(self.i).encode()

    def set_state(self, s):
        self.i = int(s.decode())


def test_nan_stops_run_and_keeps_good_checkpoint(tmp_path):
    cfg = make_test_config(["runtime.wandb=disabled"])
    tc = cfg.tokenizer.train.__class__(steps=20, batch_size=2, log_every=1, ckpt_every=2, warmup_steps=1)
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))

    def loss_fn(m, batch, key):
        y = m(batch["x"])
        return jnp.mean(y**2), {}

    it = ToyIterator(nan_at=6)
    stage = Stage(
        name="toy",
        stage_dir=tmp_path / "toy",
        cfg=cfg,
        train=tc,
        model=model,
        loss_fn=loss_fn,
        make_iterator=lambda: it,
        prepare=lambda b, step: b,
    )
    with pytest.raises(NonFiniteLoss, match=r"non-finite at step 6.*last good checkpoint is step 4"):
        train(stage)
    steps = sorted(int(p.name) for p in (tmp_path / "toy" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) == 4
    assert (tmp_path / "toy" / "nan_debug" / "last_batch.npz").exists()
    # the kept checkpoint is finite and training can resume from it
    it2 = ToyIterator(nan_at=10**9)
    stage2 = Stage(
        name="toy",
        stage_dir=tmp_path / "toy",
        cfg=cfg,
        train=tc.__class__(steps=6, batch_size=2, log_every=1, ckpt_every=2, warmup_steps=1),
        model=nnx.Linear(3, 1, rngs=nnx.Rngs(1)),
        loss_fn=loss_fn,
        make_iterator=lambda: it2,
        prepare=lambda b, step: b,
    )
    m = train(stage2)
    assert it2.i == 6  # restored iterator position 4, then two more batches
    assert np.all(np.isfinite(np.asarray(m.kernel[...])))


def test_compilation_cache_that_cannot_be_created_is_a_warning_not_a_failure(tmp_path, capsys):
    from dreamer4.runtime.jax_setup import enable_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    blocker = tmp_path / "home"
    blocker.write_text("a file where the cache's parent folder would be")
    assert enable_compilation_cache(str(blocker / ".cache" / "jax")) is None
    err = capsys.readouterr().err
    assert f"cannot create {blocker / '.cache' / 'jax'}" in err and "DREAMER4_JAX_CACHE" in err
    assert jax.config.jax_compilation_cache_dir == before  # the session's cache stays as it was
    assert enable_compilation_cache("off") is None

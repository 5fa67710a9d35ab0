"""Running-RMS loss normalisation against hand-worked values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dreamer4.nn.loss_norm import LossNormalizer, rms_update


def test_rms_update_hand_values():
    # decay 0.5, observations 2 then 4:
    #   m1 = 0.5 * 0 + 0.5 * 4 = 2,  r1 = sqrt(2 / (1 - 0.5)) = 2
    #   m2 = 0.5 * 2 + 0.5 * 16 = 9, r2 = sqrt(9 / (1 - 0.25)) = sqrt(12)
    ms, n, r = rms_update(jnp.float32(0.0), jnp.int32(0), 2.0, 0.5)
    assert (float(ms), int(n), float(r)) == pytest.approx((2.0, 1, 2.0))
    ms, n, r = rms_update(ms, n, 4.0, 0.5)
    assert (float(ms), int(n), float(r)) == pytest.approx((9.0, 2, np.sqrt(12.0)))


def test_normalizer_sums_normalised_terms_and_keeps_gradients_through_the_terms_only():
    norm = LossNormalizer(["a", "b"], decay=0.5)
    # step 1: each term divided by its own |x|: 1 + 1 (weights 1), whatever the raw scales
    total, rms = norm({"a": jnp.float32(2.0), "b": jnp.float32(300.0)})
    assert float(total) == pytest.approx(2.0)
    assert float(rms["b"]) == pytest.approx(300.0)
    # step 2: a = 4 -> r = sqrt(12); b = 300 again -> r = 300 (constant term)
    total, _ = norm({"a": jnp.float32(4.0), "b": jnp.float32(300.0)}, weights={"b": 0.5})
    assert float(total) == pytest.approx(4.0 / np.sqrt(12.0) + 0.5)
    assert int(norm.count[...]) == 2

    # d total / d a = w / r: the statistic is a constant for the gradient
    def f(a):
        n = LossNormalizer(["a"], decay=0.5)
        return n({"a": a})[0]

    assert float(jax.grad(f)(jnp.float32(3.0))) == pytest.approx(1.0 / 3.0)


def test_normalizer_state_is_not_a_param_and_updates_under_nnx_grad():
    class M(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.float32(2.0))
            self.norm = LossNormalizer(["x"], decay=0.9)

    m = M()

    def loss(m):
        return m.norm({"x": jnp.square(m.w[...])})[0]

    g = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(m)
    assert int(m.norm.count[...]) == 1  # the running statistic was updated in place
    assert len(jax.tree.leaves(nnx.state(m, nnx.Param))) == 1
    assert float(g.w[...]) == pytest.approx(2 * 2.0 / 4.0)  # d(w^2)/dw / r, r = 4

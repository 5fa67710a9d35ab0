"""Shortcut forcing equations checked against hand values and plain-numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamer4.dynamics.shortcut import (
    bootstrap_loss,
    bootstrap_target,
    corrupt,
    denoise_frame,
    flow_loss,
    ramp_weight,
    sample_tau_d,
    shortcut_forcing_loss,
    shortcut_forcing_terms,
    step_size_grid,
    x_to_v,
)

# ----------------------------------------------------------------------------- grid and sampling


def test_step_size_grid():
    np.testing.assert_array_equal(step_size_grid(8), [1.0, 0.5, 0.25, 0.125])
    np.testing.assert_array_equal(step_size_grid(1), [1.0])
    for bad in (0, 3, 6, 12, -4, 2.5):
        with pytest.raises(ValueError):
            step_size_grid(bad)


def test_sample_tau_d_distribution():
    n = 200_000
    tau, d = sample_tau_d(jax.random.key(0), (n,), 8)
    assert tau.shape == d.shape == (n,) and tau.dtype == d.dtype == jnp.float32
    tau, d = np.asarray(tau, np.float64), np.asarray(d, np.float64)
    grid = [1.0, 0.5, 0.25, 0.125]
    assert np.isin(d, grid).all()
    k = tau / d  # tau must be an integer multiple of its own d, below 1
    np.testing.assert_array_equal(k, np.round(k))
    assert (tau >= 0).all() and (tau < 1).all() and (tau + d <= 1).all()
    assert (tau == 0).any()
    for g in grid:  # d uniform over the powers of two
        assert abs(np.mean(d == g) - 0.25) < 0.01
    sub = tau[d == 0.25]  # tau uniform over {0, 1/4, 1/2, 3/4} given d = 1/4
    assert set(np.unique(sub)) == {0.0, 0.25, 0.5, 0.75}
    for v in (0.0, 0.25, 0.5, 0.75):
        assert abs(np.mean(sub == v) - 0.25) < 0.02


def test_sample_tau_d_per_time_step():
    tau, d = sample_tau_d(jax.random.key(1), (16, 32), 16)
    assert tau.shape == d.shape == (16, 32)
    # Independent per (b, t): a row is not one repeated value.
    assert len(np.unique(np.asarray(d))) > 1 and len(np.unique(np.asarray(d)[0])) > 1


# ----------------------------------------------------------------------------- loss pieces


def test_corrupt_hand_values():
    z0, z1 = jnp.zeros((1, 3, 2, 2)), jnp.full((1, 3, 2, 2), 4.0)
    tau_BT = jnp.array([[0.0, 1.0, 0.25]])
    z = np.asarray(corrupt(z1, z0, tau_BT))
    np.testing.assert_allclose(z[0, 0], 0.0)  # tau = 0: pure noise (z0)
    np.testing.assert_allclose(z[0, 1], 4.0)  # tau = 1: clean (z1)
    np.testing.assert_allclose(z[0, 2], 1.0)  # 0.75 * 0 + 0.25 * 4
    # Nonzero noise: tau = 0.25, z0 = 2, z1 = 4 -> 0.75 * 2 + 0.25 * 4 = 2.5
    np.testing.assert_allclose(corrupt(jnp.full((1, 1, 1), 4.0), jnp.full((1, 1, 1), 2.0), jnp.array([[0.25]])), 2.5)


def test_ramp_weight():
    np.testing.assert_allclose(ramp_weight(jnp.array([0.0, 1.0, 0.5])), [0.1, 1.0, 0.55], rtol=1e-6)


def test_flow_loss_hand_values():
    z1 = jnp.zeros((1, 2, 2, 1))
    z1_hat = jnp.array([[[[1.0], [3.0]], [[2.0], [0.0]]]])
    # per step: mean of squares: (1 + 9)/2 = 5, (4 + 0)/2 = 2
    np.testing.assert_allclose(flow_loss(z1_hat, z1), [[5.0, 2.0]])


def test_x_to_v_and_bootstrap_loss_hand_values():
    one = jnp.ones((1, 1, 1, 1))
    tau = jnp.full((1, 1), 0.5)
    # v = (1 - 0.5) / (1 - 0.5) = 1
    np.testing.assert_allclose(x_to_v(one, 0.5 * one, tau), 1.0)
    # (1 - tau)^2 (v - target)^2 = 0.25 * 0.25
    np.testing.assert_allclose(bootstrap_loss(one, 0.5 * one, tau, 0.5 * one), [[0.0625]])
    # tau = 0.75, z1_hat = 2, z = 1: v = 1 / 0.25 = 4; target 2 -> 0.0625 * 4 = 0.25
    np.testing.assert_allclose(bootstrap_loss(2 * one, one, jnp.full((1, 1), 0.75), 2 * one), [[0.25]])
    np.testing.assert_allclose(bootstrap_target(jnp.array(1.0), jnp.array(2.0)), 1.5)


def test_x_space_v_space_identity():
    """||z1_hat - z1||^2 = (1 - tau)^2 ||v_hat - v||^2 with v = (z1 - z_tau)/(1 - tau)."""
    rng = np.random.default_rng(0)
    B, T, L, N = 2, 3, 4, 5
    z0, z1, z1_hat = (rng.normal(size=(B, T, L, N)) for _ in range(3))
    tau = rng.uniform(0.0, 0.95, size=(B, T))
    t = tau[..., None, None]
    z_tau = (1 - t) * z0 + t * z1
    v = (z1 - z_tau) / (1 - t)
    v_hat = (z1_hat - z_tau) / (1 - t)
    lhs = ((z1_hat - z1) ** 2).mean(axis=(2, 3))
    rhs = (1 - tau) ** 2 * ((v_hat - v) ** 2).mean(axis=(2, 3))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10)
    # The module's two losses agree the same way when the bootstrap target is the true velocity.
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    np.testing.assert_allclose(flow_loss(f32(z1_hat), f32(z1)), lhs, rtol=1e-4)
    np.testing.assert_allclose(bootstrap_loss(f32(z1_hat), f32(z_tau), f32(tau), f32(v)), lhs, rtol=1e-4)


# ----------------------------------------------------------------------------- the objective

B, T, L, N = 2, 4, 3, 2


def _data(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (B, T, L, N)), jax.random.normal(k2, (B, T, L, N))


def test_oracle_gives_zero_loss():
    """An oracle that always predicts the true z1.

    Flow entries: z1_hat = z1, so 0. Bootstrap entries: b' = (z1 - z~)/(1 - tau) = z1 - z0 = v (the
    straight-path velocity), so z' = z~ + v h = z_{tau+h} lies on the same straight path and
    b'' = (z1 - z_{tau+h})/(1 - tau - h) = v again; target v = v_hat, so 0 as well.
    """
    z1, _ = _data()
    loss, m = shortcut_forcing_loss(lambda z, tau, d: z1, z1, jax.random.key(3), 8)
    assert abs(float(loss)) < 1e-9 and abs(float(m["flow"])) < 1e-9 and abs(float(m["bootstrap"])) < 1e-9
    assert 0.0 < float(m["bootstrap_frac"]) < 1.0  # both kinds were sampled (B*T = 8, k_max = 8)


def test_offset_oracle_hand_values():
    """Oracle z1 + 1 at fixed (tau, d), k_max = 4 (d_min = 1/4).

    Flow entries: mean (1)^2 = 1, times w(tau). Bootstrap entries: v_hat = v + 1/(1 - tau);
    b' = v + 1/(1 - tau), z' = z_{tau+h} + h/(1 - tau), so
    b'' = (z1 + 1 - z')/(1 - tau - h) = v + (1 - h/(1 - tau))/(1 - tau - h) = v + 1/(1 - tau):
    the target equals v_hat and the bootstrap loss is 0.
    """
    z1, z0 = _data()
    tau = jnp.array([[0.0, 0.5, 0.75, 0.5], [0.25, 0.0, 0.5, 0.0]])
    d = jnp.array([[0.25, 0.25, 0.25, 0.5], [0.25, 1.0, 0.5, 0.5]])
    loss, m = shortcut_forcing_terms(lambda z, t, s: z1 + 1.0, z1, z0, tau, d, 4)
    flow_w = [0.1, 0.55, 0.775, 0.325]  # w at tau = 0, .5, .75, .25
    np.testing.assert_allclose(m["flow"], np.mean(flow_w), rtol=1e-5)
    np.testing.assert_allclose(m["bootstrap"], 0.0, atol=1e-6)
    np.testing.assert_allclose(m["bootstrap_frac"], 0.5)
    np.testing.assert_allclose(loss, np.sum(flow_w) / 8, rtol=1e-5)
    # Mask: keep only (0, 0) flow (w = 0.1) and (1, 1) bootstrap (0) -> mean 0.05.
    mask = jnp.zeros((2, 4)).at[0, 0].set(1).at[1, 1].set(1)
    loss, m = shortcut_forcing_terms(lambda z, t, s: z1 + 1.0, z1, z0, tau, d, 4, mask)
    np.testing.assert_allclose(loss, 0.05, rtol=1e-5)
    np.testing.assert_allclose(m["bootstrap_frac"], 0.5)


def test_all_flow_when_k_max_is_one():
    """k_max = 1: d = 1 = d_min and tau = 0 always, so the oracle z1 + 1 gives 1 * w(0) = 0.1."""
    z1, _ = _data()
    loss, m = shortcut_forcing_loss(lambda z, tau, d: z1 + 1.0, z1, jax.random.key(0), 1)
    np.testing.assert_allclose(loss, 0.1, rtol=1e-6)
    assert float(m["bootstrap_frac"]) == 0.0


def _reference_loss_and_grad(theta, c, z1, z0, tau, d, k_max):
    """Plain numpy: loss and d loss / d theta for f(z, tau, d) = theta z + c tau, target held fixed."""
    z1, z0, tau, d = (np.asarray(x, np.float64) for x in (z1, z0, tau, d))
    losses, grads = [], []
    for b in range(tau.shape[0]):
        for t in range(tau.shape[1]):
            tt, dd, x1 = tau[b, t], d[b, t], z1[b, t]
            zt = (1 - tt) * z0[b, t] + tt * x1
            pred = theta * zt + c * tt
            w = 0.9 * tt + 0.1
            if dd == 1.0 / k_max:
                losses.append(w * np.mean((pred - x1) ** 2))
                grads.append(w * np.mean(2 * (pred - x1) * zt))
                continue
            h = dd / 2
            b1 = (theta * zt + c * tt - zt) / (1 - tt)
            zm = zt + b1 * h
            b2 = (theta * zm + c * (tt + h) - zm) / (1 - tt - h)
            target = (b1 + b2) / 2
            v_hat = (pred - zt) / (1 - tt)
            losses.append(w * (1 - tt) ** 2 * np.mean((v_hat - target) ** 2))
            # d v_hat / d theta = zt / (1 - tt); the target is a constant.
            grads.append(w * (1 - tt) ** 2 * np.mean(2 * (v_hat - target) * zt / (1 - tt)))
    return np.mean(losses), np.mean(grads)


def test_gradient_treats_bootstrap_target_as_constant():
    z1, z0 = _data(1)
    k_max = 8
    tau, d = sample_tau_d(jax.random.key(5), (B, T), k_max)
    tau = tau.at[0, 0].set(0.5).at[0, 1].set(0.0)  # make sure both kinds occur
    d = d.at[0, 0].set(0.125).at[0, 1].set(0.5)
    theta, c = 0.7, 0.3

    def loss_fn(th):
        predict = lambda z, t, s: th * z + c * t[..., None, None]  # noqa: E731
        return shortcut_forcing_terms(predict, z1, z0, tau, d, k_max)[0]

    loss, grad = jax.value_and_grad(loss_fn)(jnp.float32(theta))
    ref_loss, ref_grad = _reference_loss_and_grad(theta, c, z1, z0, tau, d, k_max)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4)


def test_no_nan_at_clean_and_edge_signal_levels():
    """tau = 1 (a clean step) and tau + d/2 = 1 (off-grid flow entry) must not leak inf/NaN."""
    z1, z0 = _data(2)
    k_max = 4  # d_min = 0.25
    tau = jnp.array([[1.0, 0.875, 0.5, 0.0], [0.75, 1.0, 0.0, 0.25]])
    d = jnp.array([[0.25, 0.25, 0.5, 1.0], [0.25, 0.25, 0.5, 0.25]])
    seen = []

    def make_predict(th):
        def predict(z, t, s):
            seen.append(np.asarray(t))
            return th * z + 0.3 * t[..., None, None]

        return predict

    loss_fn = lambda th: shortcut_forcing_terms(make_predict(th), z1, z0, tau, d, k_max)  # noqa: E731
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.float32(0.9))
    assert np.isfinite(float(loss)) and np.isfinite(float(grad))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert all((s <= 1.0).all() for s in seen)  # tau + h clipped before it reaches the model


# ----------------------------------------------------------------------------- sampling


def test_denoise_frame_oracle_and_call_count():
    target = jnp.arange(6.0).reshape(1, 1, 2, 3)
    for k in (1, 2, 4):
        calls = []

        def predict(z, tau, d, calls=calls):
            calls.append((tau, d))
            return target

        out = denoise_frame(predict, jax.random.key(0), target.shape, k, 4)
        np.testing.assert_array_equal(out, target)
        assert len(calls) == k
        assert calls == [(i / k, 1 / k) for i in range(k)]


def test_denoise_frame_intermediate_states():
    """K = 2 with the oracle target t: the second call sees z = n + (t - n) * 0.5 = (n + t)/2."""
    n = np.asarray(jax.random.normal(jax.random.key(7), (1, 1, 2, 2)))
    target = jnp.full((1, 1, 2, 2), 3.0)
    inputs = []

    def predict(z, tau, d):
        inputs.append(np.asarray(z))
        return target

    denoise_frame(predict, jax.random.key(7), (1, 1, 2, 2), 2, 8)
    np.testing.assert_allclose(inputs[0], n, rtol=1e-6)
    np.testing.assert_allclose(inputs[1], (n + 3.0) / 2, rtol=1e-6)


def test_denoise_frame_rejects_bad_k():
    predict = lambda z, tau, d: z  # noqa: E731
    for k, k_max in ((3, 4), (8, 4), (0, 4), (2, 6)):
        with pytest.raises(ValueError):
            denoise_frame(predict, jax.random.key(0), (1, 2), k, k_max)


def test_flow_steps_enter_half_step_calls_unchanged():
    """The half-step calls move only bootstrap steps; flow steps (d = d_min) keep (z~, tau, d) of the
    main call, so a bootstrap step's context there is what it was in the main call."""
    z1, z0 = _data(4)
    k_max = 4
    tau = jnp.array([[0.25, 0.5, 0.0, 0.75], [0.0, 0.5, 0.25, 0.0]])
    d = jnp.array([[0.25, 0.5, 0.25, 0.25], [1.0, 0.25, 0.5, 0.25]])
    calls = []

    def predict(z, t, s):
        calls.append((np.asarray(z), np.asarray(t), np.asarray(s)))
        return 0.5 * z

    shortcut_forcing_terms(predict, z1, z0, tau, d, k_max)
    assert len(calls) == 3
    z_main, tau_main, d_main = calls[0]
    flow = np.asarray(d) == 0.25
    for z_c, tau_c, d_c in calls[1:]:
        np.testing.assert_array_equal(z_c[flow], z_main[flow])
        np.testing.assert_array_equal(tau_c[flow], tau_main[flow])
        np.testing.assert_array_equal(d_c[flow], d_main[flow])
        np.testing.assert_array_equal(d_c[~flow], np.asarray(d)[~flow] / 2)  # bootstrap: half steps
    # the second half step starts from tau + d/2 for bootstrap entries
    np.testing.assert_allclose(calls[2][1][~flow], (np.asarray(tau) + np.asarray(d) / 2)[~flow])

"""Shortcut forcing: the dynamics objective of Dreamer 4 (sec. 3.2) and the K-step shortcut sampler.

Shape key:
  B batch, T time steps, L latent tokens per step, N latent width.
  z_BTLN latents; tau_BT signal levels; d_BT step sizes (one pair per time step: diffusion forcing).

Notation (paper): tau in [0, 1], tau = 0 pure noise, tau = 1 clean data;
  z_tau = (1 - tau) z0 + tau z1,  z0 ~ N(0, I).
Step sizes d in {1, 1/2, 1/4, ..., 1/K_max}, d_min = 1/K_max. The network f(z~, tau, d, a) predicts
the clean z1 (x-prediction); its implied velocity is v = (z1_hat - z_tau) / (1 - tau).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Predict = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------- step sizes and levels


def _log2_pow2(k, name: str) -> int:
    """Return j with k = 2^j; ValueError unless k is a positive power of two."""
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"{name} must be an integer power of two, got {k!r}") from None
    if k < 1 or k & (k - 1):
        raise ValueError(f"{name} must be a power of two >= 1, got {k}")
    return k.bit_length() - 1


def step_size_grid(k_max: int) -> np.ndarray:
    """d_j = 1 / 2^j for j = 0..log2(k_max): (1, 1/2, ..., 1/k_max), float32, coarsest first."""
    j_max = _log2_pow2(k_max, "k_max")
    return (1.0 / 2.0 ** np.arange(j_max + 1)).astype(np.float32)


def sample_tau_d(key, shape, k_max: int, flow_share: float = 0.0, context_prob: float = 0.0, context_tau: float = 0.9):
    """d = 1 / U({1, 2, 4, ..., K_max});  tau = i d with i ~ U({0, 1, ..., 1/d - 1}).

    So tau lies on the grid reached by steps of size d and tau + d <= 1. Independent per entry of
    `shape` (e.g. (B, T): every time step its own pair). Returns float32 (tau, d), exact powers of
    two and their multiples.

    Two optional departures from the paper's uniform sampling (0 = off, the paper):
    * flow_share > 0: d = d_min (a flow-matching target) with this probability, else d uniform
      over the coarser sizes {1, ..., 2 d_min} (bootstrap targets), as shortcut models do;
    * context_prob > 0: with this probability an entry is a near-clean history step as seen at
      generation time: d = d_min and tau uniform on the k_max grid from the point nearest
      context_tau (round(context_tau k_max) / k_max, the tau embedding's row for it) to 1 - d_min.
      Under uniform per-step levels a step's history is pure noise 39% of the time and at
      tau >= 0.75 only 15% of the time, so the use of clean context is rarely trained.
    """
    j_max = _log2_pow2(k_max, "k_max")
    k_j, k_i = jax.random.split(key)
    k_f, k_c, k_ci = jax.random.split(jax.random.fold_in(key, 1), 3)  # unused by the paper's default
    j = jax.random.randint(k_j, shape, 0, j_max + 1)
    if flow_share > 0 and j_max > 0:
        coarse = jax.random.randint(k_j, shape, 0, j_max)
        j = jnp.where(jax.random.uniform(k_f, shape) < flow_share, j_max, coarse)
    n_steps = jnp.left_shift(1, j)  # 1/d = 2^j grid points for this d
    i = jax.random.randint(k_i, shape, 0, n_steps)  # per-entry upper bound
    d = jnp.ldexp(jnp.float32(1.0), -j)
    tau = i.astype(jnp.float32) * d
    if context_prob > 0:
        lo = min(int(round(context_tau * k_max)), k_max - 1)
        i_ctx = jax.random.randint(k_ci, shape, lo, k_max)
        ctx = jax.random.uniform(k_c, shape) < context_prob
        tau = jnp.where(ctx, i_ctx.astype(jnp.float32) / k_max, tau)
        d = jnp.where(ctx, jnp.float32(1.0 / k_max), d)
    return tau, d


# ----------------------------------------------------------------------------- loss pieces


def _expand_as(x, like):
    """Append singleton axes to x so it broadcasts against `like` from the left (tau_BT vs z_BTLN)."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.reshape(x, x.shape + (1,) * (jnp.ndim(like) - x.ndim))


def _mean_trailing(x, lead: int):
    """Mean over every axis after the first `lead` ones."""
    return jnp.mean(x, axis=tuple(range(lead, x.ndim)))


def corrupt(z1, z0, tau):
    """z_tau = (1 - tau) z0 + tau z1, tau (e.g. tau_BT) broadcast over the trailing dims of z."""
    t = _expand_as(tau, z1)
    return (1.0 - t) * z0 + t * z1


def ramp_weight(tau):
    """w(tau) = 0.9 tau + 0.1: low signal levels carry little learning signal, so weigh them less."""
    return 0.9 * tau + 0.1


def flow_loss(z1_hat, z1):
    """L_flow[b, t] = mean_{l,n} (z1_hat - z1)^2: the x-space flow loss, shape (B, T)."""
    return _mean_trailing(jnp.square(z1_hat - z1), 2)


def x_to_v(z1_hat, z_tau, tau):
    """v = (z1_hat - z_tau) / (1 - tau): the velocity implied by an x-prediction (needs tau < 1)."""
    return (z1_hat - z_tau) / _expand_as(1.0 - tau, z_tau)


def bootstrap_target(b1, b2):
    """v_target = (b' + b'') / 2, the mean velocity of two half steps.

    The caller wraps it in jax.lax.stop_gradient: the target is a constant for the main prediction.
    """
    return (b1 + b2) / 2.0


def bootstrap_loss(z1_hat, z_tau, tau, v_target):
    """L_boot[b, t] = (1 - tau)^2 mean_{l,n} ((z1_hat - z_tau)/(1 - tau) - v_target)^2, shape (B, T).

    The (1 - tau)^2 factor maps the v-space error back to x-space scale, since
    ||x1_hat - x1||^2 = (1 - tau)^2 ||v_hat - v||^2 (paper footnote).
    """
    err = jnp.square(x_to_v(z1_hat, z_tau, tau) - v_target)
    return jnp.square(1.0 - tau) * _mean_trailing(err, jnp.ndim(tau))


def _guarded_velocity(z1_hat, z_tau, tau):
    """v = (z1_hat - z_tau) / (1 - tau) where tau < 1, else 0.

    A clean step (tau >= 1) has no velocity; the guard keeps the division finite so that no
    inf/NaN reaches the loss or its gradient through an unused jnp.where branch.
    """
    live = tau < 1.0
    denom = jnp.where(live, 1.0 - tau, 1.0)
    return jnp.where(_expand_as(live, z_tau), (z1_hat - z_tau) / _expand_as(denom, z_tau), 0.0)


# ----------------------------------------------------------------------------- the objective


def shortcut_forcing_terms(predict: Predict, z1, z0, tau, d, k_max: int, mask_BT=None, ramp: bool = True):
    """Shortcut forcing for given noise z0 and per-step (tau_BT, d_BT); see shortcut_forcing_loss.

    loss = sum_bt m w(tau) L[b, t] / sum_bt m, with
      L = ||z1_hat - z1||^2                                          if d = d_min,
      L = (1 - tau)^2 ||(z1_hat - z~)/(1 - tau) - sg(b' + b'')/2||^2  else,
    z~ = (1 - tau) z0 + tau z1, z1_hat = f(z~, tau, d), h = d/2,
      b' = (f(z~, tau, h) - z~)/(1 - tau),  z' = z~ + b' h,
      b'' = (f(z', tau + h, h) - z')/(1 - (tau + h)).

    Diffusion forcing: one predict call covers all T steps, each with its own (tau_t, d_t); the
    other steps are each step's context. The two half-step calls are also single calls over the
    whole sequence: every bootstrap step takes its own half step (h_t = d_t / 2, z'_t replaces
    z~_t, tau_t + h_t replaces tau_t) while flow steps (d = d_min) enter both calls exactly as in
    the main call (z~_t, tau_t, d_t). So the context a bootstrap step sees in its half steps is the
    main call's, except for the other bootstrap steps, which are half-stepped alongside it. This
    costs 3 passes in all instead of one pair of passes per bootstrap step. tau + h is clipped to 1
    before it is passed to predict.

    Returns (loss, metrics); metrics: `flow` / `bootstrap` = masked means of the weighted
    per-step loss over flow / bootstrap entries, `bootstrap_frac` = their share of valid entries.
    """
    tau = jnp.asarray(tau, jnp.float32)
    d = jnp.asarray(d, jnp.float32)
    # d takes powers of two only, so halfway between d_min and 2 d_min separates the two cases.
    is_boot = d > 1.5 / k_max

    z_tilde = corrupt(z1, z0, tau)
    z1_hat = predict(z_tilde, tau, d)

    # Half steps (values only used where is_boot; stop_gradient makes them constants). Flow steps
    # keep their main-call inputs so that they are the same context as in the main call.
    h = jnp.where(is_boot, d / 2.0, 0.0)
    d_half = jnp.where(is_boot, h, d)
    b1 = _guarded_velocity(predict(z_tilde, tau, d_half), z_tilde, tau)
    z_mid = z_tilde + b1 * _expand_as(h, z_tilde)
    tau_mid = jnp.minimum(tau + h, 1.0)
    b2 = _guarded_velocity(predict(z_mid, tau_mid, d_half), z_mid, tau_mid)
    v_target = jax.lax.stop_gradient(bootstrap_target(b1, b2))

    # Bootstrap entries have tau <= 1 - d < 1; elsewhere feed tau = 0 so 1/(1 - tau) stays finite
    # (an inf in the unused branch would turn into NaN in the gradient).
    tau_boot = jnp.where(is_boot, tau, 0.0)
    per_step = jnp.where(is_boot, bootstrap_loss(z1_hat, z_tilde, tau_boot, v_target), flow_loss(z1_hat, z1))
    if ramp:
        per_step = per_step * ramp_weight(tau)

    m = jnp.ones(tau.shape, jnp.float32) if mask_BT is None else jnp.asarray(mask_BT, jnp.float32)
    m_boot = m * is_boot
    m_flow = m - m_boot

    def masked_mean(x, w):
        return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)  # 0 when nothing is valid

    metrics = {
        "flow": masked_mean(per_step, m_flow),
        "bootstrap": masked_mean(per_step, m_boot),
        "bootstrap_frac": jnp.sum(m_boot) / jnp.maximum(jnp.sum(m), 1.0),
    }
    return masked_mean(per_step, m), metrics


def shortcut_forcing_loss(
    predict: Predict,
    z1,
    key,
    k_max: int,
    mask_BT=None,
    *,
    flow_share: float = 0.0,
    context_prob: float = 0.0,
    context_tau: float = 0.9,
    ramp: bool = True,
):
    """Shortcut forcing objective: sample z0 ~ N(0, I) and (tau_BT, d_BT), then shortcut_forcing_terms.

    predict(z_tilde_BTLN, tau_BT, d_BT) -> z1_hat_BTLN closes over the model and the actions.
    mask_BT (default all ones) marks the valid steps. Returns (loss, metrics).
    """
    B, T = z1.shape[:2]
    k_td, k_noise = jax.random.split(key)
    tau, d = sample_tau_d(k_td, (B, T), k_max, flow_share, context_prob, context_tau)
    z0 = jax.random.normal(k_noise, z1.shape, jnp.float32)
    return shortcut_forcing_terms(predict, z1, z0, tau, d, k_max, mask_BT, ramp)


# ----------------------------------------------------------------------------- sampling


def denoise_frame(predict: Predict, key, shape, k: int, k_max: int, *, carry=None):
    """K shortcut steps from noise, d = 1/K:  z <- z + (f(z, tau, d) - z)/(1 - tau) d,  tau <- tau + d.

    Starts at z ~ N(0, I) (shape `shape`), tau = 0. predict(z, tau, d) receives the current z of
    `shape` and tau, d as Python floats on the grid (the caller broadcasts them to its batch and
    supplies the sequence context / KV cache). At the last step tau + d = 1 makes the update land
    on the x-prediction itself (z + (z1_hat - z) = z1_hat up to rounding), so that prediction is
    returned exactly. K must be a power of two <= k_max (the finest step the model learned).
    Makes exactly K predict calls.

    With `carry` (any pytree, e.g. a KV cache), the K steps run in one `lax.fori_loop` (one traced
    model call whatever K, so compile time does not grow with K): predict(z, tau, d, carry) ->
    (z1_hat, carry) gets tau as a traced float32 scalar, and (z1_hat, carry) is returned.
    """
    _log2_pow2(k, "K (sampling steps)")
    _log2_pow2(k_max, "k_max")
    if k > k_max:
        raise ValueError(f"K = {k} sampling steps is finer than the model's finest step 1/k_max = 1/{k_max}")
    d = 1.0 / k
    z = jax.random.normal(key, shape, jnp.float32)
    if carry is not None:

        def body(i, c):
            z, _, inner = c
            tau = i.astype(jnp.float32) * np.float32(d)
            z1_hat, inner = predict(z, tau, d, inner)
            z1_hat = z1_hat.astype(jnp.float32)
            # at i = K - 1 this lands on z1_hat (unused: z1_hat itself is returned)
            return z + (z1_hat - z) * (np.float32(d) / (1.0 - tau)), z1_hat, inner

        _, z1_hat, carry = jax.lax.fori_loop(0, k, body, (z, z, carry))
        return z1_hat, carry
    z1_hat = z
    for i in range(k):
        tau = i * d
        z1_hat = predict(z, tau, d)
        if i < k - 1:
            z = z + (z1_hat - z) * (d / (1.0 - tau))
    return z1_hat

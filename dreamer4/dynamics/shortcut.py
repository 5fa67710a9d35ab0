"""Shortcut forcing (Dreamer 4 eq. for the dynamics loss) and the K-step shortcut denoiser.

Shape key: B batch, T time, L latents, N latent width; tau_BT signal levels, d_BT step sizes.

tau in [0, 1]: 0 = pure noise, 1 = clean. z_tau = (1 - tau) z0 + tau z1, z0 ~ N(0, I).
The network predicts the clean z1 (x-prediction). Step sizes d in {1, 1/2, ..., 1/K_max}.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _check_pow2(k: int, name: str) -> None:
    if k < 1 or k & (k - 1):
        raise ValueError(f"{name} must be a power of two >= 1, got {k}")


def step_size_grid(k_max: int) -> np.ndarray:
    """(1, 1/2, 1/4, ..., 1/k_max)."""
    _check_pow2(k_max, "k_max")
    return 1.0 / 2.0 ** np.arange(int(math.log2(k_max)) + 1)


def sample_tau_d(key, shape, k_max: int):
    """d = 1 / U({1, 2, 4, ..., K_max}); tau ~ U({0, d, 2d, ..., 1 - d}), independently per entry."""
    grid = jnp.asarray(step_size_grid(k_max), jnp.float32)
    k_d, k_tau = jax.random.split(key)
    d = grid[jax.random.randint(k_d, shape, 0, len(grid))]
    steps = jnp.round(1.0 / d)  # number of grid points for this d
    tau = jnp.floor(jax.random.uniform(k_tau, shape) * steps) * d
    return tau, d


def _bcast(x_BT, like):
    return jnp.reshape(x_BT, x_BT.shape + (1,) * (like.ndim - x_BT.ndim))


def corrupt(z1, z0, tau):
    """z_tau = (1 - tau) z0 + tau z1 (tau broadcast over trailing dims)."""
    t = _bcast(jnp.asarray(tau, jnp.float32), z1)
    return (1.0 - t) * z0 + t * z1


def ramp_weight(tau):
    """w(tau) = 0.9 tau + 0.1: more weight where the signal carries more learning signal."""
    return 0.9 * tau + 0.1


def flow_loss(z1_hat, z1):
    """||z1_hat - z1||^2, mean over the trailing dims: (B, T)."""
    return jnp.mean(((z1_hat - z1) ** 2).reshape(z1.shape[:2] + (-1,)), axis=-1)


def x_to_v(z1_hat, z_tau, tau):
    """v = (z1_hat - z_tau) / (1 - tau): the velocity implied by an x-prediction."""
    return (z1_hat - z_tau) / _bcast(1.0 - tau, z_tau)


def bootstrap_target(b1, b2):
    """(b' + b'') / 2; the caller stops its gradient."""
    return (b1 + b2) / 2.0


def bootstrap_loss(z1_hat, z_tau, tau, v_target):
    """(1 - tau)^2 ||(z1_hat - z_tau)/(1 - tau) - v_target||^2, mean over trailing dims: (B, T)."""
    err = (x_to_v(z1_hat, z_tau, tau) - v_target) ** 2
    return (1.0 - tau) ** 2 * jnp.mean(err.reshape(tau.shape + (-1,)), axis=-1)


def shortcut_forcing_loss(predict: Callable, z1, key, k_max: int, mask_BT=None):
    """Shortcut forcing with per-step (tau_t, d_t) (diffusion forcing) and the ramp weight.

    predict(z_tilde_BTLN, tau_BT, d_BT) -> z1_hat_BTLN. Each time step takes its own corruption,
    so the other steps of the sequence are its (noisy) context. For d_t = d_min: flow loss in
    x-space. Otherwise two half steps of the model itself, h = d/2, every step taking its own:
        b' = (f(z~, tau, h) - z~) / (1 - tau),  z' = z~ + b' h,
        b'' = (f(z', tau + h, h) - z') / (1 - (tau + h)),
    and the bootstrap loss (1 - tau)^2 ||(z1_hat - z~)/(1 - tau) - sg(b' + b'')/2||^2.
    Returns (mean loss over mask_BT, metrics).
    """
    B, T = z1.shape[:2]
    k_td, k_noise = jax.random.split(key)
    tau, d = sample_tau_d(k_td, (B, T), k_max)
    z0 = jax.random.normal(k_noise, z1.shape, jnp.float32)
    z_tilde = corrupt(z1, z0, tau)
    z1_hat = predict(z_tilde, tau, d)
    d_min = 1.0 / k_max
    is_flow = d <= d_min + 1e-9

    h = d / 2.0
    b1 = x_to_v(predict(z_tilde, tau, h), z_tilde, tau)
    z_mid = z_tilde + b1 * _bcast(h, z_tilde)
    tau_mid = tau + h
    # Where tau + h reaches 1 (only possible for flow entries, whose bootstrap value is unused),
    # keep the division finite.
    safe = jnp.where(tau_mid < 1.0, tau_mid, 0.0)
    b2 = x_to_v(predict(z_mid, safe, h), z_mid, safe)
    v_target = jax.lax.stop_gradient(bootstrap_target(b1, b2))

    per_step = jnp.where(is_flow, flow_loss(z1_hat, z1), bootstrap_loss(z1_hat, z_tilde, tau, v_target))
    per_step = per_step * ramp_weight(tau)
    m = jnp.ones((B, T), jnp.float32) if mask_BT is None else mask_BT.astype(jnp.float32)
    loss = jnp.sum(per_step * m) / jnp.maximum(m.sum(), 1.0)
    fm, bm = m * is_flow, m * (~is_flow)
    metrics = {
        "flow": jnp.sum(per_step * fm) / jnp.maximum(fm.sum(), 1.0),
        "bootstrap": jnp.sum(per_step * bm) / jnp.maximum(bm.sum(), 1.0),
        "bootstrap_frac": bm.sum() / jnp.maximum(m.sum(), 1.0),
    }
    return loss, metrics


def denoise_frame(predict: Callable, key, shape, k: int, k_max: int):
    """K shortcut steps from noise: z <- z + (f(z, tau, d) - z) / (1 - tau) * d, tau <- tau + d.

    predict(z, tau, d) takes scalar tau and d (the caller handles context and caches). After the
    last step z equals the last x-prediction (tau reaches 1), which is returned exactly.
    """
    _check_pow2(k, "K (sampling steps)")
    if k > k_max:
        raise ValueError(f"K = {k} sampling steps exceeds k_max = {k_max} (the finest step the model learned)")
    z = jax.random.normal(key, shape, jnp.float32)
    d = 1.0 / k
    z1_hat = z
    for i in range(k):
        tau = i * d
        z1_hat = predict(z, tau, d)
        z = z + (z1_hat - z) / (1.0 - tau) * d
    return z1_hat

"""Small shared layers: RMSNorm, SwiGLU, rotary embeddings, logit soft-capping.

Shape key: B batch, T time, S tokens, K heads, H head width, D model width, F MLP hidden width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_norm(x, scale, eps: float = 1e-6):
    """y = x / sqrt(mean(x^2) + eps) * scale, statistics in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


class SwiGLU(nnx.Module):
    """y = W_down (silu(W_gate x) * (W_up x))."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        kw = dict(use_bias=False, rngs=rngs, dtype=dtype)
        self.gate = nnx.Linear(dim, hidden, **kw)
        self.up = nnx.Linear(dim, hidden, **kw)
        self.down = nnx.Linear(hidden, dim, **kw)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def soft_cap(logits, cap: float):
    """cap * tanh(logits / cap); cap <= 0 leaves the logits unchanged."""
    if cap <= 0:
        return logits
    return cap * jnp.tanh(logits / cap)


def apply_rope(x_NH, positions_N, base: float = 10000.0):
    """Rotary position embedding on the last dim (even width H), for integer positions.

    Pairs (x_i, x_{i+H/2}) are rotated by angle pos * base^(-2i/H), so that the dot product of a
    query at position m and a key at position n depends only on m - n.
    `positions` broadcasts against x's leading dims (x: (..., H), positions: (...)).
    """
    H = x_NH.shape[-1]
    half = H // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / H)
    angle = jnp.asarray(positions_N, jnp.float32)[..., None] * freq
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x32 = x_NH.astype(jnp.float32)
    a, b = x32[..., :half], x32[..., half:]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(x_NH.dtype)

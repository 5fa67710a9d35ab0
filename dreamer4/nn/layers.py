"""Small shared layers: RMS normalisation, the SwiGLU MLP, rotary position embeddings, soft-capping.

Shape key (suffixes of array names in this file):
    N    any number of leading dims (batch, time, tokens, heads ...)
    D    model width
    F    MLP hidden width (2F: the gate and up projections stacked, (..., 2, F))
    H    head width (the last dim RoPE rotates; must be even)
    J    H / 2 rotation frequencies

Numerics: statistics (RMS) and rotations are computed in float32 and cast back to the input's dtype,
so bf16 activations lose nothing there; parameters live in `param_dtype` (float32 by default) and
matmuls run in `dtype` (the compute dtype).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def rms_norm(x_ND, scale_D, eps: float = 1e-6):
    """Root-mean-square normalisation over the last dim.

        y = x / sqrt(mean_d(x_d^2) + eps) * scale

    Computed in float32 (bf16 sums of squares are too coarse), returned in x's dtype.
    """
    x32 = x_ND.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (x32 * inv_rms * scale_D.astype(jnp.float32)).astype(x_ND.dtype)


class RMSNorm(nnx.Module):
    """RMS normalisation with a learned per-channel scale (initialised to 1): see `rms_norm`."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x_ND):
        return rms_norm(x_ND, self.scale[...], self.eps)


class SwiGLU(nnx.Module):
    """Gated MLP:  y = W_down (silu(W_gate x) * (W_up x)),  silu(a) = a * sigmoid(a).

    `hidden` is the gate/up width F; no biases (as in most modern transformers).

    Compiled for a GPU or TPU, the gate and up projections run as one matmul (`stacked_linear`) and
    the activation has its own backward (`glu`), so the backward's dx is one matmul too: for an
    H100 (`benchmarks/gpu_hlo.py`), 201.5 GB of memory traffic per classic tokenizer step instead of
    208.9 (dynamics 167.0 instead of 170.2), in 48 (120) fewer GEMMs. XLA:CPU ran that form slower
    (the tiny tokenizer step ~8%, the layer alone ~20%), so a CPU keeps two matmuls and a
    checkpointed activation (`_glu`). The parameters are the same three layers either way.
    """

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.w_gate = nnx.Linear(dim, hidden, **kw)
        self.w_up = nnx.Linear(dim, hidden, **kw)
        self.w_down = nnx.Linear(hidden, dim, **kw)

    def __call__(self, x_ND):
        # chosen when the step is lowered for its platform, not by the backend of this process
        return jax.lax.platform_dependent(x_ND, cpu=self.separate, default=self.fused)

    def separate(self, x_ND):
        """The CPU form: y = W_down _glu(W_gate x, W_up x)."""
        return self.w_down(_glu(self.w_gate(x_ND), self.w_up(x_ND)))

    def fused(self, x_ND):
        """The GPU/TPU form: y = W_down glu(x [W_gate, W_up]) (stacked); the same values as `separate`."""
        return self.w_down(glu(stacked_linear(x_ND, (self.w_gate, self.w_up))))


@jax.checkpoint
def _glu(g_NF, u_NF):
    """h = silu(g) * u, recomputed in the backward pass from g and u (saved anyway, as the outputs
    of the gate and up matmuls): XLA then computes dg and du in one kernel that reads dh, g and u
    (compiled for an H100, the classic tokenizer step moved 251.2 GB instead of 261.9 with it;
    BENCHMARKS.md, "Session 33"). Used on a CPU; elsewhere `glu`."""
    return jax.nn.silu(g_NF) * u_NF


def stacked_linear(x_ND, linears):
    """y[..., k, :] = x W_k for bias-free nnx.Linear layers of one shape that read the same x, as
    ONE matmul over the weights stacked as D x K x F (the same values as calling each layer; with
    K between the contracted D and F, the stack is one D x KF matrix in memory, no transpose).
    x is read once, and the backward's dx is one matmul instead of a sum of several. Stacked on a
    new axis, not concatenated along F: each weight keeps its FSDP sharding (a concatenation along
    the sharded F made XLA reshard with all-to-alls). (Not used for
    attention's q, k, v: their gradients come from separate kernels, and joining them into one
    array for the backward cost more memory traffic than the fused matmul saved.)"""
    kernels = [lin.kernel[...] for lin in linears]
    x_ND, *kernels = linears[0].promote_dtype((x_ND, *kernels), dtype=linears[0].dtype)
    return jnp.einsum("...d,dkf->...kf", x_ND, jnp.stack(kernels, axis=1))


@jax.custom_vjp
def glu(gu_N2F):
    """h = silu(g) * u  for  gu[..., 0, :] = g, gu[..., 1, :] = u  (the gate and up projections
    stacked, as `stacked_linear` returns them).

    Backward, with s = sigmoid(g):  dg = dh u s (1 + g (1 - s)),  du = dh silu(g), returned as one
    array like gu, computed in float32 from dh, g and u (saved anyway: the matmul's output), in
    one kernel that reads dh and gu and writes [dg, du]. With autodiff through the split, XLA
    joined dg and du in a second pass (the classic tokenizer step for an H100: 271.3 GB instead
    of ~202).
    """
    return jax.nn.silu(gu_N2F[..., 0, :]) * gu_N2F[..., 1, :]


def _glu_fwd(gu_N2F):
    return glu(gu_N2F), gu_N2F


def _glu_bwd(gu_N2F, dh_NF):
    # A select over (..., 2, f) rather than stack([dg, du]): XLA then emits one elementwise kernel
    # that reads dh, g, u and writes [dg, du] (a concatenate was a second pass).
    gu32 = gu_N2F.astype(jnp.float32)
    g, u = gu32[..., :1, :], gu32[..., 1:, :]
    dh = dh_NF.astype(jnp.float32)[..., None, :]
    s = jax.nn.sigmoid(g)
    is_gate = jax.lax.broadcasted_iota(jnp.int32, gu32.shape, gu32.ndim - 2) == 0
    dgu = jnp.where(is_gate, dh * u * s * (1 + g * (1 - s)), dh * g * s)
    return (dgu.astype(gu_N2F.dtype),)


glu.defvjp(_glu_fwd, _glu_bwd)


# Masked attention logits get this instead of -inf, so a fully masked row gives a uniform (finite)
# softmax rather than NaN (masks built in nn/attention.py never leave a row empty).
MASKED_LOGIT = float(np.finfo(np.float32).min)


def soft_cap(logits, cap: float):
    """Smoothly bound logits to (-cap, cap):  y = cap * tanh(logits / cap).

    Near zero y ~= logits, so small logits are unchanged; `cap <= 0` disables capping (identity).
    `cap` is a Python number (static), so the choice is made at trace time.
    """
    if cap is None or cap <= 0:
        return logits
    return cap * jnp.tanh(logits / cap)


def rope_frequencies(head_dim: int, base: float = 10000.0):
    """Rotation frequencies freq_J for RoPE:  freq_j = base^(-2j / H),  j = 0 .. H/2 - 1.

    Returns a float32 array of H/2 values, from 1 (fastest) down towards 1/base (slowest).
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head width, got {head_dim}")
    j_J = jnp.arange(head_dim // 2, dtype=jnp.float32)
    return base ** (-2.0 * j_J / head_dim)


def apply_rope(x_NH, positions, base: float = 10000.0):
    """Rotary position embedding on the last dim, for integer (or float) positions.

    Channel pairs (a_j, b_j) = (x_j, x_{j + H/2}) are rotated by the angle theta_j = pos * freq_j:

        a'_j = a_j cos(theta_j) - b_j sin(theta_j)
        b'_j = a_j sin(theta_j) + b_j cos(theta_j)

    Rotations compose, so <rope(q, m), rope(k, n)> = <q, R(n - m) k>: attention logits between a
    query at position m and a key at position n depend only on the offset m - n.
    `positions` broadcasts against x's leading dims (x: (..., H), positions: shape of x[..., 0] or
    broadcastable to it, e.g. positions_T[:, None] for x_NTKH).
    Computed in float32, returned in x's dtype.
    """
    H = x_NH.shape[-1]
    freq_J = rope_frequencies(H, base)
    theta_NJ = jnp.asarray(positions, jnp.float32)[..., None] * freq_J
    cos, sin = jnp.cos(theta_NJ), jnp.sin(theta_NJ)
    x32 = x_NH.astype(jnp.float32)
    a_NJ, b_NJ = x32[..., : H // 2], x32[..., H // 2 :]
    out = jnp.concatenate([a_NJ * cos - b_NJ * sin, a_NJ * sin + b_NJ * cos], axis=-1)
    return out.astype(x_NH.dtype)


def apply_rope_2d(x_NH, rows, cols, base: float = 10000.0):
    """Two-axis rotary embedding: the first half of the last dim is rotated by the row position,
    the second half by the column position (each half as in `apply_rope`).

    Logits then depend only on the offset (row_m - row_n, col_m - col_n), so "the latent one tile to
    the left" is the same query-key relation at every position of a grid. H must divide by 4.
    """
    H = x_NH.shape[-1]
    if H % 4:
        raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {H}")
    return jnp.concatenate(
        [apply_rope(x_NH[..., : H // 2], rows, base), apply_rope(x_NH[..., H // 2 :], cols, base)], -1
    )


# -- parameters broadcast over batch and time ---------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tile(p, n: int):
    return jnp.broadcast_to(p, (n,) + p.shape)


def _tile_fwd(p, n):
    return _tile(p, n), p  # the residual is the parameter itself: alive anyway, no extra memory


def _tile_bwd(n, p, g_N):
    g_NK = g_N.reshape(n, -1)
    dp_1K = jnp.dot(jnp.ones((1, n), g_NK.dtype), g_NK, preferred_element_type=jnp.float32)
    return (dp_1K.reshape(p.shape).astype(p.dtype),)


_tile.defvjp(_tile_fwd, _tile_bwd)


def broadcast_param(p, lead: tuple[int, ...]):
    """p broadcast to lead + p.shape (e.g. a position table p_SD to x_BTSD's (B, T)).

    Forward: y[i..., :] = p for every lead index. Backward: dL/dp = sum over the lead dims of g,
    computed as the product ones_(1 x n) @ g_(n x p.size) (n = prod(lead)), accumulated in float32.
    Why a product and not `sum`: as a reduction over the leading dims of a stream-sized gradient,
    XLA's GPU layout assignment made those dims minor-most and carried that layout through the
    whole residual stream, so every layer transposed it (classic tokenizer step: 25 GB of extra
    memory traffic per step; BENCHMARKS.md, "The classic steps compiled for an H100 on a CPU"); a
    matmul operand keeps the natural row-major layout.
    """
    lead = tuple(int(d) for d in lead)
    return _tile(p, math.prod(lead)).reshape(lead + p.shape)

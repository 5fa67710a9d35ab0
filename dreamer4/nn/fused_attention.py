"""Soft-capped grouped-query attention as fused GPU kernels (Pallas, Triton backend), forward and backward.

Shape key (suffixes of array names in this file):
    N    flattened leading dims (batch x time for space attention, batch x tokens for time attention)
    Q    query positions;  Qp  Q rounded up to a power of two (Triton's block sizes)
    M    key/value positions;  Mp  M rounded up likewise
    K    query heads
    G    key/value heads (K % G == 0; query head k reads key/value head k // (K / G))
    H    head width

Why: `attention.einsum_attention` writes float32 logits of every (sequence, head) to memory and
reads them back for the soft-cap, the mask, the softmax and again in the backward pass, and moves
q, k, v and the output between token-major and head-major layouts; jax.nn's fused kernels
(cuDNN) cannot soft-cap. The sequences here are short (a frame's 80 tokens, a clip's 16-64 steps),
so one program holds a whole sequence of one head: q, k, v, the logits and the probabilities stay
on chip, nothing logits-sized touches memory, and no online softmax is needed.

Forward, one program per (n, query head k), g = k // R:
    s = q k^T / sqrt(H);  l = cap * tanh(s / cap) (cap > 0, else l = s);  l = float32 min where masked
    p = softmax_m(l);  out = p v;  lse = max_m l + log sum_m exp(l - max_m l)   (saved for the backward)
Backward, one program per (n, k), recomputing p = exp(l - lse):
    dv = p^T do;  dp = do v^T;  dl = p * (dp - delta),  delta = sum_h do * out
    ds = dl * (1 - tanh^2(s / cap)) (cap > 0, else ds = dl);  dq = ds k / sqrt(H);  dk = ds^T q / sqrt(H)
The backward's program takes one key/value head and its R query heads, so dk and dv are summed
over the group on chip.

Numerics match `einsum_attention`: float32 logits, soft-cap, mask and softmax; the products with v
(and the backward's products) take v's dtype. Lowered for a CUDA device the kernels compile with
Triton; for any other platform they run through Pallas' interpreter (the CPU tests use it), and
`interpret=True` forces the interpreter everywhere.
Sequences up to 256 positions (one block); longer ones, and attention with a logit bias, stay on
the einsum path (`attention.dot_product_attention` decides). The kernels carry no SPMD
partitioning rule and no shard_map wrapper yet: they are meant for one-device runs (untested on a
multi-device mesh).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dreamer4.nn.layers import MASKED_LOGIT

MAX_LEN = 256  # one block per sequence: q, k, v and Qp x Mp float32 logits in one program


def supported(q_NQKH, k_NMGH) -> bool:
    """Whether the kernels take these shapes: sequences up to MAX_LEN, head width a power of two >= 16."""
    Q, M, H = q_NQKH.shape[1], k_NMGH.shape[1], q_NQKH.shape[-1]
    return Q <= MAX_LEN and M <= MAX_LEN and H >= 16 and (H & (H - 1)) == 0


def _logits(q, k, qk_valid, cap: float, scale: float):
    """(l, t): masked, capped float32 logits of one (sequence, head) and tanh(s / cap) (None without a cap)."""
    s = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * scale
    t = None
    if cap > 0:
        t = jnp.tanh(s / cap)
        s = cap * t
    return jnp.where(qk_valid, s, MASKED_LOGIT), t


def _valid(mask_ref, Q: int, M: int):
    Qp, Mp = mask_ref.shape
    rows, cols = jnp.arange(Qp) < Q, jnp.arange(Mp) < M
    inside = rows[:, None] & cols[None, :]
    return rows, cols, inside & (plgpu.load(mask_ref, mask=inside, other=0) != 0)


def _squeeze(x_Q1H):
    return x_Q1H.reshape(x_Q1H.shape[0], x_Q1H.shape[2])


def _fwd_kernel(q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, *, Q, M, cap, scale):
    rows, cols, valid = _valid(mask_ref, Q, M)
    q = plgpu.load(q_ref, mask=rows[:, None], other=0.0)
    k = plgpu.load(k_ref, mask=cols[:, None], other=0.0)
    v = plgpu.load(v_ref, mask=cols[:, None], other=0.0)
    l, _ = _logits(q, k, valid, cap, scale)
    m = jnp.max(l, axis=1)
    e = jnp.exp(l - m[:, None])
    e = jnp.where(cols[None, :], e, 0.0)  # padding keys: not part of the sequence at all
    total = jnp.sum(e, axis=1)
    out = plgpu.dot(e.astype(v.dtype), v).astype(jnp.float32) / total[:, None]
    plgpu.store(o_ref, out.astype(o_ref.dtype), mask=rows[:, None])
    plgpu.store(lse_ref, m + jnp.log(total), mask=rows)


def _bwd_kernel(
    q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, *, Q, M, R, cap, scale
):
    """One program per (n, key/value head g): the R query heads that read g in turn, dk and dv
    summed over them on chip."""
    rows, cols, valid = _valid(mask_ref, Q, M)
    k = plgpu.load(k_ref, mask=cols[:, None], other=0.0)
    v = plgpu.load(v_ref, mask=cols[:, None], other=0.0)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for r in range(R):  # static: R is 1-4 here
        head = pl.ds(r, 1)
        q = _squeeze(plgpu.load(q_ref.at[:, head, :], mask=rows[:, None, None], other=0.0))
        do = _squeeze(plgpu.load(do_ref.at[:, head, :], mask=rows[:, None, None], other=0.0))
        lse = plgpu.load(lse_ref.at[head, :], mask=rows[None, :], other=0.0).reshape(rows.shape)
        delta = plgpu.load(delta_ref.at[head, :], mask=rows[None, :], other=0.0).reshape(rows.shape)
        l, t = _logits(q, k, valid, cap, scale)
        p = jnp.where(rows[:, None] & cols[None, :], jnp.exp(l - lse[:, None]), 0.0)
        dv += plgpu.dot(p.astype(do.dtype), do, trans_a=True).astype(jnp.float32)
        dp = plgpu.dot(do, v, trans_b=True).astype(jnp.float32)
        ds = p * (dp - delta[:, None])
        if cap > 0:
            ds = ds * (1.0 - t * t)
        ds = (ds * scale).astype(q.dtype)
        dq = plgpu.dot(ds, k).astype(dq_ref.dtype)
        plgpu.store(dq_ref.at[:, head, :], dq.reshape(dq.shape[0], 1, dq.shape[1]), mask=rows[:, None, None])
        dk += plgpu.dot(ds, q, trans_a=True).astype(jnp.float32)
    plgpu.store(dk_ref, dk.astype(dk_ref.dtype), mask=cols[:, None])
    plgpu.store(dv_ref, dv.astype(dv_ref.dtype), mask=cols[:, None])


def _padded(n: int) -> int:
    """Block length for n positions: a power of two (Triton), at least 16 (its matmul's minimum)."""
    return max(16, pl.next_power_of_2(n))


def _specs(Q, M, K, G, H, per_batch_mask: bool, grouped: bool):
    """Block specs (q, k/v, mask, lse/delta rows) for the grid (N, K), or with `grouped` for the
    grid (N, G) whose program takes the R = K / G query heads of one key/value head."""
    Qp, Mp, R = _padded(Q), _padded(M), K // G
    if grouped:
        q_spec = pl.BlockSpec((None, Qp, R, H), lambda n, g: (n, 0, g, 0))
        kv_spec = pl.BlockSpec((None, Mp, None, H), lambda n, g: (n, 0, g, 0))
        row_spec = pl.BlockSpec((None, R, Qp), lambda n, g: (n, g, 0))  # lse, delta: N K Q
    else:
        q_spec = pl.BlockSpec((None, Qp, None, H), lambda n, h: (n, 0, h, 0))
        kv_spec = pl.BlockSpec((None, Mp, None, H), lambda n, h: (n, 0, h // R, 0))
        row_spec = pl.BlockSpec((None, None, Qp), lambda n, h: (n, h, 0))
    if per_batch_mask:
        mask_spec = pl.BlockSpec((None, Qp, Mp), lambda n, _: (n, 0, 0))
    else:
        mask_spec = pl.BlockSpec((Qp, Mp), lambda n, _: (0, 0))
    return q_spec, kv_spec, mask_spec, row_spec


def _warps(Q: int, M: int, backward: bool) -> int:
    """Triton warps per program (untuned: a GPU run decides). The backward keeps five Qp x Mp
    float32 tiles live (logits, tanh, p, dp, ds): twice the warps from 128 x 128 on, to spill less."""
    return 8 if backward and _padded(Q) * _padded(M) >= 128 * 128 else 4


def _pallas(kernel, grid, in_specs, out_specs, out_shape, warps, name, interpret, *args):
    """pallas_call compiled with Triton on a CUDA backend and interpreted elsewhere, decided when
    lowering for the target platform (so compiling for a GPU on a CPU-only host gets the kernel);
    interpret=True forces the interpreter everywhere."""

    def call(interp):
        return lambda *a: pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
            interpret=interp,
            name=name,
        )(*a)

    if interpret:
        return call(True)(*args)
    return jax.lax.platform_dependent(*args, cuda=call(False), default=call(True))


def _forward(q, k, v, mask_i8, cap, interpret):
    N, Q, K, H = q.shape
    M, G = k.shape[1], k.shape[2]
    q_spec, kv_spec, mask_spec, row_spec = _specs(Q, M, K, G, H, mask_i8.ndim == 3, grouped=False)
    kernel = functools.partial(_fwd_kernel, Q=Q, M=M, cap=float(cap), scale=float(1.0 / np.sqrt(H)))
    out_shape = [jax.ShapeDtypeStruct(q.shape, v.dtype), jax.ShapeDtypeStruct((N, K, Q), jnp.float32)]
    specs = ([q_spec, kv_spec, kv_spec, mask_spec], [q_spec, row_spec])
    warps = _warps(Q, M, backward=False)
    return _pallas(kernel, (N, K), *specs, out_shape, warps, "capped_attention_fwd", interpret, q, k, v, mask_i8)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask_i8, cap, interpret):
    return _forward(q, k, v, mask_i8, cap, interpret)[0]


def _attention_fwd(q, k, v, mask_i8, cap, interpret):
    out, lse = _forward(q, k, v, mask_i8, cap, interpret)
    return out, (q, k, v, mask_i8, out, lse)


def _attention_bwd(cap, interpret, res, do):
    q, k, v, mask_i8, out, lse = res
    N, Q, K, H = q.shape
    M, G = k.shape[1], k.shape[2]
    delta_NKQ = jnp.einsum("nqkh,nqkh->nkq", do.astype(jnp.float32), out.astype(jnp.float32))
    q_spec, kv_spec, mask_spec, row_spec = _specs(Q, M, K, G, H, mask_i8.ndim == 3, grouped=True)
    kernel = functools.partial(_bwd_kernel, Q=Q, M=M, R=K // G, cap=float(cap), scale=float(1.0 / np.sqrt(H)))
    in_specs = [q_spec, kv_spec, kv_spec, mask_spec, q_spec, row_spec, row_spec]
    out_shape = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v)]
    args = (q, k, v, mask_i8, do.astype(v.dtype), lse, delta_NKQ)
    warps = _warps(Q, M, backward=True)
    dq, dk, dv = _pallas(
        kernel, (N, G), in_specs, [q_spec, kv_spec, kv_spec], out_shape, warps, "capped_attention_bwd", interpret, *args
    )
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def fused_attention(q_NQKH, k_NMGH, v_NMGH, mask=None, logit_cap: float = 0.0, interpret: bool = False):
    """out_NQKH of `attention.dot_product_attention` (no bias) through the fused kernels above.

    `mask` (True = may attend) is (Q, M), (N, Q, M) or None. Raises ValueError for shapes the
    kernels do not take (`supported`)."""
    N, Q, K, H = q_NQKH.shape
    M = k_NMGH.shape[1]
    if not supported(q_NQKH, k_NMGH):
        raise ValueError(
            f"fused attention takes sequences up to {MAX_LEN} and a power-of-two head width >= 16, got Q={Q} M={M} H={H}"
        )
    if mask is None:
        mask_i8 = jnp.ones((Q, M), jnp.int8)
    else:
        mask_i8 = jnp.asarray(mask, bool).astype(jnp.int8)
        if mask_i8.shape not in ((Q, M), (N, Q, M)):
            raise ValueError(f"mask shape {mask_i8.shape}: expected ({Q}, {M}) or ({N}, {Q}, {M})")
    dt = v_NMGH.dtype
    return _attention(q_NQKH.astype(dt), k_NMGH.astype(dt), v_NMGH, mask_i8, float(logit_cap or 0.0), bool(interpret))

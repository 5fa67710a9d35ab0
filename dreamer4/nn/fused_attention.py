"""Soft-capped grouped-query attention as fused GPU kernels (Pallas, Triton backend), forward and backward.

Shape key (suffixes of array names in this file):
    N    flattened leading dims (batch x time for space attention, batch x tokens for time attention)
    Q    query positions
    M    key/value positions
    K    query heads
    G    key/value heads (K % G == 0; query head k reads key/value head k // (K / G))
    H    head width

Why: `attention.einsum_attention` writes float32 logits of every (sequence, head) to memory and
reads them back for the soft-cap, the mask, the softmax and again in the backward pass, and moves
q, k, v and the output between token-major and head-major layouts; jax.nn's fused kernels
(cuDNN) cannot soft-cap. The sequences here are short (a frame's 80 tokens, a clip's 16-64 steps),
so one program holds a whole sequence of one head: q, k, v, the logits and the probabilities stay
on chip, nothing logits-sized touches memory, and no online softmax is needed.

Tiles: Triton's blocks have power-of-two shapes. A sequence is cut into power-of-two tiles that
cover its length rounded up to 16 (`_tiles`: 80 -> 64 + 16), and the program computes every
(query tile, key tile) pair; the softmax spans the key tiles, all on chip. Padding one frame's 80
tokens to a single 128-block instead (`TILING = "single"`, the kernels' first form) made 61% of
the logits padding. Exponentials go to the multiprocessor's ex2 (`_exp`), tanh takes one of them
(`_tanh`). In the H100 code that a CPU can compile (`benchmarks/kernel_ptx.py`: Triton's PTX
through `ptxas`), the classic steps' attention calls take 38-68% fewer thread-instructions than
the kernels' first form (the tokenizer's space attention: 61% forward, 64% backward); sequences
of up to 16 run one warp per program (`_warps`).

Forward, one program per (n, query head k), g = k // R:
    s = q k^T / sqrt(H);  l = cap * tanh(s / cap) (cap > 0, else l = s);  l = float32 min where masked
    (tanh(x) as 1 - 2 / (1 + exp(2x)): `_tanh`)
    p = softmax_m(l);  out = p v;  lse = max_m l + log sum_m exp(l - max_m l)   (saved for the backward)
Backward, one program per (n, key/value head g), recomputing p = exp(l - lse):
    dv = p^T do;  dp = do v^T;  dl = p * (dp - delta),  delta = sum_h do * out
    ds = dl * (1 - tanh^2(s / cap)) (cap > 0, else ds = dl);  dq = ds k / sqrt(H);  dk = ds^T q / sqrt(H)
The backward's program takes one key/value head and its R query heads, so dk and dv are summed
over the group on chip.

Numerics match `einsum_attention`: float32 logits, soft-cap, mask and softmax; the products with v
(and the backward's products) take v's dtype. Lowered for a CUDA device the kernels compile with
Triton; for any other platform they run through Pallas' interpreter (the CPU tests use it), and
`interpret=True` forces the interpreter everywhere.
Sequences up to 256 positions (one program); longer ones, and attention with a logit bias, stay on
the einsum path (`attention.dot_product_attention` decides). The kernels carry no SPMD
partitioning rule and no shard_map wrapper yet: they are meant for one-device runs (untested on a
multi-device mesh).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dreamer4.nn.layers import MASKED_LOGIT

LOG2_E = 1.4426950408889634
MAX_LEN = 256  # one program holds a whole sequence: q, k, v and its logits tiles

# How a sequence is cut into tiles (`_tiles`): "binary" covers its length rounded up to 16 with
# power-of-two tiles (80 -> 64 + 16: 6,400 logits, none wasted); "single" is one power-of-two tile
# (80 -> 128: 16,384 logits, 61% of them padding, as before 2026-11-28). Kept for the GPU suite's
# paired timing of the two (`benchmarks/gpu_suite_parts.py`, attention part).
TILING = "binary"


def supported(q_NQKH, k_NMGH) -> bool:
    """Whether the kernels take these shapes: sequences up to MAX_LEN, head width a power of two >= 16."""
    Q, M, H = q_NQKH.shape[1], k_NMGH.shape[1], q_NQKH.shape[-1]
    return Q <= MAX_LEN and M <= MAX_LEN and H >= 16 and (H & (H - 1)) == 0


def _tiles(n: int, tiling: str) -> tuple[tuple[int, int], ...]:
    """(start, size) of the tiles that cover n positions: sizes powers of two >= 16 (Triton's
    block shapes and its matmul's minimum). "binary": the binary digits of n rounded up to 16,
    largest first (80 -> (0, 64), (64, 16)); "single": one tile of the next power of two."""
    if tiling == "single":
        return ((0, max(16, pl.next_power_of_2(n))),)
    if tiling != "binary":
        raise ValueError(f"fused attention tiling {tiling!r}: expected 'binary' or 'single'")
    left, start, out = -(-n // 16) * 16, 0, []
    while left:
        size = 1 << (left.bit_length() - 1)
        out.append((start, size))
        start, left = start + size, left - size
    return tuple(out)


def _exp(x):
    """exp(x) as 2^(x log2 e): Triton lowers exp2 to the multiprocessor's ex2 (relative error
    ~2^-22), where exp goes through libdevice's range reduction (~10 instructions)."""
    return jnp.exp2(x * LOG2_E)


def _tanh(x):
    """tanh(x) = 1 - 2 / (1 + exp(2x)): one exp and one division per logit, where Triton's tanh
    evaluates two branches and selects. Exact at both ends (exp overflows to inf: 1; underflows
    to 0: -1); near 0 the absolute error is ~1e-7 (times the cap, ~5e-6 of a logit)."""
    return 1.0 - 2.0 / (1.0 + _exp(2.0 * x))


def _logits(q, k, qk_valid, cap: float, scale: float):
    """(l, t): masked, capped float32 logits of one tile and tanh(s / cap) (None without a cap)."""
    s = plgpu.dot(q, k, trans_b=True).astype(jnp.float32)
    t = None
    if cap > 0:
        t = _tanh(s * (scale / cap))
        s = cap * t
    else:
        s = s * scale
    return jnp.where(qk_valid, s, MASKED_LOGIT), t


@dataclasses.dataclass(frozen=True)
class _Dims:
    """What a kernel is compiled for: lengths, the R query heads per key/value head, the cap, the
    logits' scale 1/sqrt(H) and each sequence's tiles."""

    Q: int
    M: int
    R: int
    cap: float
    scale: float
    q_tiles: tuple[tuple[int, int], ...]
    m_tiles: tuple[tuple[int, int], ...]

    @staticmethod
    def of(q_NQKH, k_NMGH, cap: float, tiling: str) -> _Dims:
        (_, Q, K, H), (_, M, G, _) = q_NQKH.shape, k_NMGH.shape
        return _Dims(Q, M, K // G, float(cap), float(1.0 / np.sqrt(H)), _tiles(Q, tiling), _tiles(M, tiling))


def _rows(start: int, size: int, n: int):
    """Which of a tile's positions start .. start + size - 1 are inside the sequence of n."""
    return start + jnp.arange(size) < n


def _valid(mask_ref, rows, cols, qt, mt):
    """The (query tile, key tile)'s logits that exist and that the mask lets attend."""
    inside = rows[:, None] & cols[None, :]
    sub = mask_ref.at[pl.ds(qt[0], qt[1]), pl.ds(mt[0], mt[1])]
    return inside & (plgpu.load(sub, mask=inside, other=0) != 0)


def _kv_tiles(k_ref, v_ref, d: _Dims):
    """(cols, ks, vs) per key tile: which positions are inside the sequence, and k and v loaded
    (zeros past its end)."""
    cols = [_rows(*mt, d.M) for mt in d.m_tiles]
    ks = [plgpu.load(k_ref.at[pl.ds(*mt)], mask=c[:, None], other=0.0) for mt, c in zip(d.m_tiles, cols)]
    vs = [plgpu.load(v_ref.at[pl.ds(*mt)], mask=c[:, None], other=0.0) for mt, c in zip(d.m_tiles, cols)]
    return cols, ks, vs


def _fwd_kernel(q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, *, d: _Dims):
    """One program per (n, query head k): each query tile against every key tile; the softmax
    over the key tiles together (their logits are all on chip: no online rescaling)."""
    cols, ks, vs = _kv_tiles(k_ref, v_ref, d)
    for qt in d.q_tiles:
        rows = _rows(*qt, d.Q)
        q = plgpu.load(q_ref.at[pl.ds(*qt)], mask=rows[:, None], other=0.0)
        ls = [
            _logits(q, k, _valid(mask_ref, rows, c, qt, mt), d.cap, d.scale)[0] for k, c, mt in zip(ks, cols, d.m_tiles)
        ]
        m = functools.reduce(jnp.maximum, [jnp.max(lg, axis=1) for lg in ls])
        # padding keys are not part of the sequence at all (a masked key still is: MASKED_LOGIT)
        es = [jnp.where(c[None, :], _exp(lg - m[:, None]), 0.0) for lg, c in zip(ls, cols)]
        total = functools.reduce(jnp.add, [jnp.sum(e, axis=1) for e in es])
        out = functools.reduce(jnp.add, [plgpu.dot(e.astype(v.dtype), v).astype(jnp.float32) for e, v in zip(es, vs)])
        out = out * (1.0 / total)[:, None]
        plgpu.store(o_ref.at[pl.ds(*qt)], out.astype(o_ref.dtype), mask=rows[:, None])
        plgpu.store(lse_ref.at[pl.ds(*qt)], m + jnp.log(total), mask=rows)


def _bwd_kernel(q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, *, d: _Dims):
    """One program per (n, key/value head g): the R query heads that read g in turn, tile by
    tile; dk and dv summed over them on chip."""
    cols, ks, vs = _kv_tiles(k_ref, v_ref, d)
    dks = [jnp.zeros(k.shape, jnp.float32) for k in ks]
    dvs = [jnp.zeros(v.shape, jnp.float32) for v in vs]
    for qt in d.q_tiles:
        rows = _rows(*qt, d.Q)
        valid = [_valid(mask_ref, rows, c, qt, mt) for c, mt in zip(cols, d.m_tiles)]  # shared by the R heads
        for r in range(d.R):  # static: R is 1-4 here
            head = pl.ds(r, 1)
            q = _squeeze(plgpu.load(q_ref.at[pl.ds(*qt), head, :], mask=rows[:, None, None], other=0.0))
            do = _squeeze(plgpu.load(do_ref.at[pl.ds(*qt), head, :], mask=rows[:, None, None], other=0.0))
            lse = plgpu.load(lse_ref.at[head, pl.ds(*qt)], mask=rows[None, :], other=0.0).reshape(rows.shape)
            delta = plgpu.load(delta_ref.at[head, pl.ds(*qt)], mask=rows[None, :], other=0.0).reshape(rows.shape)
            dq = jnp.zeros(q.shape, jnp.float32)
            for j, (k, v, c, ok) in enumerate(zip(ks, vs, cols, valid)):
                l, t = _logits(q, k, ok, d.cap, d.scale)
                p = jnp.where(rows[:, None] & c[None, :], _exp(l - lse[:, None]), 0.0)
                dvs[j] += plgpu.dot(p.astype(do.dtype), do, trans_a=True).astype(jnp.float32)
                dp = plgpu.dot(do, v, trans_b=True).astype(jnp.float32)
                ds = p * (dp - delta[:, None])
                if d.cap > 0:
                    ds = ds * (1.0 - t * t)
                ds = (ds * d.scale).astype(q.dtype)
                dq += plgpu.dot(ds, k).astype(jnp.float32)
                dks[j] += plgpu.dot(ds, q, trans_a=True).astype(jnp.float32)
            dq = dq.astype(dq_ref.dtype)
            plgpu.store(
                dq_ref.at[pl.ds(*qt), head, :], dq.reshape(dq.shape[0], 1, dq.shape[1]), mask=rows[:, None, None]
            )
    for dk, dv, c, mt in zip(dks, dvs, cols, d.m_tiles):
        plgpu.store(dk_ref.at[pl.ds(*mt)], dk.astype(dk_ref.dtype), mask=c[:, None])
        plgpu.store(dv_ref.at[pl.ds(*mt)], dv.astype(dv_ref.dtype), mask=c[:, None])


def _squeeze(x_Q1H):
    return x_Q1H.reshape(x_Q1H.shape[0], x_Q1H.shape[2])


def _span(tiles) -> int:
    """A block's length: through the end of the last tile (loads past the array are masked)."""
    return tiles[-1][0] + tiles[-1][1]


def _specs(d: _Dims, H: int, per_batch_mask: bool, grouped: bool):
    """Block specs (q, k/v, mask, lse/delta rows) for the grid (N, K), or with `grouped` for the
    grid (N, G) whose program takes the R query heads of one key/value head. A block spans a
    whole sequence, through its last tile."""
    Qb, Mb, R = _span(d.q_tiles), _span(d.m_tiles), d.R
    if grouped:
        q_spec = pl.BlockSpec((None, Qb, R, H), lambda n, g: (n, 0, g, 0))
        kv_spec = pl.BlockSpec((None, Mb, None, H), lambda n, g: (n, 0, g, 0))
        row_spec = pl.BlockSpec((None, R, Qb), lambda n, g: (n, g, 0))  # lse, delta: N K Q
    else:
        q_spec = pl.BlockSpec((None, Qb, None, H), lambda n, h: (n, 0, h, 0))
        kv_spec = pl.BlockSpec((None, Mb, None, H), lambda n, h: (n, 0, h // R, 0))
        row_spec = pl.BlockSpec((None, None, Qb), lambda n, h: (n, h, 0))
    if per_batch_mask:
        mask_spec = pl.BlockSpec((None, Qb, Mb), lambda n, _: (n, 0, 0))
    else:
        mask_spec = pl.BlockSpec((Qb, Mb), lambda n, _: (0, 0))
    return q_spec, kv_spec, mask_spec, row_spec


def _warps(d: _Dims, backward: bool) -> int:
    """Triton warps per program (a GPU run decides; `benchmarks/kernel_ptx.py` counts). One warp
    where every tile is 16 x 16 (sequences of up to 16: the tokenizer's time attention, the
    dynamics' space attention): more warps repeat the same small tile's work, and one takes about
    half the thread-instructions (forward -60%, backward -49%) with no spills. The backward keeps five float32 tiles of
    logits' size live (logits, tanh, p, dp, ds): twice the warps from 128 x 128 on, to spill less."""
    q_rows, m_rows = (max(s for _, s in tiles) for tiles in (d.q_tiles, d.m_tiles))
    if q_rows == m_rows == 16:
        return 1
    return 8 if backward and q_rows * m_rows >= 128 * 128 else 4


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


def _forward(q, k, v, mask_i8, cap, interpret, tiling):
    N, Q, K, H = q.shape
    d = _Dims.of(q, k, cap, tiling)
    q_spec, kv_spec, mask_spec, row_spec = _specs(d, H, mask_i8.ndim == 3, grouped=False)
    kernel = functools.partial(_fwd_kernel, d=d)
    out_shape = [jax.ShapeDtypeStruct(q.shape, v.dtype), jax.ShapeDtypeStruct((N, K, Q), jnp.float32)]
    specs = ([q_spec, kv_spec, kv_spec, mask_spec], [q_spec, row_spec])
    warps = _warps(d, backward=False)
    return _pallas(kernel, (N, K), *specs, out_shape, warps, "capped_attention_fwd", interpret, q, k, v, mask_i8)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, mask_i8, cap, interpret, tiling):
    return _forward(q, k, v, mask_i8, cap, interpret, tiling)[0]


def _attention_fwd(q, k, v, mask_i8, cap, interpret, tiling):
    out, lse = _forward(q, k, v, mask_i8, cap, interpret, tiling)
    return out, (q, k, v, mask_i8, out, lse)


def _attention_bwd(cap, interpret, tiling, res, do):
    q, k, v, mask_i8, out, lse = res
    N, H, G = q.shape[0], q.shape[-1], k.shape[2]
    delta_NKQ = jnp.einsum("nqkh,nqkh->nkq", do.astype(jnp.float32), out.astype(jnp.float32))
    d = _Dims.of(q, k, cap, tiling)
    q_spec, kv_spec, mask_spec, row_spec = _specs(d, H, mask_i8.ndim == 3, grouped=True)
    kernel = functools.partial(_bwd_kernel, d=d)
    in_specs = [q_spec, kv_spec, kv_spec, mask_spec, q_spec, row_spec, row_spec]
    out_shape = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v)]
    args = (q, k, v, mask_i8, do.astype(v.dtype), lse, delta_NKQ)
    warps = _warps(d, backward=True)
    dq, dk, dv = _pallas(
        kernel, (N, G), in_specs, [q_spec, kv_spec, kv_spec], out_shape, warps, "capped_attention_bwd", interpret, *args
    )
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def fused_attention(
    q_NQKH, k_NMGH, v_NMGH, mask=None, logit_cap: float = 0.0, interpret: bool = False, tiling: str | None = None
):
    """out_NQKH of `attention.dot_product_attention` (no bias) through the fused kernels above.

    `mask` (True = may attend) is (Q, M), (N, Q, M) or None; `tiling` "binary" or "single"
    (`_tiles`; default `TILING`). Raises ValueError for shapes the kernels do not take
    (`supported`) and for another tiling."""
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
    tiling = TILING if tiling is None else tiling
    _tiles(Q, tiling)  # refuses an unknown tiling by name
    dt = v_NMGH.dtype
    cap = float(logit_cap or 0.0)
    return _attention(q_NQKH.astype(dt), k_NMGH.astype(dt), v_NMGH, mask_i8, cap, bool(interpret), tiling)

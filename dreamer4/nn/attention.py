"""Multi-head attention with grouped-query heads, QK-norm, RoPE and logit soft-capping; attention masks.

Shape key (suffixes of array names in this file):
    N    flattened leading dims (batch x time for space attention, batch x tokens for time attention)
    L    sequence length of a self-attention input
    Q    query positions
    M    key/value (memory) positions
    S    tokens per time step
    T    time steps
    C    cache length (steps a KV cache can hold)
    D    model width
    K    query heads
    G    key/value heads (K % G == 0)
    R    K / G query heads that share one key/value head
    H    head width

Masks are boolean, True = may attend: mask[q, m] says whether query q may read key m. They are
pure functions of static sizes (numpy), except `cached_time_mask`, whose step index may be traced.

Attention kernels (`dot_product_attention(..., implementation=)`; default: the module setting
`IMPLEMENTATION`, initially from the environment variable DREAMER4_ATTENTION, else "auto"):
  "einsum"  the reference: grouped einsums, float32 logits and softmax (any shape, soft-cap);
  "xla"     jax.nn.dot_product_attention(implementation="xla"): XLA's own attention graph;
  "cudnn"   jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's fused flash attention
            (GPU, bf16/fp16, head width a multiple of 8 up to 128; raises otherwise);
  "pallas"  `fused_attention`: soft-capped GQA as one Pallas (Triton) kernel per sequence and head,
            forward and backward (GPU; elsewhere Pallas' interpreter, for tests); sequences up to
            256, no bias: other calls run "einsum";
  "auto"    on a GPU backend with bf16/fp16 inputs: soft-capped logits run "pallas" in a
            one-device job where the kernels take the shapes and there is more than one query,
            other logits "cudnn" where it takes them; all else "einsum".
jax.nn's kernels cannot soft-cap logits: with logit_cap > 0 every choice but "pallas" and "auto"
(as above) runs "einsum". Why "auto" picks "pallas" for capped training shapes: on an H200 (third
lease, BENCHMARKS.md) it took 6-8% off the classic tokenizer and dynamics steps and 16% off the
tokenizer's peak memory, and matched the einsum reference at bf16 resolution. Single-query
cached steps keep "einsum": the kernels were not timed there.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from dreamer4.nn import fused_attention as fused
from dreamer4.nn.layers import MASKED_LOGIT, RMSNorm, apply_rope, apply_rope_2d, soft_cap

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn", "pallas")
# The process-wide default kernel (see the module doc); set it, or pass implementation= per call.
IMPLEMENTATION = os.environ.get("DREAMER4_ATTENTION", "auto")
if IMPLEMENTATION not in IMPLEMENTATIONS:
    raise ValueError(f"DREAMER4_ATTENTION={IMPLEMENTATION!r}: expected one of {IMPLEMENTATIONS}")


# -- masks -----------------------------------------------------------------------------------------
def space_mask(spec, rules: Mapping[Hashable, Sequence[Hashable] | None] | None = None) -> np.ndarray:
    """Visibility among the S tokens of one time step: vis_SS[q, k] = token q may attend token k.

    `spec` is either
      * an (S, S) boolean visibility matrix, returned (validated) as a numpy array, or
      * a sequence of S token types (any hashable labels, e.g. "patch", "latent", "agent"), with
        `rules` mapping a query type to the key types it may see. A type absent from `rules` (or
        mapped to None) sees every token; without `rules` every token sees every token.
    Example (Dreamer 4 agent tokens: they read everything, nothing reads them):
        space_mask(["z"] * 4 + ["agent"], {"z": ["z"]})
    Every token must see at least one token, else its softmax would be meaningless: ValueError.
    """
    arr = np.asarray(spec)
    if arr.ndim == 2:
        if arr.dtype != bool or arr.shape[0] != arr.shape[1]:
            raise ValueError(f"a visibility matrix must be square and boolean, got {arr.dtype} {arr.shape}")
        vis_SS = arr.copy()
    elif arr.ndim == 1:
        types_S = list(spec)
        rules = rules or {}
        vis_SS = np.array([[rules.get(q) is None or k in rules[q] for k in types_S] for q in types_S], bool)
    else:
        raise ValueError(f"space_mask takes token types (S,) or a visibility matrix (S, S), got shape {arr.shape}")
    if not vis_SS.any(axis=1).all():
        blind = np.flatnonzero(~vis_SS.any(axis=1)).tolist()
        raise ValueError(f"tokens {blind} may attend to no token at all")
    return vis_SS


def causal_time_mask(T: int, window: int = 0) -> np.ndarray:
    """mask_TT[t, u] = u <= t  (and t - u < window when window > 0): the past and the present only.

    With a window, each step sees itself and the window - 1 steps before it (a sliding context).
    """
    t_T1, u_1T = np.arange(T)[:, None], np.arange(T)[None, :]
    mask_TT = u_1T <= t_T1
    if window and window > 0:
        mask_TT &= (t_T1 - u_1T) < window
    return mask_TT


def cached_time_mask(t, cache_len: int, window: int = 0):
    """mask_1C[0, j]: whether step t reads cache slot j, with step u kept in slot u mod C (C = cache_len).

    Slot j holds step u_j = t - ((t - j) mod C), the latest step <= t written there; it is read when
    u_j >= 0 (and t - u_j < window when window > 0). While t < C this is slot u = step u: u <= t.
    A cache of C >= window slots is thereby a ring buffer that holds the whole window at any t.
    `t` may be a traced integer (jit); slots of steps < 0 (never written) stay masked.
    """
    u_C = t - jnp.mod(t - jnp.arange(cache_len), cache_len)
    mask_C = u_C >= 0
    if window and window > 0:
        mask_C &= (t - u_C) < window
    return mask_C[None, :]


# -- attention -------------------------------------------------------------------------------------
def _gpu_half(q_NQKH, k_NMGH, v_NMGH) -> bool:
    """A GPU backend and half-precision inputs of one dtype: where "auto" tries a fused kernel."""
    return (
        jax.default_backend() in ("gpu", "cuda")
        and q_NQKH.dtype == k_NMGH.dtype == v_NMGH.dtype
        and q_NQKH.dtype in (jnp.bfloat16, jnp.float16)
    )


def _cudnn_takes(q_NQKH, k_NMGH, v_NMGH) -> bool:
    """Whether cuDNN flash attention (through jax.nn) is worth trying: `_gpu_half` and a head width
    it supports."""
    H = q_NQKH.shape[-1]
    return _gpu_half(q_NQKH, k_NMGH, v_NMGH) and H % 8 == 0 and H <= 128


def _one_device() -> bool:
    """A one-device job: a Pallas call has no SPMD partitioning rule (nor a shard_map wrapper yet)."""
    return jax.device_count() == 1


def auto_may_run_fused() -> bool:
    """Whether "auto" runs the fused kernels in this process (for capped bf16/fp16 attention of the
    shapes `_pallas_takes` names): a GPU backend and a one-device job."""
    return jax.default_backend() in ("gpu", "cuda") and _one_device()


def _pallas_takes(q_NQKH, k_NMGH, v_NMGH) -> bool:
    """Whether "auto" runs the fused soft-capped kernels: `_gpu_half`, a one-device job, shapes they
    take, and more than one query. A single cached query (generation's time attention) would fill
    one row of a 16-row tile and was never timed: it keeps the einsum reference. The dynamics'
    space attention (14 queries) runs the kernels, as in the third lease's fused dynamics step
    (41.6% MFU); with it on einsum, the step compiled for an H100 moved 163.0 GB instead of 156.7
    (BENCHMARKS.md, "Session 39")."""
    return (
        _gpu_half(q_NQKH, k_NMGH, v_NMGH) and _one_device() and q_NQKH.shape[1] > 1 and fused.supported(q_NQKH, k_NMGH)
    )


def _jax_nn_attention(q_NQKH, k_NMGH, v_NMGH, mask, implementation: str):
    """jax.nn.dot_product_attention with this module's mask shapes: (Q, M) or (N, Q, M) -> 4-D."""
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask[None, None] if mask.ndim == 2 else mask[:, None]  # N 1 Q M: every head alike
    dt = v_NMGH.dtype
    out_NQKH = jax.nn.dot_product_attention(
        q_NQKH.astype(dt), k_NMGH.astype(dt), v_NMGH, mask=mask, implementation=implementation
    )
    return out_NQKH.astype(dt)


def einsum_attention(q_NQKH, k_NMGH, v_NMGH, mask=None, logit_cap: float = 0.0, bias_NQKM=None):
    """The reference kernel of `dot_product_attention` (grouped einsums, float32 logits and softmax).

    Logits are laid out n g q r m: the order a batched matmul over (n, g) produces from q's
    n q (g r) h, so XLA need not transpose them (with n g r q m every logits-sized tensor of the
    forward and backward passes was transposed on the GPU).
    """
    K, H = q_NQKH.shape[-2:]
    G = k_NMGH.shape[-2]
    q_NQGRH = rearrange(q_NQKH, "n q (g r) h -> n q g r h", g=G)
    logits_NGQRM = jnp.einsum("nqgrh,nmgh->ngqrm", q_NQGRH, k_NMGH, preferred_element_type=jnp.float32)
    logits_NGQRM = soft_cap(logits_NGQRM.astype(jnp.float32) / np.float32(np.sqrt(H)), logit_cap)
    if bias_NQKM is not None:
        logits_NGQRM = logits_NGQRM + rearrange(bias_NQKM.astype(jnp.float32), "n q (g r) m -> n g q r m", g=G)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask_N1Q1M = (mask[None] if mask.ndim == 2 else mask)[:, None, :, None]
        logits_NGQRM = jnp.where(mask_N1Q1M, logits_NGQRM, MASKED_LOGIT)
    probs_NGQRM = jax.nn.softmax(logits_NGQRM, axis=-1)
    out_NQGRH = jnp.einsum("ngqrm,nmgh->nqgrh", probs_NGQRM.astype(v_NMGH.dtype), v_NMGH)
    return rearrange(out_NQGRH, "n q g r h -> n q (g r) h")


def dot_product_attention(
    q_NQKH, k_NMGH, v_NMGH, mask=None, logit_cap: float = 0.0, implementation=None, bias_NQKM=None
):
    """Grouped-query attention; query head k reads key/value head k // R  (R = K / G).

        logits[q, m] = soft_cap(<q_q, k_m> / sqrt(H), cap) + bias[q, k, m]   (masked: -> float32 min)
        out_q = sum_m softmax_m(logits[q, :]) v_m

    Logits and softmax are float32 whatever the input dtype (bf16 logits lose the ordering of near
    ties and overflow easily); the weighted sum of values runs in v's dtype. `mask` (True = may
    attend) is (Q, M) or (N, Q, M), or None for no mask. `bias_NQKM` (float, per query head) is
    added after the cap, or None. Returns out_NQKH in v's dtype.
    `implementation` ("auto" | "einsum" | "xla" | "cudnn" | "pallas", None = the module's
    IMPLEMENTATION) picks the kernel (module doc); with a bias the einsum reference always runs,
    and with a soft-cap it does unless "pallas" (or "auto" on a GPU) takes the shapes.
    """
    K = q_NQKH.shape[-2]
    G = k_NMGH.shape[-2]
    if K % G:
        raise ValueError(f"{K} query heads cannot share {G} key/value heads evenly")
    impl = IMPLEMENTATION if implementation is None else implementation
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r}: expected one of {IMPLEMENTATIONS}")
    capped = bool(logit_cap and logit_cap > 0)
    if impl == "auto" and capped and bias_NQKM is None and _pallas_takes(q_NQKH, k_NMGH, v_NMGH):
        impl = "pallas"
    if impl == "pallas":
        if bias_NQKM is None and fused.supported(q_NQKH, k_NMGH):
            return fused.fused_attention(q_NQKH, k_NMGH, v_NMGH, mask, logit_cap)
        impl = "einsum"
    if capped or bias_NQKM is not None:
        impl = "einsum"
    if impl == "auto":
        if _cudnn_takes(q_NQKH, k_NMGH, v_NMGH):
            try:  # jax.nn checks what cuDNN supports while tracing; anything it refuses runs einsum
                return _jax_nn_attention(q_NQKH, k_NMGH, v_NMGH, mask, "cudnn")
            except Exception:  # noqa: BLE001
                pass
        impl = "einsum"
    if impl == "einsum":
        return einsum_attention(q_NQKH, k_NMGH, v_NMGH, mask, logit_cap, bias_NQKM)
    return _jax_nn_attention(q_NQKH, k_NMGH, v_NMGH, mask, impl)


class Attention(nnx.Module):
    """Multi-head self-attention with grouped-query heads, QK-norm, optional RoPE and logit soft-cap.

    x -> q = W_q x (K heads), k = W_k x, v = W_v x (G heads each); q, k <- RMSNorm over the head
    width (QK-norm keeps logits bounded, so training is stable without a small learning rate);
    then RoPE at the given positions; then `dot_product_attention`; y = W_o concat_heads(out).
    `dtype` is the compute dtype of the projections, `param_dtype` the storage dtype of weights
    (bf16 compute with float32 parameters: dtype=bfloat16, param_dtype=float32).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        head_dim: int | None = None,
        qk_norm: bool = True,
        rope: bool = False,
        rope_axes: int = 1,
        rope_base: float = 10000.0,
        logit_cap: float = 0.0,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}; pass head_dim")
            head_dim = dim // num_heads
        if rope and head_dim % (2 * rope_axes):
            raise ValueError(f"{rope_axes}-axis RoPE needs a head width divisible by {2 * rope_axes}, got {head_dim}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope, self.rope_axes, self.rope_base, self.logit_cap = rope, rope_axes, rope_base, logit_cap
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wq = nnx.Linear(dim, num_heads * head_dim, **kw)
        self.wk = nnx.Linear(dim, num_kv_heads * head_dim, **kw)
        self.wv = nnx.Linear(dim, num_kv_heads * head_dim, **kw)
        self.wo = nnx.Linear(num_heads * head_dim, dim, **kw)
        self.q_norm = RMSNorm(head_dim, param_dtype=param_dtype) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, param_dtype=param_dtype) if qk_norm else None

    def project(self, x_NLD, positions=None):
        """(q_NLKH, k_NLGH, v_NLGH): projections, QK-norm, then RoPE at `positions`.

        `positions` broadcasts to (N, L) (e.g. positions_L); None = 0 .. L-1. Ignored without RoPE.
        With rope_axes=2, `positions` is (L, 2): (row, column) of each token (`apply_rope_2d`).
        """
        q_NLKH = rearrange(self.wq(x_NLD), "n l (k h) -> n l k h", h=self.head_dim)
        k_NLGH = rearrange(self.wk(x_NLD), "n l (g h) -> n l g h", h=self.head_dim)
        v_NLGH = rearrange(self.wv(x_NLD), "n l (g h) -> n l g h", h=self.head_dim)
        if self.q_norm is not None:
            q_NLKH, k_NLGH = self.q_norm(q_NLKH), self.k_norm(k_NLGH)
        if self.rope and self.rope_axes == 2:
            rc_L2 = jnp.asarray(positions)
            rows, cols = rc_L2[None, :, 0, None], rc_L2[None, :, 1, None]  # 1 L 1: all heads alike
            return (
                apply_rope_2d(q_NLKH, rows, cols, self.rope_base),
                apply_rope_2d(k_NLGH, rows, cols, self.rope_base),
                v_NLGH,
            )
        if self.rope:
            L = x_NLD.shape[1]
            pos = jnp.arange(L) if positions is None else jnp.asarray(positions)
            pos_NL1 = jnp.broadcast_to(pos, x_NLD.shape[:2])[..., None]  # one position for all heads
            q_NLKH = apply_rope(q_NLKH, pos_NL1, self.rope_base)
            k_NLGH = apply_rope(k_NLGH, pos_NL1, self.rope_base)
        return q_NLKH, k_NLGH, v_NLGH

    def attend(self, q_NQKH, k_NMGH, v_NMGH, mask=None, bias_NQKM=None):
        """y_NQD = W_o (attention of the given queries over the given keys/values), see `dot_product_attention`."""
        out_NQKH = dot_product_attention(q_NQKH, k_NMGH, v_NMGH, mask, self.logit_cap, bias_NQKM=bias_NQKM)
        return self.wo(rearrange(out_NQKH, "n q k h -> n q (k h)"))

    def __call__(self, x_NLD, mask=None, positions=None):
        """Self-attention y_NLD over x_NLD; `mask` (L, L) or (N, L, L), True = may attend."""
        q_NLKH, k_NLGH, v_NLGH = self.project(x_NLD, positions)
        return self.attend(q_NLKH, k_NLGH, v_NLGH, mask)

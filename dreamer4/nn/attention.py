"""Multi-head attention with grouped-query heads, QK-norm, RoPE and logit soft-capping.

Shape key: N flattened leading dims (batch x time for space attention, batch x tokens for time
attention), Q queries, S keys, D width, K query heads, G key/value heads (K % G == 0),
R = K / G query heads per kv head, E head width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamer4.nn.layers import RMSNorm, apply_rope, soft_cap


def causal_mask(T: int) -> np.ndarray:
    """mask[q, s] = s <= q: a step sees itself and the past."""
    return np.tril(np.ones((T, T), bool))


def gqa_attention(q_NQKE, k_NSGE, v_NSGE, mask, logit_cap: float = 0.0):
    """softmax(cap(q k^T / sqrt(E)) masked) v, with K query heads sharing G kv heads.

    `mask` (True = may attend) broadcasts to (N, Q, S). Logits and softmax in float32.
    """
    N, Q, K, E = q_NQKE.shape
    G = k_NSGE.shape[2]
    q = q_NQKE.reshape(N, Q, G, K // G, E)
    logits = jnp.einsum("nqgre,nsge->ngrqs", q, k_NSGE, preferred_element_type=jnp.float32)
    logits = soft_cap(logits / np.sqrt(E).astype(np.float32), logit_cap)
    mask = jnp.broadcast_to(jnp.asarray(mask), (N, Q, logits.shape[-1]))[:, None, None]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_NSGE.dtype)
    out = jnp.einsum("ngrqs,nsge->nqgre", probs, v_NSGE)
    return out.reshape(N, Q, K * E)


class Attention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, *, logit_cap: float = 0.0,
                 rope: bool = False, rngs: nnx.Rngs, dtype=jnp.float32):
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"width {dim}, heads {num_heads}, kv heads {num_kv_heads}: "
                             f"heads must divide width and kv heads must divide heads")
        self.K, self.G, self.E = num_heads, num_kv_heads, dim // num_heads
        self.logit_cap, self.rope = logit_cap, rope
        kw = dict(use_bias=False, rngs=rngs, dtype=dtype)
        self.wq = nnx.Linear(dim, self.K * self.E, **kw)
        self.wk = nnx.Linear(dim, self.G * self.E, **kw)
        self.wv = nnx.Linear(dim, self.G * self.E, **kw)
        self.wo = nnx.Linear(self.K * self.E, dim, **kw)
        self.q_norm = RMSNorm(self.E)
        self.k_norm = RMSNorm(self.E)

    def project(self, x_NSD, positions_S=None):
        """q_NSKE, k_NSGE, v_NSGE; QK-norm, then RoPE at `positions_S` if enabled."""
        N, S, _ = x_NSD.shape
        q = self.q_norm(self.wq(x_NSD).reshape(N, S, self.K, self.E))
        k = self.k_norm(self.wk(x_NSD).reshape(N, S, self.G, self.E))
        v = self.wv(x_NSD).reshape(N, S, self.G, self.E)
        if self.rope:
            pos = jnp.arange(S) if positions_S is None else positions_S
            q = apply_rope(q, jnp.asarray(pos)[:, None])
            k = apply_rope(k, jnp.asarray(pos)[:, None])
        return q, k, v

    def attend(self, q_NQKE, k_NSGE, v_NSGE, mask):
        return self.wo(gqa_attention(q_NQKE, k_NSGE, v_NSGE, mask, self.logit_cap))

    def __call__(self, x_NSD, mask, positions_S=None):
        q, k, v = self.project(x_NSD, positions_S)
        return self.attend(q, k, v, mask)

"""Axial transformer over x_BTSD: space attention within a step, causal time attention across steps.

Shape key: B batch, T time steps, S tokens per step, D width, C cache length (max steps).

Layer i (0-based) is a *time* layer when (i + 1) % time_every == 0, otherwise a *space* layer:
with time_every = 4 and 8 layers, layers 3 and 7 attend over time. A space layer lets each token
attend to the tokens of its own step that `visibility[q, s]` allows (all, by default). A time
layer lets token position s attend to the same position at steps <= t (causal, RoPE over t).
Stacked, this is block-causal: every token of step t depends on every token of steps <= t that
it can reach through the visibility pattern, and on nothing of steps > t.

`step` runs one new step at index t against a KV cache of the time layers (space layers need no
cache), so autoregressive generation costs attention over the cache instead of recomputing the
whole context; its outputs equal the full forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from dreamer4.nn.attention import Attention, causal_mask
from dreamer4.nn.layers import RMSNorm, SwiGLU


class Block(nnx.Module):
    def __init__(self, kind: str, width: int, num_heads: int, num_kv_heads: int, mlp_ratio: float,
                 logit_cap: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.kind = kind
        self.norm1 = RMSNorm(width)
        self.attn = Attention(width, num_heads, num_kv_heads, logit_cap=logit_cap, rope=(kind == "time"),
                              rngs=rngs, dtype=dtype)
        self.norm2 = RMSNorm(width)
        self.mlp = SwiGLU(width, int(width * mlp_ratio), rngs=rngs, dtype=dtype)

    def _space(self, x_BTSD, visibility):
        B, T, S, D = x_BTSD.shape
        h = self.attn(self.norm1(x_BTSD).reshape(B * T, S, D), visibility)
        return h.reshape(B, T, S, D)

    def _time(self, x_BTSD):
        B, T, S, D = x_BTSD.shape
        h = rearrange(self.norm1(x_BTSD), "b t s d -> (b s) t d")
        h = self.attn(h, causal_mask(T))
        return rearrange(h, "(b s) t d -> b t s d", b=B, s=S)

    def __call__(self, x_BTSD, visibility):
        h = self._space(x_BTSD, visibility) if self.kind == "space" else self._time(x_BTSD)
        x_BTSD = x_BTSD + h
        return x_BTSD + self.mlp(self.norm2(x_BTSD))

    def step(self, x_B1SD, visibility, cache, t):
        """One step at index t; `cache` = {"k", "v"}: (B*S, C, G, E) for time layers, else None."""
        if self.kind == "space":
            return self(x_B1SD, visibility), cache
        B, _, S, D = x_B1SD.shape
        h = self.norm1(x_B1SD).reshape(B * S, 1, D)
        q, k, v = self.attn.project(h, jnp.reshape(t, (1,)))
        kc = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, t, 0, 0))
        vc = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, t, 0, 0))
        mask = (jnp.arange(kc.shape[1]) <= t)[None, :]  # (Q=1, C)
        h = self.attn.attend(q, kc, vc, mask).reshape(B, 1, S, D)
        x_B1SD = x_B1SD + h
        return x_B1SD + self.mlp(self.norm2(x_B1SD)), {"k": kc, "v": vc}


class AxialTransformer(nnx.Module):
    def __init__(self, *, width: int, depth: int, num_heads: int, num_kv_heads: int, mlp_ratio: float = 4.0,
                 time_every: int = 4, logit_cap: float = 0.0, visibility: np.ndarray | None = None,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.kinds = tuple("time" if (i + 1) % time_every == 0 else "space" for i in range(depth))
        self.blocks = nnx.List([Block(k, width, num_heads, num_kv_heads, mlp_ratio, logit_cap, rngs=rngs,
                                      dtype=dtype) for k in self.kinds])
        self.norm = RMSNorm(width)
        # Static (not a parameter): which token may see which inside a step.
        self.visibility = None if visibility is None else np.asarray(visibility, bool)
        self.num_kv_heads, self.head_dim = num_kv_heads, width // num_heads
        self.dtype = dtype

    def _vis(self, S):
        return np.ones((S, S), bool) if self.visibility is None else self.visibility

    def __call__(self, x_BTSD):
        vis = self._vis(x_BTSD.shape[2])
        for blk in self.blocks:
            x_BTSD = blk(x_BTSD, vis)
        return self.norm(x_BTSD)

    def init_cache(self, batch: int, max_len: int, num_tokens: int | None = None):
        """Empty KV cache for `max_len` steps of `num_tokens` tokens (default: the visibility's size)."""
        S = num_tokens if num_tokens is not None else self.visibility.shape[0]
        shape = (batch * S, max_len, self.num_kv_heads, self.head_dim)
        return [{"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)} if k == "time" else None
                for k in self.kinds]

    def step(self, x_B1SD, cache, t):
        """Process step t (x_B1SD) given the cache of steps < t; returns (y_B1SD, new cache)."""
        vis = self._vis(x_B1SD.shape[2])
        new = []
        for blk, c in zip(self.blocks, cache):
            x_B1SD, c = blk.step(x_B1SD, vis, c, t)
            new.append(c)
        return self.norm(x_B1SD), new

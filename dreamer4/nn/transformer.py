"""Axial transformer over x_BTSD: space attention within a time step, causal attention across steps.

Shape key (suffixes of array names in this file):
    B    batch
    T    time steps
    S    tokens per step
    D    model width
    C    cache length (the most steps a KV cache holds)
    G    key/value heads
    H    head width
    K    query heads
    N    flattened leading dims handed to attention ((b t) for space, (b s) for time layers)

Layer rule (`layer_kinds`): layer i (0-based) of `depth` is a *time* layer when time_every > 0 and
(i + 1) % time_every == 0, otherwise a *space* layer. time_every = 4 with depth 8 gives time
layers 3 and 7; time_every = 2 alternates space, time, space, time; time_every = 1 makes every
layer a time layer; time_every = 0 makes every layer a space layer. An explicit `kinds` sequence
(one "space" / "time" per layer) passed to AxialTransformer overrides the rule.

Each layer is a pre-norm residual block  x += Attn(RMSNorm(x));  x += SwiGLU(RMSNorm(x)).
  * space layer: token q of step t attends to the tokens k of the same step with vis_SS[q, k]
    (a static S x S visibility matrix; default all True). Optional RoPE over token index.
  * time layer: token position s of step t attends to position s of steps u <= t (and t - u <
    time_window if a window is set), RoPE over the step index. With `time_neighbours` (a static
    S x J table of token indices, -1 = none) it attends instead to the tokens nb(s, j) of steps
    u <= t, with a learned logit bias per (query head, slot j) read linearly from the query token
    (zero at init): on a grid of spatial tokens, a 3 x 3 neighbourhood lets a token copy the
    neighbour that an action moved into it in one layer. The KV cache is the same either way.
A final RMSNorm follows the last layer. Stacked, this is block-causal: outputs at step t never
depend on inputs at steps > t.

Generation: `step` runs ONE new step at index t against a KV cache that holds, for every time
layer, the keys/values of steps < t (space layers need no cache). It writes step t's keys/values
into slot t mod C (calling it again at the same t overwrites that slot, which is what multi-step
denoising of one frame needs) and returns the same output as the full forward pass. `prefill`
runs the full pass on a context and returns the cache filled with it.

Context length (`time_window` W > 0, the paper's "context length", shorter than or equal to the
training sequence): a time layer attends to the last W steps only. Its KV cache then needs only
C = W slots, used as a ring buffer (step u in slot u mod W), so generation runs for any number of
steps at a cost per step that does not grow with t; without a window the cache holds C = max_len
steps and t < C.

Residual dtype: the residual stream keeps the dtype of the input x (pass float32 tokens for a
float32 residual with bf16 matmuls); every sub-layer output is cast to it before the add.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from dreamer4.nn.attention import Attention, cached_time_mask, causal_time_mask, space_mask
from dreamer4.nn.layers import RMSNorm, SwiGLU

SPACE, TIME = "space", "time"


def layer_kinds(depth: int, time_every: int) -> tuple[str, ...]:
    """("space" | "time") per layer: layer i is "time" iff time_every > 0 and (i + 1) % time_every == 0."""
    if time_every < 0:
        raise ValueError(f"time_every must be >= 0, got {time_every}")
    return tuple(TIME if time_every > 0 and (i + 1) % time_every == 0 else SPACE for i in range(depth))


class Block(nnx.Module):
    """One pre-norm layer: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)); attention over space or time."""

    def __init__(
        self,
        kind: str,
        width: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        mlp_hidden: int,
        logit_cap: float = 0.0,
        qk_norm: bool = True,
        time_rope: bool = True,
        space_rope: bool = False,
        space_grid: tuple | None = None,
        space_rope_base: float = 10000.0,
        rope_base: float = 10000.0,
        time_window: int = 0,
        time_neighbours: tuple | None = None,
        eps: float = 1e-6,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        if kind not in (SPACE, TIME):
            raise ValueError(f"layer kind must be {SPACE!r} or {TIME!r}, got {kind!r}")
        self.kind, self.time_window = kind, time_window
        # (row, col) per token of a step: 2-D RoPE in space attention (static, not a parameter)
        self.space_grid = space_grid if kind == SPACE else None
        self.attn_norm = RMSNorm(width, eps=eps, param_dtype=param_dtype)
        self.attn = Attention(
            width,
            num_heads,
            num_kv_heads,
            qk_norm=qk_norm,
            rope=time_rope if kind == TIME else (space_rope or space_grid is not None),
            rope_axes=2 if kind == SPACE and space_grid is not None else 1,
            rope_base=space_rope_base if kind == SPACE and space_grid is not None else rope_base,
            logit_cap=logit_cap,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.mlp_norm = RMSNorm(width, eps=eps, param_dtype=param_dtype)
        self.mlp = SwiGLU(width, mlp_hidden, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        # Neighbourhood time attention (static S0 x J table of token indices, -1 = none), with a
        # selector: a linear map of the query token to one logit bias per (head, neighbour slot),
        # zero at init, so a token can pick a neighbour by its content (e.g. the action it carries).
        self.neighbours = time_neighbours if kind == TIME else None
        if self.neighbours is not None:
            J = len(self.neighbours[0])
            self.select = nnx.Linear(
                width,
                num_heads * J,
                use_bias=False,
                kernel_init=nnx.initializers.zeros_init(),
                rngs=rngs,
                dtype=dtype,
                param_dtype=param_dtype,
            )

    def _neighbour_tables(self, S: int):
        """(idx_SJ, valid_SJ) for S tokens: the table's rows, then self-only rows for extra tokens
        (e.g. the agent's), each token's own index in the middle slot J // 2."""
        nb = np.asarray(self.neighbours, np.int64)
        S0, J = nb.shape
        if S < S0:
            raise ValueError(f"the neighbour table has {S0} rows but each step has only {S} tokens")
        extra = np.full((S - S0, J), -1, np.int64)
        extra[:, J // 2] = np.arange(S0, S)
        nb = np.concatenate([nb, extra])
        return np.maximum(nb, 0), nb >= 0

    def _neighbour_attend(self, h_BTSD, q_NTKH, k_BSCGH, v_BSCGH, mask_TC):
        """Time attention over the neighbours' past: token s at step t reads tokens nb(s, j) at
        steps u with mask_TC[t, u], logits + select(h)[s, k, j].  (N = b s, M = j c)"""
        B, T, S, _ = h_BTSD.shape
        C = k_BSCGH.shape[2]
        idx_SJ, valid_SJ = self._neighbour_tables(S)
        J = idx_SJ.shape[1]
        k_NMGH, v_NMGH = (rearrange(a[:, idx_SJ], "b s j c g h -> (b s) (j c) g h") for a in (k_BSCGH, v_BSCGH))
        mask_S1TJC = jnp.asarray(valid_SJ)[:, None, None, :, None] & jnp.asarray(mask_TC, bool)[None, None, :, None, :]
        mask_NTM = rearrange(jnp.broadcast_to(mask_S1TJC, (S, B, T, J, C)), "s b t j c -> (b s) t (j c)")
        sel_NTKJ = rearrange(self.select(rearrange(h_BTSD, "b t s d -> (b s) t d")), "n t (k j) -> n t k j", j=J)
        bias_NTKM = jnp.repeat(sel_NTKJ.astype(jnp.float32), C, axis=-1)  # (j c): slot j's bias for every step
        return self.attn.attend(q_NTKH, k_NMGH, v_NMGH, mask_NTM, bias_NTKM)

    def _mlp(self, x_BTSD):
        with jax.named_scope("mlp"):  # scope names: profiles attribute kernel time to them
            return x_BTSD + self.mlp(self.mlp_norm(x_BTSD)).astype(x_BTSD.dtype)

    def _space_attn(self, h_BTSD, vis_SS):
        B, T, S, _ = h_BTSD.shape
        h_NSD = rearrange(h_BTSD, "b t s d -> (b t) s d")
        pos = jnp.arange(S) if self.space_grid is None else jnp.asarray(self.space_grid, jnp.int32)
        y_NSD = self.attn(h_NSD, vis_SS, positions=pos)
        return rearrange(y_NSD, "(b t) s d -> b t s d", b=B)

    def _time_qkv(self, h_BTSD, t0=0):
        """q_NTKH, k_NTGH, v_NTGH for time attention, N = (b s), RoPE positions t0 .. t0 + T - 1."""
        T = h_BTSD.shape[1]
        h_NTD = rearrange(h_BTSD, "b t s d -> (b s) t d")
        return self.attn.project(h_NTD, positions=t0 + jnp.arange(T))

    def __call__(self, x_BTSD, vis_SS=None, *, return_kv: bool = False):
        """Full pass over all T steps; with return_kv, also (k_BSTGH, v_BSTGH) of a time layer."""
        with jax.named_scope(f"{self.kind}_attention"):
            y_BTSD, kv = self._attention(x_BTSD, vis_SS)
        x_BTSD = self._mlp(x_BTSD + y_BTSD.astype(x_BTSD.dtype))
        return (x_BTSD, kv) if return_kv else x_BTSD

    def _attention(self, x_BTSD, vis_SS):
        """(y_BTSD, kv): the attention sublayer's output (before the residual add) and, for a
        time layer, its (k_BSTGH, v_BSTGH)."""
        B, T = x_BTSD.shape[:2]
        h_BTSD = self.attn_norm(x_BTSD)
        kv = None
        if self.kind == SPACE:
            y_BTSD = self._space_attn(h_BTSD, vis_SS)
        else:
            q_NTKH, k_NTGH, v_NTGH = self._time_qkv(h_BTSD)
            kv = tuple(rearrange(a, "(b s) t g h -> b s t g h", b=B) for a in (k_NTGH, v_NTGH))
            if self.neighbours is None:
                y_NTD = self.attn.attend(q_NTKH, k_NTGH, v_NTGH, causal_time_mask(T, self.time_window))
            else:
                y_NTD = self._neighbour_attend(h_BTSD, q_NTKH, *kv, causal_time_mask(T, self.time_window))
            y_BTSD = rearrange(y_NTD, "(b s) t d -> b t s d", b=B)
        return y_BTSD, kv

    def step(self, x_B1SD, vis_SS, cache, t):
        """One step at index t. `cache` = {"k": k_BSCGH, "v": v_BSCGH} for a time layer (None for a
        space layer); slot t mod C is overwritten with this step's keys/values, and the slots
        `cached_time_mask` gives are read."""
        if self.kind == SPACE:
            return self(x_B1SD, vis_SS), cache
        B = x_B1SD.shape[0]
        C = cache["k"].shape[2]
        h_B1SD = self.attn_norm(x_B1SD)
        q_N1KH, k_N1GH, v_N1GH = self._time_qkv(h_B1SD, t0=t)
        start = (0, 0, jnp.mod(jnp.asarray(t, jnp.int32), C), 0, 0)
        new = {}
        for name, a_N1GH in (("k", k_N1GH), ("v", v_N1GH)):
            a_BS1GH = rearrange(a_N1GH, "(b s) 1 g h -> b s 1 g h", b=B).astype(cache[name].dtype)
            new[name] = jax.lax.dynamic_update_slice(cache[name], a_BS1GH, start)
        if self.neighbours is None:
            k_NCGH, v_NCGH = (rearrange(new[n], "b s c g h -> (b s) c g h") for n in ("k", "v"))
            y_N1D = self.attn.attend(q_N1KH, k_NCGH, v_NCGH, cached_time_mask(t, C, self.time_window))
        else:
            y_N1D = self._neighbour_attend(h_B1SD, q_N1KH, new["k"], new["v"], cached_time_mask(t, C, self.time_window))
        y_B1SD = rearrange(y_N1D, "(b s) 1 d -> b 1 s d", b=B)
        return self._mlp(x_B1SD + y_B1SD.astype(x_B1SD.dtype)), new


class AxialTransformer(nnx.Module):
    """Space/time axial transformer over x_BTSD with a final RMSNorm (layer rule: see module doc).

    Build:  AxialTransformer(width=D, depth=4, num_heads=4, num_kv_heads=2, time_every=4,
                             visibility=vis_SS, rngs=nnx.Rngs(0))
    Call:   y_BTSD = model(x_BTSD)
    Cache:  cache = model.init_cache(B, max_len); y_B1SD, cache = model.step(x_B1SD, cache, t)
    """

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        mlp_ratio: float = 4.0,
        mlp_hidden: int | None = None,
        time_every: int = 4,
        kinds: Sequence[str] | None = None,
        logit_cap: float = 0.0,
        qk_norm: bool = True,
        time_rope: bool = True,
        space_rope: bool = False,
        space_grid=None,
        space_rope_base: float = 10000.0,
        rope_base: float = 10000.0,
        time_window: int = 0,
        time_neighbours=None,
        visibility=None,
        remat: bool = False,
        eps: float = 1e-6,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        stream_dtype=None,
    ):
        kinds = tuple(kinds) if kinds is not None else layer_kinds(depth, time_every)
        if len(kinds) != depth:
            raise ValueError(f"kinds has {len(kinds)} entries for depth {depth}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        hidden = mlp_hidden if mlp_hidden is not None else int(round(width * mlp_ratio))
        self.kinds = kinds
        self.blocks = nnx.List(
            [
                Block(
                    k,
                    width,
                    num_heads,
                    num_kv_heads,
                    mlp_hidden=hidden,
                    logit_cap=logit_cap,
                    qk_norm=qk_norm,
                    time_rope=time_rope,
                    space_rope=space_rope,
                    space_grid=None if space_grid is None else tuple(map(tuple, np.asarray(space_grid).tolist())),
                    space_rope_base=space_rope_base,
                    rope_base=rope_base,
                    time_window=time_window,
                    time_neighbours=None
                    if time_neighbours is None
                    else tuple(map(tuple, np.asarray(time_neighbours).tolist())),
                    eps=eps,
                    rngs=rngs,
                    dtype=dtype,
                    param_dtype=param_dtype,
                )
                for k in kinds
            ]
        )
        self.out_norm = RMSNorm(width, eps=eps, param_dtype=param_dtype)
        # Stored as nested tuples: static structure, not a (traced, trainable) array.
        self.visibility = None if visibility is None else tuple(map(tuple, space_mask(visibility).tolist()))
        self.num_kv_heads = num_kv_heads
        self.head_dim = self.blocks[0].attn.head_dim if depth else width // num_heads
        self.time_window, self.remat, self.dtype = time_window, remat, dtype
        # dtype of the residual stream between layers; None keeps the input's (float32 when the
        # inputs add float32 position embeddings, as both models' do)
        self.stream_dtype = stream_dtype

    def _stream(self, x_BTSD):
        return x_BTSD if self.stream_dtype is None else x_BTSD.astype(self.stream_dtype)

    # -- helpers -----------------------------------------------------------------------------------
    def _vis(self, S: int, visibility=None):
        """The S x S space visibility: the call's override, else the constructor's, else all True."""
        if visibility is not None:
            vis_SS = space_mask(visibility) if isinstance(visibility, np.ndarray) else visibility
        elif self.visibility is not None:
            vis_SS = np.array(self.visibility, bool)
        else:
            return None  # no mask: every token of a step sees every other
        if tuple(vis_SS.shape) != (S, S):
            raise ValueError(f"the visibility matrix is {tuple(vis_SS.shape)} but each step has {S} tokens")
        return vis_SS

    @property
    def time_layers(self) -> tuple[int, ...]:
        """Indices of the time layers (the layers that own a KV cache entry)."""
        return tuple(i for i, k in enumerate(self.kinds) if k == TIME)

    # -- full pass ---------------------------------------------------------------------------------
    def __call__(self, x_BTSD, visibility=None):
        """y_BTSD for all steps at once (block-causal over time)."""
        vis_SS = self._vis(x_BTSD.shape[2], visibility)
        x_BTSD = self._stream(x_BTSD)
        for blk in self.blocks:
            if self.remat:
                # Recompute the layer's activations in the backward pass instead of storing them.
                x_BTSD = nnx.remat(lambda b, x: b(x, vis_SS))(blk, x_BTSD)
            else:
                x_BTSD = blk(x_BTSD, vis_SS)
        return self.out_norm(x_BTSD)

    # -- KV cache ----------------------------------------------------------------------------------
    def cache_slots(self, max_len: int) -> int:
        """C, the slots a cache for `max_len` steps needs: min(max_len, time_window) with a window."""
        return min(max_len, self.time_window) if self.time_window > 0 else max_len

    def is_ring(self, cache_len: int) -> bool:
        """Whether a cache of `cache_len` slots holds the whole window at every step (a ring buffer:
        any t); otherwise it holds steps 0 .. cache_len - 1 only."""
        return 0 < self.time_window <= cache_len

    def init_cache(self, batch: int, max_len: int, num_tokens: int | None = None, dtype=None):
        """Empty cache for `max_len` steps: a tuple with one {"k", "v"} (k_BSCGH) per time layer, of
        C = `cache_slots(max_len)` slots (fewer than max_len with a shorter time window: a ring).

        `num_tokens` (S) defaults to the size of the constructor's visibility matrix; `dtype` to
        the compute dtype.
        """
        if num_tokens is None:
            if self.visibility is None:
                raise ValueError("init_cache needs num_tokens (no visibility matrix fixes S)")
            num_tokens = len(self.visibility)
        shape = (batch, num_tokens, self.cache_slots(max_len), self.num_kv_heads, self.head_dim)
        dt = self.dtype if dtype is None else dtype
        return tuple({"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in self.time_layers)

    def prefill(self, x_BTSD, max_len: int, visibility=None):
        """Full pass over a context of T steps (T <= max_len, or any T with a ring cache); returns
        (y_BTSD, cache holding steps < T: the last C of them in a ring)."""
        B, T, S, _ = x_BTSD.shape
        C = self.cache_slots(max_len)
        if T > max_len and not self.is_ring(C):
            raise ValueError(f"a context of {T} steps does not fit a cache of {max_len}")
        vis_SS = self._vis(S, visibility)
        x_BTSD = self._stream(x_BTSD)
        cache = list(self.init_cache(B, max_len, S))

        def fill(empty_BSCGH, a_BSTGH):
            a_BSTGH = a_BSTGH.astype(empty_BSCGH.dtype)
            if T <= C:  # steps 0 .. T - 1 in slots 0 .. T - 1
                return jax.lax.dynamic_update_slice(empty_BSCGH, a_BSTGH, (0,) * 5)
            # a ring: the last C steps, step u in slot u mod C
            return jnp.roll(a_BSTGH[:, :, T - C :], (T - C) % C, axis=2)

        j = 0
        for blk in self.blocks:
            x_BTSD, kv = blk(x_BTSD, vis_SS, return_kv=True)
            if kv is not None:
                cache[j] = {n: fill(cache[j][n], a) for n, a in zip(("k", "v"), kv)}
                j += 1
        return self.out_norm(x_BTSD), tuple(cache)

    def step(self, x_B1SD, cache, t, visibility=None):
        """Process step t (x_B1SD) given the cache of steps < t; returns (y_B1SD, updated cache).

        Equals the full pass at step t. `t` may be a traced integer under jit. A ring cache
        (`is_ring`) takes any t >= 0. Otherwise the cache holds C steps: a concrete t >= C raises
        ValueError; a traced one cannot raise, so the outputs are NaN instead (never a silent
        overwrite of another step's slot).
        """
        cache = tuple(cache)
        if len(cache) != len(self.time_layers):
            raise ValueError(f"the cache has {len(cache)} entries; this model has {len(self.time_layers)} time layers")
        C = cache[0]["k"].shape[2] if cache and not self.is_ring(cache[0]["k"].shape[2]) else None
        if C is not None and not isinstance(t, jax.core.Tracer) and int(t) >= C:
            raise ValueError(f"step {int(t)} does not fit a KV cache of {C} steps")
        vis_SS = self._vis(x_B1SD.shape[2], visibility)
        x_B1SD = self._stream(x_B1SD)
        new, j = [], 0
        for blk in self.blocks:
            if blk.kind == TIME:
                x_B1SD, c = blk.step(x_B1SD, vis_SS, cache[j], t)
                new.append(c)
                j += 1
            else:
                x_B1SD, _ = blk.step(x_B1SD, vis_SS, None, t)
        y_B1SD = self.out_norm(x_B1SD)
        if C is not None:
            y_B1SD = jnp.where(jnp.asarray(t) < C, y_B1SD, jnp.nan).astype(y_B1SD.dtype)
        return y_B1SD, tuple(new)

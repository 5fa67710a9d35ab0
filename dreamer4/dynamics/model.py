"""Dynamics model: block-causal axial transformer over tokenizer latents and actions (sec. 3.2).

Shape key:
    B batch, T time steps, L tokenizer latents per frame, N latent width,
    Z = S_z spatial tokens per step, R = S_r register tokens, S tokens per step, D width.

Tokens of step t, in this order (S = 2 + R + Z):
    [action token, signal-level/step-size token, R registers, Z spatial tokens]
* action token: a learned embedding, plus the embedding of action_t only where it is labeled
  (action_mask_t); unlabeled video uses the learned embedding alone. Step convention: action_t
  is the action that led INTO frame t, so the dynamics at step t sees action_t and predicts z_t.
* signal level tau_t and step size d_t are discrete: tau on the grid i / k_max, d = 1 / 2^j;
  each is looked up in its own embedding table and the two halves are concatenated channel-wise
  into one token.
* spatial tokens: the L latents of the (corrupted) frame, grouped into Z tokens of L/Z latents
  each and linearly projected to the width. With `space_rope` (patch-layout tokenizers: latent l
  sits at row l // cols, column l % cols of the patch grid) space attention rotates queries and
  keys by each spatial token's (row, column // group); the other tokens sit at (0, 0). With
  `action_broadcast` the labeled action's embedding is also added to every spatial token. With
  `time_neighbourhood` r > 0 each time layer lets a spatial token read the (2r+1)^2 grid
  neighbours of its cell in steps <= t (`time_neighbour_table`), with a per-neighbour logit bias
  read from the token: a one-tile view shift becomes one attention hop.
Space attention lets every token of a step see every other token of that step; time layers are
causal, so all tokens of step t see all tokens of steps <= t and none of later steps.
Output: the spatial tokens are projected back to the latents: x-prediction of the clean z_t.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from dreamer4.config import ConfigError, DynamicsNet
from dreamer4.nn import AxialTransformer
from dreamer4.nn.layers import broadcast_param
from dreamer4.tokenizer.model import Tokenizer


def tau_index(tau, k_max: int):
    """Signal level -> row of the tau embedding table: round(tau * k_max), in [0, k_max]."""
    return jnp.clip(jnp.round(jnp.asarray(tau, jnp.float32) * k_max), 0, k_max).astype(jnp.int32)


def d_index(d, k_max: int):
    """Step size d = 1/2^j -> j = round(log2(1/d)), in [0, log2 k_max]."""
    j = jnp.round(-jnp.log2(jnp.maximum(jnp.asarray(d, jnp.float32), 1.0 / k_max)))
    return jnp.clip(j, 0, int(math.log2(k_max))).astype(jnp.int32)


def space_positions(cfg: DynamicsNet, num_latents: int, latent_grid, key: str = "dynamics.space_rope"):
    """(row, col) of each of the 2 + R + Z tokens of a step for 2-D RoPE: spatial token z holds
    latents z*g .. z*g + g - 1 of a rows x cols grid (row-major), so it sits at (row, col // g)."""
    if latent_grid is None:
        raise ConfigError(
            f"config key '{key}' needs a tokenizer with tokenizer.latent_layout=patch "
            "(its latents lie on the patch grid); this tokenizer's latents have no grid"
        )
    rows, cols = latent_grid
    g = num_latents // cfg.spatial_tokens
    if rows * cols != num_latents or cols % g:
        raise ConfigError(
            f"config key 'dynamics.spatial_tokens' ({cfg.spatial_tokens}) must group whole parts of "
            f"the {rows}x{cols} latent grid's rows for {key} (latents per token {g})"
        )
    lat = np.arange(0, num_latents, g)
    spatial = np.stack([lat // cols, (lat % cols) // g], -1)
    return np.concatenate([np.zeros((2 + cfg.register_tokens, 2), int), spatial]).astype(int)


def time_neighbour_table(cfg: DynamicsNet, num_latents: int, latent_grid, radius: int):
    """(2 + R + Z, J) token indices, J = (2r + 1)^2, -1 = none: the spatial tokens' grid
    neighbours (row offset, column offset) in row-major order, so slot J // 2 is the token itself;
    the other tokens' rows hold only themselves (in slot J // 2)."""
    # checks the grid; (row, col // g) per token
    pos = space_positions(cfg, num_latents, latent_grid, key="dynamics.time_neighbourhood")
    first = 2 + cfg.register_tokens
    spatial = pos[first:]
    rows, cols = latent_grid[0], latent_grid[1] // (num_latents // cfg.spatial_tokens)
    offsets = [(dr, dc) for dr in range(-radius, radius + 1) for dc in range(-radius, radius + 1)]
    table = np.full((len(pos), len(offsets)), -1, np.int64)
    table[:first, len(offsets) // 2] = np.arange(first)
    for z, (r, c) in enumerate(spatial):
        for j, (dr, dc) in enumerate(offsets):
            if 0 <= r + dr < rows and 0 <= c + dc < cols:
                table[first + z, j] = first + (r + dr) * cols + (c + dc)
    return table


class Dynamics(nnx.Module):
    def __init__(
        self,
        cfg: DynamicsNet,
        num_latents: int,
        latent_dim: int,
        num_actions: int,
        *,
        latent_grid: tuple[int, int] | None = None,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        stream_dtype=None,
    ):
        self.cfg = cfg
        self.L, self.N, self.A = num_latents, latent_dim, num_actions
        self.Z, self.R, D = cfg.spatial_tokens, cfg.register_tokens, cfg.width
        self.group = num_latents // cfg.spatial_tokens
        self.num_tokens = 2 + self.R + self.Z
        self.dtype = dtype
        init = nnx.initializers.normal(0.02)
        self.z_in = nnx.Linear(self.group * latent_dim, D, rngs=rngs, dtype=dtype)
        self.z_out = nnx.Linear(D, self.group * latent_dim, rngs=rngs, dtype=dtype)
        self.spatial_pos = nnx.Param(init(rngs.params(), (self.Z, D)))
        self.registers = nnx.Param(init(rngs.params(), (self.R, D)))
        self.tau_embed = nnx.Embed(cfg.k_max + 1, D // 2, rngs=rngs)
        self.d_embed = nnx.Embed(int(math.log2(cfg.k_max)) + 1, D - D // 2, rngs=rngs)
        self.action_base = nnx.Param(init(rngs.params(), (D,)))
        self.action_embed = nnx.Embed(num_actions, D, rngs=rngs)
        self.transformer = AxialTransformer(
            space_grid=space_positions(cfg, num_latents, latent_grid) if cfg.space_rope else None,
            space_rope_base=cfg.space_rope_base,
            width=D,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            mlp_ratio=cfg.mlp_ratio,
            time_every=cfg.time_every,
            time_window=cfg.time_window,
            time_neighbours=time_neighbour_table(cfg, num_latents, latent_grid, cfg.time_neighbourhood)
            if cfg.time_neighbourhood
            else None,
            logit_cap=cfg.logit_cap,
            rngs=rngs,
            dtype=dtype,
            stream_dtype=stream_dtype,
        )

    def action_embedding(self, actions_BT, action_mask_BT):
        """emb_BTD: the action's embedding where labeled, 0 where not (masked actions never index
        the table: they are replaced by 0 and their embedding is zeroed)."""
        safe = jnp.where(action_mask_BT, actions_BT, 0)
        return self.action_embed(safe) * action_mask_BT[..., None]

    def action_tokens(self, actions_BT, action_mask_BT):
        """Learned embedding + the action's own embedding where labeled."""
        return (self.action_base[...] + self.action_embedding(actions_BT, action_mask_BT))[:, :, None, :]  # B T 1 D

    def tokens(self, z_BTLN, tau_BT, d_BT, actions_BT, action_mask_BT):
        B, T = z_BTLN.shape[:2]
        k = self.cfg.k_max
        sig = jnp.concatenate([self.tau_embed(tau_index(tau_BT, k)), self.d_embed(d_index(d_BT, k))], -1)
        z = rearrange(z_BTLN, "b t (z g) n -> b t z (g n)", g=self.group)
        spatial = self.z_in(z.astype(self.dtype)).astype(jnp.float32) + broadcast_param(self.spatial_pos[...], (B, T))
        if self.cfg.action_broadcast:
            spatial = spatial + self.action_embedding(actions_BT, action_mask_BT)[:, :, None, :]
        regs = broadcast_param(self.registers[...], (B, T))
        parts = [self.action_tokens(actions_BT, action_mask_BT), sig[:, :, None, :], regs, spatial]
        return jnp.concatenate([p.astype(jnp.float32) for p in parts], axis=2)

    def readout(self, y_BTSD):
        out = self.z_out(y_BTSD[:, :, 2 + self.R :]).astype(jnp.float32)
        return rearrange(out, "b t z (g n) -> b t (z g) n", g=self.group)

    def __call__(self, z_BTLN, tau_BT, d_BT, actions_BT, action_mask_BT):
        """x-prediction: the clean latents z1_BTLN for every step, from corrupted inputs."""
        with jax.named_scope("dynamics"):  # scope names: profiles attribute kernel time to them
            return self.readout(self.transformer(self.tokens(z_BTLN, tau_BT, d_BT, actions_BT, action_mask_BT)))

    # -- generation with a KV cache -----------------------------------------------------------
    def init_cache(self, batch: int, max_len: int):
        return self.transformer.init_cache(batch, max_len, num_tokens=self.num_tokens)

    def step(self, z_B1LN, tau_B1, d_B1, action_B1, action_mask_B1, cache, t):
        """Predict clean z_t for one step t (inputs at t), reading the cache of steps < t."""
        y, cache = self.transformer.step(self.tokens(z_B1LN, tau_B1, d_B1, action_B1, action_mask_B1), cache, t)
        return self.readout(y), cache


def encode_frames(tokenizer: Tokenizer, frames_BTHWC_uint8):
    """Clean tokenizer latents z1_BTLN of uint8 frames, with no gradient into the tokenizer."""
    return jax.lax.stop_gradient(tokenizer.encode(frames_BTHWC_uint8.astype(jnp.float32) / 255.0))


def observed(batch: dict) -> dict:
    """What a loader batch observes: {"latents": z1_BTLN} where it read a latent cache, else
    {"frames": frames_BTHWC} (data/loader.py)."""
    key = "latents" if "latents" in batch else "frames"
    return {key: batch[key]}


def batch_latents(world: WorldModel, batch: dict):
    """Clean latents z1_BTLN of a batch: the cached ones, or its frames encoded by the frozen tokenizer."""
    if "latents" in batch:
        return batch["latents"]
    with jax.named_scope("frozen_encoder"):  # names its kernels in profiles
        return world.latents(batch["frames"])


class WorldModel(nnx.Module):
    """The world model: the (frozen) tokenizer and the dynamics, as one module (one state, one checkpoint).

    The tokenizer is trained first and frozen here (training only updates parameters under `dynamics`);
    holding both in one module places, shards and checkpoints them together.
    """

    def __init__(self, tokenizer: Tokenizer, dynamics: Dynamics):
        self.tokenizer = tokenizer
        self.dynamics = dynamics

    def latents(self, frames_BTHWC_uint8):
        """Clean tokenizer latents z1 of uint8 frames, with no gradient into the tokenizer."""
        return encode_frames(self.tokenizer, frames_BTHWC_uint8)

    def decode(self, z_BTLN):
        """Tokenizer latents -> frames in [0, 1] (clipped)."""
        return jnp.clip(self.tokenizer.decode(z_BTLN), 0.0, 1.0)

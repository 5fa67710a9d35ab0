"""Causal video tokenizer (Dreamer 4, sec. 3.1).

Shape key:
    B batch, T time (frames), H/W pixels (Hp/Wp padded), C channels,
    P patches per frame, X pixels per patch (p*p*C), L latent tokens per frame,
    N bottleneck width per latent token, D model width, S = P + L tokens per step.

Encoder: patchify -> linear -> (masked patches replaced by a learned mask embedding) -> tokens
[P patch tokens, L learned latent tokens] -> axial transformer (space attention within a frame,
causal time attention across frames) -> latent outputs -> linear to N -> tanh = z_BTLN.
Inside a frame, patch tokens see only patch tokens and latent tokens see everything, so what the
decoder gets has to pass through the latents.
With `latent_layout: patch` there are no learned latent tokens: the bottleneck reads each patch
token's output (L = P latents, one per patch position, full attention within a frame), and the
decoder's tokens are those P latents at their patch positions. A one-tile view shift is then a
shift of latents between positions, which the dynamics' space attention can express directly.

Decoder: z -> linear to D -> tokens [P learned patch queries, L latents] -> axial transformer
(patch queries see everything, latents see only latents) -> patch outputs -> linear to X ->
unpatchify -> crop the padding. Trained by masked autoencoding: each image drops its patches with
probability p ~ U(0, p_max), and the loss is the MSE of the whole reconstruction.

Causality: both transformers attend only to the current and earlier frames, so the encoding and
decoding of frames <= t never depend on frame t+1 (tests/test_tokenizer.py proves it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from dreamer4.config import ConfigError, TokenizerNet
from dreamer4.nn import AxialTransformer
from dreamer4.nn.layers import broadcast_param


def sample_patch_mask(key, B: int, T: int, P: int, p_max: float):
    """mask_BTP, True = patch dropped. Per image p ~ U(0, p_max); each patch dropped w.p. p."""
    k_p, k_m = jax.random.split(key)
    p_BT1 = jax.random.uniform(k_p, (B, T, 1), maxval=p_max)
    return jax.random.uniform(k_m, (B, T, P)) < p_BT1


def encoder_visibility(P: int, L: int) -> np.ndarray:
    """vis[q, k] = query token q may attend key token k, within one frame (patches first)."""
    vis = np.zeros((P + L, P + L), bool)
    vis[:P, :P] = True  # patches see patches
    vis[P:, :] = True  # latents see everything
    return vis


def decoder_visibility(P: int, L: int) -> np.ndarray:
    vis = np.zeros((P + L, P + L), bool)
    vis[:P, :] = True  # patch queries read everything
    vis[P:, P:] = True  # latents see only latents
    return vis


class Tokenizer(nnx.Module):
    def __init__(
        self,
        cfg: TokenizerNet,
        frame_shape: tuple[int, int, int],
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        stream_dtype=None,
    ):
        self.cfg = cfg
        self.frame_shape = tuple(frame_shape)
        H, W, C = frame_shape
        p = cfg.patch_size
        self.Hp, self.Wp = -(-H // p) * p, -(-W // p) * p
        self.num_patches = (self.Hp // p) * (self.Wp // p)
        P, L, D, X = self.num_patches, cfg.num_latents, cfg.width, p * p * C
        self.patch_layout = cfg.latent_layout == "patch"
        if self.patch_layout and L != P:
            raise ConfigError(
                f"config key 'tokenizer.num_latents' ({L}) must equal the number of patches ({P} = "
                f"{self.Hp // p}x{self.Wp // p} for {H}x{W} frames at tokenizer.patch_size {p}) when "
                "tokenizer.latent_layout is 'patch'"
            )
        self.dtype = dtype
        init = nnx.initializers.normal(0.02)
        pos_init = nnx.initializers.normal(0.5)
        self.patch_in = nnx.Linear(X, D, rngs=rngs, dtype=dtype)
        self.patch_pos = nnx.Param(pos_init(rngs.params(), (P, D)))
        self.mask_token = nnx.Param(init(rngs.params(), (D,)))
        if not self.patch_layout:
            self.latent_tokens = nnx.Param(init(rngs.params(), (L, D)))
            self.patch_queries = nnx.Param(init(rngs.params(), (P, D)))
        # Small init keeps the tanh in its linear range at the start; a saturated bottleneck
        # passes almost no gradient and training stalls near the mean frame.
        self.to_bottleneck = nnx.Linear(D, cfg.latent_dim, rngs=rngs, dtype=dtype, kernel_init=init)
        self.from_bottleneck = nnx.Linear(cfg.latent_dim, D, rngs=rngs, dtype=dtype)
        # Patch layout: these are the decoder's patch positions, as distinct as the encoder's.
        self.latent_pos = nnx.Param((pos_init if self.patch_layout else init)(rngs.params(), (L, D)))
        # Zero-initialised read-out: training starts from the (learned) bias, not from noise.
        self.patch_out = nnx.Linear(D, X, rngs=rngs, dtype=dtype, kernel_init=nnx.initializers.zeros_init())
        # Per-position output bias: learns the average frame within a few steps, so the network
        # spends its capacity on what differs from it.
        self.patch_bias = nnx.Param(jnp.zeros((P, X), jnp.float32))
        common = dict(
            width=D,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            mlp_ratio=cfg.mlp_ratio,
            time_every=cfg.time_every,
            time_window=cfg.time_window,
            logit_cap=cfg.logit_cap,
            rngs=rngs,
            dtype=dtype,
            stream_dtype=stream_dtype,
        )
        if self.patch_layout:  # one set of P tokens per side, full attention within a frame
            full = np.ones((P, P), bool)
            self.encoder = AxialTransformer(visibility=full, **common)
            self.decoder = AxialTransformer(visibility=full, **common)
        else:
            self.encoder = AxialTransformer(visibility=encoder_visibility(P, L), **common)
            self.decoder = AxialTransformer(visibility=decoder_visibility(P, L), **common)

    @property
    def latent_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of the latents on the patch grid (patch layout), else None."""
        p = self.cfg.patch_size
        return (self.Hp // p, self.Wp // p) if self.patch_layout else None

    # -- pixels <-> patches ------------------------------------------------------------------
    def patchify(self, frames_BTHWC):
        H, W, _ = self.frame_shape
        pad = ((0, 0), (0, 0), (0, self.Hp - H), (0, self.Wp - W), (0, 0))
        x = jnp.pad(frames_BTHWC, pad)
        p = self.cfg.patch_size
        return rearrange(x, "b t (h p1) (w p2) c -> b t (h w) (p1 p2 c)", p1=p, p2=p)

    def unpatchify(self, patches_BTPX):
        H, W, C = self.frame_shape
        p = self.cfg.patch_size
        x = rearrange(
            patches_BTPX, "b t (h w) (p1 p2 c) -> b t (h p1) (w p2) c", h=self.Hp // p, w=self.Wp // p, p1=p, p2=p, c=C
        )
        return x[:, :, :H, :W]

    # -- encoder / decoder token assembly ------------------------------------------------------
    def _enc_tokens(self, frames_BTHWC, mask_BTP):
        x_BTPD = self.patch_in(self.patchify(frames_BTHWC.astype(self.dtype)))
        x_BTPD = x_BTPD + broadcast_param(self.patch_pos[...], x_BTPD.shape[:2])
        if mask_BTP is not None:
            x_BTPD = jnp.where(mask_BTP[..., None], self.mask_token[...].astype(x_BTPD.dtype), x_BTPD)
        if self.patch_layout:
            return x_BTPD
        B, T = x_BTPD.shape[:2]
        lat_BTLD = broadcast_param(self.latent_tokens[...], (B, T))
        return jnp.concatenate([x_BTPD, lat_BTLD.astype(x_BTPD.dtype)], axis=2)

    def _enc_out(self, y_BTSD):
        lat_BTLD = y_BTSD if self.patch_layout else y_BTSD[:, :, self.num_patches :]
        return jnp.tanh(self.to_bottleneck(lat_BTLD).astype(jnp.float32))

    def _dec_tokens(self, z_BTLN):
        lat_BTLD = self.from_bottleneck(z_BTLN.astype(self.dtype))
        lat_BTLD = lat_BTLD + broadcast_param(self.latent_pos[...], lat_BTLD.shape[:2])
        if self.patch_layout:  # the latents are the patch queries
            return lat_BTLD
        B, T = z_BTLN.shape[:2]
        q_BTPD = broadcast_param(self.patch_queries[...], (B, T))
        return jnp.concatenate([q_BTPD.astype(lat_BTLD.dtype), lat_BTLD], axis=2)

    def _dec_out(self, y_BTSD):
        out_BTPX = self.patch_out(y_BTSD[:, :, : self.num_patches]).astype(jnp.float32) + self.patch_bias[...]
        return self.unpatchify(out_BTPX)

    # -- whole clips ---------------------------------------------------------------------------
    def encode(self, frames_BTHWC, mask_BTP=None):
        """Frames in [0, 1] -> z_BTLN in (-1, 1)."""
        with jax.named_scope("encoder"):  # scope names: profiles attribute kernel time to them
            return self._enc_out(self.encoder(self._enc_tokens(frames_BTHWC, mask_BTP)))

    def decode(self, z_BTLN):
        """z_BTLN -> frames_BTHWC (unclipped reconstruction)."""
        with jax.named_scope("decoder"):
            return self._dec_out(self.decoder(self._dec_tokens(z_BTLN)))

    def __call__(self, frames_BTHWC, mask_BTP=None):
        return self.decode(self.encode(frames_BTHWC, mask_BTP))

    # -- frame by frame, with KV caches (interactive use) --------------------------------------
    def init_cache(self, batch: int, max_len: int):
        return {"enc": self.encoder.init_cache(batch, max_len), "dec": self.decoder.init_cache(batch, max_len)}

    def encode_step(self, frame_B1HWC, cache, t):
        """Encode frame t given the cache of frames < t; equals encode() on the whole clip."""
        y, enc = self.encoder.step(self._enc_tokens(frame_B1HWC, None), cache["enc"], t)
        return self._enc_out(y), {**cache, "enc": enc}

    def decode_step(self, z_B1LN, cache, t):
        y, dec = self.decoder.step(self._dec_tokens(z_B1LN), cache["dec"], t)
        return self._dec_out(y), {**cache, "dec": dec}

    def decode_prefill(self, z_BTLN, max_len: int):
        """Decode a clip of T <= max_len frames at once and return the decoder's KV cache of it, so
        that decode_step can continue at step T: (frames_BTHWC, decoder cache)."""
        y, dec = self.decoder.prefill(self._dec_tokens(z_BTLN), max_len)
        return self._dec_out(y), dec

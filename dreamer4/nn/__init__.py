"""Shared network blocks: RMSNorm, SwiGLU, RoPE, soft-capped GQA attention with masks, the axial transformer,
two-hot symlog distributions."""

from dreamer4.nn.attention import Attention, cached_time_mask, causal_time_mask, dot_product_attention, space_mask
from dreamer4.nn.distributions import symexp, symlog, symlog_bins, two_hot, two_hot_mean, two_hot_nll
from dreamer4.nn.layers import RMSNorm, SwiGLU, apply_rope, apply_rope_2d, rms_norm, rope_frequencies, soft_cap
from dreamer4.nn.transformer import SPACE, TIME, AxialTransformer, Block, layer_kinds

__all__ = [
    "SPACE",
    "TIME",
    "Attention",
    "AxialTransformer",
    "Block",
    "RMSNorm",
    "SwiGLU",
    "apply_rope",
    "apply_rope_2d",
    "cached_time_mask",
    "causal_time_mask",
    "dot_product_attention",
    "layer_kinds",
    "rms_norm",
    "rope_frequencies",
    "soft_cap",
    "space_mask",
    "symexp",
    "symlog",
    "symlog_bins",
    "two_hot",
    "two_hot_mean",
    "two_hot_nll",
]

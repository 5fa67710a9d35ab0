"""Shared network blocks: norms, SwiGLU, RoPE, soft-capped GQA attention, the axial transformer."""

from dreamer4.nn.attention import Attention, causal_mask, gqa_attention
from dreamer4.nn.layers import RMSNorm, SwiGLU, apply_rope, rms_norm, soft_cap
from dreamer4.nn.transformer import AxialTransformer, Block

__all__ = ["Attention", "AxialTransformer", "Block", "RMSNorm", "SwiGLU", "apply_rope", "causal_mask",
           "gqa_attention", "rms_norm", "soft_cap"]

"""Symlog / symexp and the two-hot distribution over symlog-spaced bins (DreamerV3, used by Dreamer 4's
reward and value heads).

Shape key (suffixes): N any leading dims, K bins.

A scalar y is represented on a fixed grid of K bins b_0 < ... < b_{K-1} placed uniformly in symlog
space; its target is the "two-hot" vector putting weight on the two bins around symlog(y), so that
the expected bin equals symlog(y) exactly. A head predicts logits over the bins; its value is
symexp(sum_k softmax(logits)_k b_k). Learning with a cross-entropy on two-hot targets is robust to
the scale of y (rewards and returns of very different magnitudes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def symlog(x):
    """symlog(x) = sign(x) ln(1 + |x|)."""
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def symexp(x):
    """symexp(x) = sign(x) (exp(|x|) - 1), the inverse of symlog."""
    return jnp.sign(x) * jnp.expm1(jnp.abs(x))


def symlog_bins(num_bins: int, limit: float = 20.0):
    """K bin centres uniform in symlog space on [-limit, limit] (float32)."""
    return jnp.linspace(-limit, limit, num_bins, dtype=jnp.float32)


def two_hot(x_N, bins_K):
    """Two-hot target of symlog(x) on the bins, shape (..., K).

    With y = clip(symlog(x), b_0, b_{K-1}) and k the bin with b_k <= y < b_{k+1}:
        p_k = (b_{k+1} - y) / (b_{k+1} - b_k),  p_{k+1} = 1 - p_k,  all other entries 0,
    so sum_k p_k b_k = y.
    """
    K = bins_K.shape[0]
    y = jnp.clip(symlog(jnp.asarray(x_N, jnp.float32)), bins_K[0], bins_K[-1])
    k = jnp.clip(jnp.searchsorted(bins_K, y, side="right") - 1, 0, K - 2)
    lo, hi = bins_K[k], bins_K[k + 1]
    w_hi = (y - lo) / (hi - lo)
    return jax.nn.one_hot(k, K) * (1.0 - w_hi)[..., None] + jax.nn.one_hot(k + 1, K) * w_hi[..., None]


def two_hot_nll(logits_NK, x_N, bins_K):
    """-sum_k two_hot(x)_k log softmax(logits)_k: the cross-entropy of the head against target x."""
    return -jnp.sum(jax.lax.stop_gradient(two_hot(x_N, bins_K)) * jax.nn.log_softmax(logits_NK, -1), -1)


def two_hot_mean(logits_NK, bins_K):
    """The head's prediction: symexp(sum_k softmax(logits)_k b_k)."""
    return symexp(jnp.sum(jax.nn.softmax(logits_NK.astype(jnp.float32), -1) * bins_K, -1))

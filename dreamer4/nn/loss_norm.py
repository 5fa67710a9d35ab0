"""Loss normalisation by running RMS estimates (Dreamer 4 sec. 3: "we normalize all loss terms by
running estimates of their root-mean-square"), so that no term of a multi-term objective silently
dominates the others whatever its raw scale.

For each term x_k (a scalar loss per training step), with decay beta and the step count n:

    m_k <- beta m_k + (1 - beta) x_k^2                (running mean square, m_k = 0 at n = 0)
    r_k  = sqrt(m_k / (1 - beta^n))                    (bias-corrected RMS, as in Adam)
    L    = sum_k w_k x_k / max(r_k, eps)               (r_k is a constant for the gradient)

At the first step r_k = |x_k|, so every term starts with weight w_k; afterwards a term whose
scale drifts keeps contributing about w_k. Gradients still flow through x_k only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_update(ms, count, x, decay: float):
    """(new mean square, new count, bias-corrected RMS) after observing the scalar x."""
    x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
    ms = decay * ms + (1.0 - decay) * jnp.square(x)
    count = count + 1
    rms = jnp.sqrt(ms / (1.0 - jnp.power(decay, count.astype(jnp.float32))))
    return ms, count, rms


class RunningStat(nnx.Variable):
    """Non-trainable running statistic: checkpointed with the model, never touched by the optimiser."""


class LossNormalizer(nnx.Module):
    """Holds one running mean square per named term; `__call__` normalises and sums the terms."""

    def __init__(self, names, decay: float = 0.99, eps: float = 1e-8):
        self.names = tuple(names)
        self.decay, self.eps = decay, eps
        self.ms = RunningStat(jnp.zeros((len(self.names),), jnp.float32))
        self.count = RunningStat(jnp.zeros((), jnp.int32))

    def __call__(self, terms: dict, weights: dict | None = None):
        """(sum_k w_k x_k / max(r_k, eps), {name: r_k}) for the terms present (missing ones count 0);
        updates the running statistics."""
        weights = weights or {}
        x = jnp.stack([jnp.asarray(terms.get(n, 0.0), jnp.float32) for n in self.names])
        self.ms[...], self.count[...], rms = rms_update(self.ms[...], self.count[...], x, self.decay)
        scale = 1.0 / jnp.maximum(jax.lax.stop_gradient(rms), self.eps)
        total = sum(weights.get(n, 1.0) * x[i] * scale[i] for i, n in enumerate(self.names) if n in terms)
        return total, {n: rms[i] for i, n in enumerate(self.names)}

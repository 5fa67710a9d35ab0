"""Autoregressive generation with the dynamics model: K shortcut steps per frame, KV cache.

Shape key: B batch (independent rollouts), C context steps, H generated steps, L latents, N width.

For each new step t (action_t given: from data, a policy or a person):
  1. `denoise_frame` runs K = sample_steps shortcut steps of size d = 1/K from noise, each one
     a cached forward pass of step t (the pass overwrites cache slot t);
  2. the result, corrupted to the context signal level tau_ctx (default 0.9, i.e. 10% noise), is passed once more at
     step t with d = d_min so that slot t holds what later steps read as context (slightly
     noisy, as in training, which makes the model robust to its own small errors).
So a frame costs K + 1 forward passes of one step against the cache, never a pass over the
whole context, in one compiled call (`generate_step`: K steps in a fori_loop, cache donated).
Context frames (true latents) are written with one `prefill` pass.

`generate_step` and `prefill_context` are `module_jit` functions (dreamer4/nn/module_jit.py), not
nnx.jit ones: nnx.jit walks the module's graph twice per call in Python (~14 ms for the classic
dynamics on a CPU core, ~24 ms per frame on the H100 host), which dwarfed a frame's compute.
They read the dynamics' weights on every call and never write them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dreamer4.dynamics.model import Dynamics
from dreamer4.dynamics.shortcut import corrupt, denoise_frame
from dreamer4.nn.module_jit import module_jit


def context_inputs(z_BTLN, key, context_tau: float, k_max: int):
    """Clean latents -> (z corrupted to tau_ctx, tau_BT, d_BT = d_min): what the cache holds for a
    context step (dataset context, generated frame, or a real frame the agent acts on)."""
    B, T = z_BTLN.shape[:2]
    tau = jnp.full((B, T), context_tau, jnp.float32)
    z0 = jax.random.normal(key, z_BTLN.shape, jnp.float32)
    return corrupt(z_BTLN, z0, tau), tau, jnp.full((B, T), 1.0 / k_max, jnp.float32)


def generate_frame(
    step_fn, cache, k_noise, k_ctx, shape_B1LN, K: int, k_max: int, context_tau: float, z_of=lambda out: out
):
    """One new step t against the cache: K shortcut steps from noise, then one context pass.

    step_fn(z_B1LN, tau_B1, d_B1, cache) -> (out, cache) is one cached forward pass of step t (each
    pass overwrites cache slot t); z_of(out) is its x-prediction. The K steps run in one
    `lax.fori_loop` with the cache as its carry (one traced model call whatever K, so compile time
    does not grow with K; tau is a traced float32 scalar). Returns (z_t, out of the context pass,
    cache): the clean latents of the new frame, what the context pass read out (the agent reads its
    state from it) and the cache whose slot t holds the frame at the context level.
    """
    B = shape_B1LN[0]

    def predict(z_B1LN, tau, d, cache):
        tau_B1 = jnp.broadcast_to(jnp.asarray(tau, jnp.float32), (B, 1))
        d_B1 = jnp.broadcast_to(jnp.asarray(d, jnp.float32), (B, 1))
        out, cache = step_fn(z_B1LN, tau_B1, d_B1, cache)
        return z_of(out), cache

    z_t, cache = denoise_frame(predict, k_noise, shape_B1LN, K, k_max, carry=cache)
    zc, tau, d = context_inputs(z_t, k_ctx, context_tau, k_max)
    out, cache = step_fn(zc, tau, d, cache)
    return z_t, out, cache


@module_jit(static_argnames=("max_len", "context_tau"))
def prefill_context(dyn: Dynamics, z_ctx_BCLN, actions_BC, mask_BC, key, max_len: int, context_tau: float):
    """Write C context steps into a fresh cache of `max_len` steps; returns the cache."""
    z, tau, d = context_inputs(z_ctx_BCLN, key, context_tau, dyn.cfg.k_max)
    x = dyn.tokens(z, tau, d, actions_BC, mask_BC)
    _, cache = dyn.transformer.prefill(x, max_len)
    return cache


@module_jit(static_argnames=("K", "context_tau"), donate_argnames=("cache",))
def generate_step(dyn: Dynamics, cache, t, action_B1, mask_B1, key, K: int, context_tau: float):
    """Generate the clean latents of step t (B, 1, L, N) with K shortcut steps; update the cache.

    One compiled call per frame: the K steps run in a `lax.fori_loop` (generate_frame; compile time
    independent of K) and the cache is donated, so slot t is overwritten in place; the caller must
    use the returned cache (the one passed in is deleted). The host cost of a call is one jax.jit
    dispatch (module_jit: the module's graph is walked at its first call only); `t` and `key`
    are best passed as device arrays (a Python int would be transferred on every call).
    """
    B = action_B1.shape[0]
    k_noise, k_ctx = jax.random.split(key)

    def step_fn(z_B1LN, tau_B1, d_B1, cache):
        return dyn.step(z_B1LN, tau_B1, d_B1, action_B1, mask_B1, cache, t)

    z_t, _, cache = generate_frame(step_fn, cache, k_noise, k_ctx, (B, 1, dyn.L, dyn.N), K, dyn.cfg.k_max, context_tau)
    return z_t, cache


def rollout(dyn: Dynamics, z_ctx_BCLN, actions_BT, mask_BT, key, K: int, horizon: int, context_tau: float):
    """Open-loop imagination: C true context steps, then `horizon` generated steps (context at tau_ctx).

    actions_BT / mask_BT cover all C + horizon steps (action_t leads into step t).
    Returns the generated latents (B, horizon, L, N).
    """
    C = z_ctx_BCLN.shape[1]
    k_pre, key = jax.random.split(key)
    if C == 0:  # generation from scratch: the model learned start frames from single images
        cache = dyn.init_cache(actions_BT.shape[0], horizon)
    else:
        cache = prefill_context(
            dyn, z_ctx_BCLN, actions_BT[:, :C], mask_BT[:, :C], k_pre, max_len=C + horizon, context_tau=context_tau
        )
    out = []
    for h in range(horizon):
        t = C + h
        z_t, cache = generate_step(
            dyn,
            cache,
            jnp.int32(t),
            actions_BT[:, t : t + 1],
            mask_BT[:, t : t + 1],
            jax.random.fold_in(key, t),
            K=K,
            context_tau=context_tau,
        )
        out.append(z_t)
    return jnp.concatenate(out, axis=1)

"""Imagined rollouts: the agent acting inside the world model (Dreamer 4 sec. 3.3, RL phase).

Shape key: B rollouts (one per dataset context), C context steps, H imagined steps, L latents,
N latent width, D width, A actions.

A rollout starts from C dataset steps (frames encoded by the tokenizer, with their actions where
labeled), written into a KV cache (S + 1 tokens per step: the agent token included) at the
context signal level `dynamics.context_tau`, as the dynamics sampler does. Then, for h = 1..H:
  1. the policy (distance-1 head) reads the agent output of the previous step and samples the
     action that leads INTO the next step (the step convention);
  2. the next frame is generated with K shortcut steps (`shortcut.denoise_frame`) against the
     cache, conditioned on that action;
  3. the frame, corrupted to the context level, is passed once more to fill its cache slot; the
     agent token's output of this pass is the state h of the new step (reward, value and the
     next action are read from it).
Everything here runs without gradients: the transformer is frozen in this phase and the heads
are trained on the returned agent outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dreamer4.dynamics.shortcut import corrupt, denoise_frame
from dreamer4.policy.heads import Agent


def context_level(agent: Agent, z_BTLN, key):
    """Clean latents -> (z corrupted to tau_ctx, tau_BT, d_BT) as the cache should hold them."""
    dc = agent.dynamics.cfg
    B, T = z_BTLN.shape[:2]
    tau = jnp.full((B, T), dc.context_tau, jnp.float32)
    z0 = jax.random.normal(key, z_BTLN.shape, jnp.float32)
    return corrupt(z_BTLN, z0, tau), tau, jnp.full((B, T), 1.0 / dc.k_max, jnp.float32)


def imagine_rollout(agent: Agent, z_ctx_BCLN, actions_BC, mask_BC, task_B, key, horizon: int, K: int):
    """Roll the policy out in the world model. Returns a dict (all stop-gradient):

    h:        (B, H + 1, D) agent outputs; index 0 = the last context step, index i = imagined step i;
    actions:  (B, H) actions[:, i] was sampled from the policy at h[:, i] and leads into step i + 1;
    z:        (B, H, L, N) the imagined frames' latents (z[:, i] is step i + 1).
    """
    dyn = agent.dynamics
    B, C = actions_BC.shape
    k_ctx, key = jax.random.split(key)
    z, tau, d = context_level(agent, z_ctx_BCLN, k_ctx)
    task_BC = jnp.broadcast_to(task_B[:, None], (B, C))
    (_, h_BCD), cache = agent.prefill(z, tau, d, actions_BC, mask_BC, task_BC, C + horizon)
    task_B1 = task_B[:, None]
    ones_B1 = jnp.ones((B, 1), bool)

    def body(carry, xs):
        cache, h_BD = carry
        t, k = xs
        k_act, k_noise, k_c = jax.random.split(k, 3)
        a_B = jax.random.categorical(k_act, agent.policy_logits(h_BD))
        a_B1 = a_B[:, None]
        state = {"cache": cache}

        def predict(z_B1LN, tau_, d_):
            tau_B1 = jnp.broadcast_to(jnp.asarray(tau_, jnp.float32), (B, 1))
            d_B1 = jnp.broadcast_to(jnp.asarray(d_, jnp.float32), (B, 1))
            (z1_hat, _), state["cache"] = agent.step(z_B1LN, tau_B1, d_B1, a_B1, ones_B1, task_B1, state["cache"], t)
            return z1_hat

        z_t = denoise_frame(predict, k_noise, (B, 1, dyn.L, dyn.N), K, dyn.cfg.k_max)
        zc, tc, dc = context_level(agent, z_t, k_c)
        (_, h_B1D), cache = agent.step(zc, tc, dc, a_B1, ones_B1, task_B1, state["cache"], t)
        return (cache, h_B1D[:, 0]), (h_B1D[:, 0], a_B, z_t[:, 0])

    ts = C + jnp.arange(horizon, dtype=jnp.int32)
    keys = jax.random.split(key, horizon)
    _, (h_HBD, a_HB, z_HBLN) = jax.lax.scan(body, (cache, h_BCD[:, -1]), (ts, keys))
    h = jnp.concatenate([h_BCD[:, -1:], jnp.moveaxis(h_HBD, 0, 1)], axis=1)
    out = {"h": h, "actions": jnp.moveaxis(a_HB, 0, 1), "z": jnp.moveaxis(z_HBLN, 0, 1)}
    return jax.lax.stop_gradient(out)

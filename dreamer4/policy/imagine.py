"""Imagined rollouts: the agent acting inside the world model (Dreamer 4 sec. 3.3, RL phase).

Shape key: B rollouts (one per dataset context), C context steps, H imagined steps, L latents,
N latent width, D width, A actions.

A rollout starts from C dataset steps (frames encoded by the tokenizer, with their actions where
labeled), written into a KV cache (S + 1 tokens per step: the agent token included) at the
context signal level `dynamics.context_tau`, with the dynamics sampler's own helpers
(`context_inputs`, `generate_frame`). Then, for h = 1..H:
  1. the policy (distance-1 head) reads the agent output of the previous step and samples the
     action that leads INTO the next step (the step convention);
  2. the next frame is generated with K shortcut steps (`shortcut.denoise_frame`) against the
     cache, conditioned on that action;
  3. the frame, corrupted to the context level, is passed once more to fill its cache slot; the
     agent token's output of this pass is the state h of the new step (reward, value and the
     next action are read from it).
`imagined_reward_cont` reads the rollout's rewards and continuation (training and evaluation
share it). Everything here runs without gradients: the transformer is frozen in this phase and the heads
are trained on the returned agent outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dreamer4.config import Config, DynamicsSampling
from dreamer4.dynamics.sampler import context_inputs, generate_frame
from dreamer4.policy.heads import Agent


def imagine_rollout(
    agent: Agent, z_ctx_BCLN, actions_BC, mask_BC, task_B, key, horizon: int, sampling: DynamicsSampling
):
    """Roll the policy out in the world model. Returns a dict (all stop-gradient):

    h:        (B, H + 1, D) agent outputs; index 0 = the last context step, index i = imagined step i;
    actions:  (B, H) actions[:, i] was sampled from the policy at h[:, i] and leads into step i + 1;
    z:        (B, H, L, N) the imagined frames' latents (z[:, i] is step i + 1).

    `sampling` (the world model's: K = sample_steps, tau_ctx = context_tau) is the dynamics sampler's.
    """
    dyn = agent.dynamics
    k_max, tau_ctx = dyn.cfg.k_max, sampling.context_tau
    B, C = actions_BC.shape
    k_ctx, key = jax.random.split(key)
    z, tau, d = context_inputs(z_ctx_BCLN, k_ctx, tau_ctx, k_max)
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

        def step_fn(z_B1LN, tau_B1, d_B1, cache):
            return agent.step(z_B1LN, tau_B1, d_B1, a_B1, ones_B1, task_B1, cache, t)

        z_t, (_, h_B1D), cache = generate_frame(
            step_fn,
            cache,
            k_noise,
            k_c,
            (B, 1, dyn.L, dyn.N),
            sampling.sample_steps,
            k_max,
            tau_ctx,
            z_of=lambda out: out[0],
        )
        return (cache, h_B1D[:, 0]), (h_B1D[:, 0], a_B, z_t[:, 0])

    ts = C + jnp.arange(horizon, dtype=jnp.int32)
    keys = jax.random.split(key, horizon)
    _, (h_HBD, a_HB, z_HBLN) = jax.lax.scan(body, (cache, h_BCD[:, -1]), (ts, keys))
    h = jnp.concatenate([h_BCD[:, -1:], jnp.moveaxis(h_HBD, 0, 1)], axis=1)
    out = {"h": h, "actions": jnp.moveaxis(a_HB, 0, 1), "z": jnp.moveaxis(z_HBLN, 0, 1)}
    return jax.lax.stop_gradient(out)


def imagined_reward_cont(agent: Agent, roll: dict, z_last_BLN, cfg: Config):
    """Rewards r_BH1 (r[:, i] = reward on arriving at step i; r[:, 0], the reward into the real start,
    is 0 or the token head's prediction, and no return reads it) and continuation c_BH1 of the
    rollout's H + 1 states (c[:, 0] = 1, the real start), both stop-gradient.

    reward_source "state": the state heads on consecutive latents (z_last -> z_1 -> ... -> z_H), which
    never read an action token; "token": the agent-token reward head at distance 0; "none": zeros.
    """
    ac = cfg.agent
    B, H = roll["actions"].shape
    z_all = jnp.concatenate([z_last_BLN[:, None], roll["z"]], 1)  # B H+1 L N
    r_state, c_state = agent.state_reward_cont(z_all[:, :-1], z_all[:, 1:])
    if ac.reward_source == "state":
        r = jnp.concatenate([jnp.zeros((B, 1)), r_state], 1)
    elif ac.reward_source == "token":
        r = agent.reward_now(roll["h"])
    else:  # "none": the no-reward control
        r = jnp.zeros((B, H + 1))
    c = jnp.concatenate([jnp.ones((B, 1)), c_state], 1) if ac.continuation else jnp.ones((B, H + 1))
    return jax.lax.stop_gradient(r), jax.lax.stop_gradient(c)

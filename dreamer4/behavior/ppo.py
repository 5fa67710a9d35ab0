"""PPO's pure pieces (Schulman et al. 2017): advantages, the clipped objectives, entropy.

Shape key: T rollout steps, N envs (or any leading batch dims), A actions.

Transition convention inside a rollout (not the dataset's): at step t the policy sees obs_t, takes
action_t, receives reward_t and done_t (the episode ended on this step; the env was reset, so
obs_{t+1} is the next episode's first frame and must not be bootstrapped through).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(rewards_TN, values_TN, dones_TN, last_value_N, gamma: float, lam: float):
    """Generalised advantage estimation, computed backwards in time.

        delta_t = r_t + gamma * (1 - d_t) * V_{t+1} - V_t          (V_T = last_value)
        A_t     = delta_t + gamma * lam * (1 - d_t) * A_{t+1}       (A_T = 0)
        R_t     = A_t + V_t                                          (the value target)

    Returns (advantages_TN, returns_TN).
    """
    not_done_TN = 1.0 - dones_TN.astype(jnp.float32)
    next_values_TN = jnp.concatenate([values_TN[1:], last_value_N[None]], axis=0)
    deltas_TN = rewards_TN + gamma * not_done_TN * next_values_TN - values_TN

    def back(a_next_N, x):
        delta_N, nd_N = x
        a_N = delta_N + gamma * lam * nd_N * a_next_N
        return a_N, a_N

    _, adv_TN = jax.lax.scan(back, jnp.zeros_like(last_value_N), (deltas_TN, not_done_TN), reverse=True)
    return adv_TN, adv_TN + values_TN


def normalize_advantages(adv_N, eps: float = 1e-8):
    """A_hat = (A - mean(A)) / (std(A) + eps), over the minibatch."""
    return (adv_N - adv_N.mean()) / (adv_N.std() + eps)


def clipped_surrogate_loss(logp_new_N, logp_old_N, adv_N, clip_eps: float):
    """The negated clipped surrogate objective, averaged.

        rho_t = exp(log pi(a_t|s_t) - log pi_old(a_t|s_t))
        L     = -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)

    Returns (loss, clip_fraction) where clip_fraction = mean(|rho - 1| > eps).
    """
    ratio_N = jnp.exp(logp_new_N - logp_old_N)
    unclipped = ratio_N * adv_N
    clipped = jnp.clip(ratio_N, 1.0 - clip_eps, 1.0 + clip_eps) * adv_N
    loss = -jnp.mean(jnp.minimum(unclipped, clipped))
    return loss, jnp.mean((jnp.abs(ratio_N - 1.0) > clip_eps).astype(jnp.float32))


def clipped_value_loss(values_N, old_values_N, returns_N, clip_eps: float):
    """Value regression with the value change clipped as the policy's ratio is.

    V_clip = V_old + clip(V - V_old, -eps, eps)
    L_V    = 0.5 * mean max((V - R)^2, (V_clip - R)^2)
    """
    v_clip_N = old_values_N + jnp.clip(values_N - old_values_N, -clip_eps, clip_eps)
    return 0.5 * jnp.mean(jnp.maximum(jnp.square(values_N - returns_N), jnp.square(v_clip_N - returns_N)))


def categorical_log_prob(logits_NA, actions_N):
    """log pi(a) = logits_a - logsumexp(logits)."""
    logp_NA = jax.nn.log_softmax(logits_NA, axis=-1)
    return jnp.take_along_axis(logp_NA, actions_N[..., None].astype(jnp.int32), axis=-1)[..., 0]


def categorical_entropy(logits_NA):
    """H(pi) = -sum_a pi(a) log pi(a), per row."""
    logp_NA = jax.nn.log_softmax(logits_NA, axis=-1)
    return -jnp.sum(jnp.exp(logp_NA) * logp_NA, axis=-1)


def ppo_loss(
    logits_NA,
    values_N,
    actions_N,
    logp_old_N,
    old_values_N,
    adv_N,
    returns_N,
    *,
    clip_eps: float,
    vf_coef: float,
    ent_coef: float,
):
    """L = L_clip(normalised A) + c_v L_V - c_e mean H(pi). Returns (loss, metrics)."""
    logp_N = categorical_log_prob(logits_NA, actions_N)
    pg_loss, clip_frac = clipped_surrogate_loss(logp_N, logp_old_N, normalize_advantages(adv_N), clip_eps)
    v_loss = clipped_value_loss(values_N, old_values_N, returns_N, clip_eps)
    entropy = categorical_entropy(logits_NA).mean()
    loss = pg_loss + vf_coef * v_loss - ent_coef * entropy
    # KL(old || new) estimated from samples of the old policy: mean((rho - 1) - log rho).
    log_ratio = logp_N - logp_old_N
    approx_kl = jnp.mean(jnp.exp(log_ratio) - 1.0 - log_ratio)
    return loss, {
        "pg_loss": pg_loss,
        "value_loss": v_loss,
        "entropy": entropy,
        "clip_frac": clip_frac,
        "approx_kl": approx_kl,
    }

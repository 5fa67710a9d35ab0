"""Pure loss and return functions of the agent stage (Dreamer 4 sec. 3.3).

Shape key: B batch, T time steps, J multi-token-prediction (MTP) distances, A actions, K bins.

Step convention (docs/ARCHITECTURE.md): row t holds frame_t, action_t = the action that led INTO
frame_t, reward_t = the reward received on arriving at frame_t. The agent token at step t has seen
frame_t and action_t, so
  * policy distance n (n = 1..J) predicts action_{t+n}: n = 1 is the action the agent takes next;
  * reward distance n (n = 0..J-1) predicts reward_{t+n}: n = 0 is the reward of the transition
    the agent token has just seen (imagination reads its rewards from it).
`mtp_targets` builds these aligned targets; a target past the end of the window is invalid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dreamer4.nn.distributions import two_hot_nll


def mtp_targets(x_BT, valid_BT, offsets):
    """target_BTJ[b, t, j] = x[b, t + offsets[j]], valid_BTJ = valid[b, t + offsets[j]] and t + offsets[j] < T."""
    T = x_BT.shape[1]
    tgt, val = [], []
    for o in offsets:
        pad = [(0, 0), (0, o)] + [(0, 0)] * (x_BT.ndim - 2)
        tgt.append(jnp.pad(x_BT, pad)[:, o : o + T])
        val.append(jnp.pad(jnp.asarray(valid_BT, bool), [(0, 0), (0, o)])[:, o : o + T])
    return jnp.stack(tgt, 2), jnp.stack(val, 2)


def policy_offsets(J: int) -> tuple[int, ...]:
    return tuple(range(1, J + 1))


def reward_offsets(J: int) -> tuple[int, ...]:
    return tuple(range(0, J))


def _masked_mean(x, m):
    """sum(x m) / sum(m) for a bool mask or float weights m; 0 where m is all zero."""
    m = jnp.asarray(m, jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1e-8)


def bc_mtp_loss(logits_BTJA, actions_BT, action_mask_BT):
    """L_BC = sum_{n=1}^{J} mean_{(b,t) valid} -ln pi_n(action_{t+n} | h_t).

    A pair is valid where action_{t+n} is a labeled action inside the window; each distance is
    averaged over its own valid pairs, so unlabeled video contributes nothing. Returns
    (loss, per-distance losses (J,)).
    """
    J = logits_BTJA.shape[2]
    tgt, valid = mtp_targets(jnp.where(action_mask_BT, actions_BT, 0), action_mask_BT, policy_offsets(J))
    logp = jax.nn.log_softmax(logits_BTJA.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    per = jnp.stack([_masked_mean(nll[:, :, j], valid[:, :, j]) for j in range(J)])
    return jnp.sum(per), per


def reward_mtp_loss(logits_BTJK, rewards_BT, bins_K, valid_BT=None):
    """L_rew = sum_{n=0}^{J-1} mean_{(b,t) valid} -ln p_n(twohot(reward_{t+n}) | h_t). Returns (loss, (J,))."""
    J = logits_BTJK.shape[2]
    valid_BT = jnp.ones(rewards_BT.shape, bool) if valid_BT is None else valid_BT
    tgt, valid = mtp_targets(rewards_BT.astype(jnp.float32), valid_BT, reward_offsets(J))
    nll = two_hot_nll(logits_BTJK.astype(jnp.float32), tgt, bins_K)
    per = jnp.stack([_masked_mean(nll[:, :, j], valid[:, :, j]) for j in range(J)])
    return jnp.sum(per), per


def lambda_returns(rewards_BT, values_BT, cont_BT, gamma: float, lam: float):
    """TD(lambda) returns along an imagined trajectory of states s_0..s_{T-1}, shape (B, T-1).

        R_t = r_{t+1} + gamma c_{t+1} ((1 - lambda) v_{t+1} + lambda R_{t+1}),   R_{T-1} = v_{T-1}

    for t = 0..T-2, where r_{t+1} is the reward on arriving at s_{t+1} (the step convention),
    v_t the value of s_t and c_t = 0 where s_t is terminal (nothing follows it), else 1. This is
    the paper's R^lambda_t = r_t + gamma c_t((1 - lambda) v_t + lambda R^lambda_{t+1}) with its
    reward index shifted to our "reward on arrival" rows.
    """
    r, v, c = (jnp.asarray(x, jnp.float32) for x in (rewards_BT, values_BT, cont_BT))

    def back(R_next, xs):
        r1, v1, c1 = xs
        R = r1 + gamma * c1 * ((1.0 - lam) * v1 + lam * R_next)
        return R, R

    xs = tuple(jnp.moveaxis(a[:, 1:], 1, 0) for a in (r, v, c))
    _, R_TB = jax.lax.scan(back, v[:, -1], xs, reverse=True)
    return jnp.moveaxis(R_TB, 0, 1)


def value_loss(logits_BTK, returns_BT, bins_K, mask_BT=None):
    """L_V = sum_{b,t} w_bt -ln p_theta(twohot(sg(R^lambda_t)) | s_t) / sum w: TD learning of the value
    head; mask_BT (bool or float weights w, default 1) e.g. the probability that s_t is alive."""
    nll = two_hot_nll(logits_BTK, jax.lax.stop_gradient(returns_BT), bins_K)
    return _masked_mean(nll, jnp.ones(nll.shape, bool) if mask_BT is None else mask_BT)


def alive_weights(cont_BT):
    """w_t = prod_{j=1}^{t} c_j (w_0 = 1): the probability that imagined state t is reached alive, with
    c_j the predicted probability that state j continues the episode (c_0, the start, is ignored).
    States after a predicted death then barely count in the value and policy losses."""
    c = jnp.asarray(cont_BT, jnp.float32)
    return jnp.cumprod(c.at[:, 0].set(1.0), axis=1)


def expected_return(rewards_BT, cont_BT):
    """The undiscounted return of an imagined trajectory s_0..s_{T-1}, weighted by survival:

        G = sum_{i=1}^{T-1} w_{i-1} r_i,   w_i = prod_{j=1}^{i} c_j (alive_weights; w_0 = 1),

    with r_i the reward on arriving at s_i. The reward of a step into a death (c_i ~ 0) still
    counts, weighted by P(s_{i-1} alive), as in the real game and in lambda_returns: G is the
    gamma = lambda = 1, v = 0 case of R_0 = r_1 + c_1 (r_2 + c_2 (...)). Shape (B,).
    """
    r = jnp.asarray(rewards_BT, jnp.float32)
    return jnp.sum(r[:, 1:] * alive_weights(cont_BT)[:, :-1], axis=1)


def state_heads_loss(reward_logits_BTK, cont_logit_BT, rewards_BT, is_terminal_BT, valid_BT, bins_K):
    """Reward and continuation of the transition into step t from (z_{t-1}, z_t):

        L_r = mean_valid -ln p(twohot(reward_t)),
        L_c = mean_valid BCE(sigmoid(c_t), 1 - is_terminal_t) = mean_valid softplus(-c_t) (1-y) + softplus(c_t) y
              with y = is_terminal_t (frame t is a death).

    valid_BT excludes rows without a previous frame in the window (t = 0) or in the episode.
    Returns (L_r, L_c, continuation accuracy on terminal rows, on the rest).
    """
    nll = two_hot_nll(reward_logits_BTK.astype(jnp.float32), jnp.asarray(rewards_BT, jnp.float32), bins_K)
    y = jnp.asarray(is_terminal_BT, jnp.float32)
    c = cont_logit_BT.astype(jnp.float32)
    bce = jax.nn.softplus(-c) * (1.0 - y) + jax.nn.softplus(c) * y
    pred_dead = c < 0
    term = valid_BT & (y > 0)
    rest = valid_BT & (y == 0)
    return (
        _masked_mean(nll, valid_BT),
        _masked_mean(bce, valid_BT),
        _masked_mean(pred_dead, term),
        _masked_mean(~pred_dead, rest),
    )


def advantages(returns_BT, values_BT, weights_BT=None, center: bool = True):
    """A_t = R_t - v_t, minus its (weighted) batch mean when `center`: PMPO only reads sign(A), so a
    value that lags its returns by a common offset (all A > 0) would otherwise carry no information."""
    adv = jnp.asarray(returns_BT, jnp.float32) - jnp.asarray(values_BT, jnp.float32)
    if not center:
        return adv
    w = jnp.ones(adv.shape) if weights_BT is None else jnp.asarray(weights_BT, jnp.float32)
    return adv - jnp.sum(adv * w) / jnp.maximum(jnp.sum(w), 1e-8)


def reverse_kl(logits_NA, prior_logits_NA):
    """KL[pi_theta || pi_prior] = sum_a pi_theta(a) (ln pi_theta(a) - ln pi_prior(a)), per row (N,)."""
    logp = jax.nn.log_softmax(logits_NA.astype(jnp.float32), -1)
    logq = jax.nn.log_softmax(jax.lax.stop_gradient(prior_logits_NA).astype(jnp.float32), -1)
    return jnp.sum(jnp.exp(logp) * (logp - logq), -1)


def pmpo_loss(logp_N, adv_N, kl_N, alpha: float = 0.5, beta: float = 0.3, mask_N=None):
    """PMPO policy loss (Abdolmaleki et al. 2024; Dreamer 4 eq. 11) over N = B x T imagined states.

        L = (1 - alpha)/|D-| sum_{i in D-} ln pi(a_i|s_i) - alpha/|D+| sum_{i in D+} ln pi(a_i|s_i)
            + beta/N sum_i KL[pi(.|s_i) || pi_prior(.|s_i)]

    D+ = {i : A_i >= 0}, D- = {i : A_i < 0}: only the sign of the advantage is used. An empty set
    contributes 0. mask_N may be float weights w_i (e.g. alive probabilities): then every sum and
    count above is weighted by w_i. Returns (loss, metrics).
    """
    m = jnp.ones(logp_N.shape, jnp.float32) if mask_N is None else jnp.asarray(mask_N, jnp.float32)
    adv = jax.lax.stop_gradient(adv_N)
    pos, neg = m * (adv >= 0), m * (adv < 0)
    neg_term = (1.0 - alpha) * _masked_mean(logp_N, neg)
    pos_term = -alpha * _masked_mean(logp_N, pos)
    kl_term = beta * _masked_mean(kl_N, m)
    metrics = {"pmpo_pos_frac": _masked_mean((adv >= 0).astype(jnp.float32), m), "pmpo_kl": _masked_mean(kl_N, m)}
    return neg_term + pos_term + kl_term, metrics

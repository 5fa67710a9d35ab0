"""Agent stage pieces: two-hot, lambda-returns, PMPO, KL, MTP alignment, agent-token attention masks."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dreamer4.config import AgentNet
from dreamer4.nn import symexp, symlog, symlog_bins, two_hot, two_hot_mean, two_hot_nll
from dreamer4.policy import losses as Lo
from dreamer4.policy.heads import Agent, agent_visibility, freeze_prior


# ----------------------------------------------------------------------------- distributions
def test_symlog_symexp_values():
    np.testing.assert_allclose(symlog(jnp.array([0.0, math.e - 1, -(math.e**2 - 1)])), [0, 1, -2], atol=1e-6)
    x = jnp.array([-1000.0, -3.5, 0.0, 0.2, 77.0])
    np.testing.assert_allclose(symexp(symlog(x)), x, rtol=1e-5)


def test_two_hot_hand_values():
    bins = jnp.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    x = jnp.array([math.exp(0.25) - 1, -(math.exp(1.5) - 1), 1e6, -1e6, math.e - 1])
    expect = np.array([[0, 0, 0.75, 0.25, 0], [0.5, 0.5, 0, 0, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 1, 0]])
    np.testing.assert_allclose(two_hot(x, bins), expect, atol=1e-5)
    # the head reading two-hot probabilities back gives the value (inside the bin range)
    logits = jnp.log(jnp.asarray(expect[:2]) + 1e-30)
    np.testing.assert_allclose(two_hot_mean(logits, bins), x[:2], rtol=1e-4)
    # cross-entropy: uniform logits over 5 bins cost ln 5 whatever the target
    np.testing.assert_allclose(two_hot_nll(jnp.zeros((2, 5)), x[:2], bins), [math.log(5)] * 2, rtol=1e-6)


def test_symlog_bins():
    b = symlog_bins(5, 20.0)
    np.testing.assert_allclose(b, [-20, -10, 0, 10, 20])


# ----------------------------------------------------------------------------- returns and losses
def test_lambda_returns_hand_values():
    r = jnp.array([[9.0, 1.0, 2.0]])  # r_0 (reward into s_0) is never used
    v = jnp.array([[0.5, 1.0, 3.0]])
    c = jnp.ones((1, 3))
    # R_2 = v_2 = 3; R_1 = 2 + .5 (.5 * 3 + .5 * 3) = 3.5; R_0 = 1 + .5 (.5 * 1 + .5 * 3.5) = 2.125
    np.testing.assert_allclose(Lo.lambda_returns(r, v, c, 0.5, 0.5), [[2.125, 3.5]], rtol=1e-6)
    # s_2 terminal: nothing after r_2; R_1 = 2, R_0 = 1 + .5 (.5 + .5 * 2) = 1.75
    np.testing.assert_allclose(Lo.lambda_returns(r, v, c.at[0, 2].set(0.0), 0.5, 0.5), [[1.75, 2.0]], rtol=1e-6)
    # lambda = 1, gamma = 1: Monte Carlo sum plus the bootstrap: 1 + 2 + 3 = 6; lambda = 0: 1 + .5 * 1
    np.testing.assert_allclose(Lo.lambda_returns(r, v, c, 1.0, 1.0)[0, 0], 6.0)
    np.testing.assert_allclose(Lo.lambda_returns(r, v, c, 0.5, 0.0)[0, 0], 1.5)


def test_lambda_returns_matches_numpy_loop():
    rng = np.random.default_rng(0)
    r, v = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    c = (rng.random((3, 7)) > 0.2).astype(np.float64)
    g, lam = 0.997, 0.95
    R = np.zeros((3, 6))
    for b in range(3):
        nxt = v[b, -1]
        for t in range(5, -1, -1):
            nxt = r[b, t + 1] + g * c[b, t + 1] * ((1 - lam) * v[b, t + 1] + lam * nxt)
            R[b, t] = nxt
    np.testing.assert_allclose(Lo.lambda_returns(r, v, c, g, lam), R, rtol=1e-5, atol=1e-5)


def test_value_loss_is_two_hot_ce_without_gradient_to_target():
    bins = symlog_bins(5, 2.0)  # [-2, -1, 0, 1, 2]
    R = jnp.array([[math.exp(0.5) - 1]])  # symlog 0.5: half on bin 0, half on bin 1
    logits = jnp.log(jnp.array([[[0.1, 0.1, 0.4, 0.2, 0.2]]]))
    expect = -(0.5 * math.log(0.4) + 0.5 * math.log(0.2))
    np.testing.assert_allclose(Lo.value_loss(logits, R, bins), expect, rtol=1e-5)
    g = jax.grad(lambda R_: Lo.value_loss(logits, R_, bins))(R)
    assert float(jnp.abs(g).max()) == 0.0


def test_reverse_kl_hand_value_and_direction():
    p = jnp.log(jnp.array([[0.5, 0.5]]))
    q = jnp.log(jnp.array([[0.25, 0.75]]))
    expect = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL[p || q] = 0.1438
    np.testing.assert_allclose(Lo.reverse_kl(p, q), [expect], rtol=1e-5)
    forward = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.1308: the other direction
    assert abs(expect - forward) > 0.01
    # no gradient into the prior
    g = jax.grad(lambda q_: Lo.reverse_kl(p, q_).sum())(q)
    assert float(jnp.abs(g).max()) == 0.0


def test_pmpo_hand_value_and_gradient_signs():
    logp = jnp.array([-1.0, -2.0, -0.5, -3.0])
    adv = jnp.array([1.0, -1.0, 0.0, -2.0])  # A = 0 counts as positive
    kl = jnp.array([0.1, 0.2, 0.3, 0.4])
    # D+ = {0, 2}: -.5 * mean(-1, -.5) = .375;  D- = {1, 3}: .5 * mean(-2, -3) = -1.25;  .3 * .25 = .075
    loss, m = Lo.pmpo_loss(logp, adv, kl, 0.5, 0.3)
    np.testing.assert_allclose(loss, 0.375 - 1.25 + 0.075, rtol=1e-6)
    np.testing.assert_allclose(m["pmpo_pos_frac"], 0.5)
    g = jax.grad(lambda lp: Lo.pmpo_loss(lp, adv, kl, 0.5, 0.3)[0])(logp)
    np.testing.assert_allclose(g, [-0.25, 0.25, -0.25, 0.25])  # raise D+ likelihoods, lower D-
    # the advantage's magnitude is ignored
    np.testing.assert_allclose(Lo.pmpo_loss(logp, adv * 100, kl)[0], loss, rtol=1e-6)
    # all positive: the negative set is empty and contributes 0
    np.testing.assert_allclose(Lo.pmpo_loss(logp, jnp.ones(4), kl * 0, 0.5, 0.3)[0], -0.5 * -1.625, rtol=1e-6)


# ----------------------------------------------------------------------------- MTP alignment
def test_mtp_targets_follow_the_step_convention():
    x = jnp.array([[10, 11, 12, 13]])
    valid = jnp.array([[False, True, True, True]])  # row 0 (is_first) has no action
    tgt, ok = Lo.mtp_targets(x, valid, Lo.policy_offsets(2))
    # agent token at step t predicts action_{t+1} (distance 1) and action_{t+2} (distance 2)
    np.testing.assert_array_equal(tgt[0, :, 0], [11, 12, 13, 0])
    np.testing.assert_array_equal(tgt[0, :, 1], [12, 13, 0, 0])
    np.testing.assert_array_equal(ok[0], [[True, True], [True, True], [True, False], [False, False]])
    # rewards: distance 0 is reward_t (received on arriving at frame_t), distance 1 reward_{t+1}
    tgt, ok = Lo.mtp_targets(x, jnp.ones_like(valid), Lo.reward_offsets(2))
    np.testing.assert_array_equal(tgt[0], [[10, 11], [11, 12], [12, 13], [13, 0]])
    np.testing.assert_array_equal(ok[0, :, 1], [True, True, True, False])


def test_bc_mtp_loss_hand_values():
    logits = jnp.zeros((1, 3, 2, 2)).at[0, 0, 0].set(jnp.array([math.log(3.0), 0.0]))  # p = (.75, .25)
    actions = jnp.array([[-1, 0, 1]])
    mask = jnp.array([[False, True, True]])
    loss, per = Lo.bc_mtp_loss(logits, actions, mask)
    # distance 1: t=0 -> a_1 = 0 (-ln .75), t=1 -> a_2 = 1 (ln 2); distance 2: t=0 -> a_2 = 1 (ln 2)
    np.testing.assert_allclose(per, [(-math.log(0.75) + math.log(2)) / 2, math.log(2)], rtol=1e-5)
    np.testing.assert_allclose(loss, per.sum(), rtol=1e-6)
    # unlabeled targets contribute nothing (a distance without valid pairs costs 0)
    _, per = Lo.bc_mtp_loss(logits, actions, jnp.zeros_like(mask))
    np.testing.assert_array_equal(per, [0.0, 0.0])


def test_reward_mtp_loss_aligns_distance_zero_with_reward_t():
    bins = symlog_bins(5, 2.0)
    rewards = jnp.array([[0.0, math.e - 1, 0.0]])  # symlog 1 -> bin 3
    # distance 0 at t=1 puts all mass on bin 3: zero loss there only if aligned with reward_1
    big = jnp.full((5,), -30.0)
    logits = jnp.zeros((1, 3, 1, 5))
    logits = logits.at[0, :, 0].set(jnp.stack([big.at[2].set(30.0), big.at[3].set(30.0), big.at[2].set(30.0)]))
    loss, _ = Lo.reward_mtp_loss(logits, rewards, bins)
    assert float(loss) < 1e-6
    shifted, _ = Lo.reward_mtp_loss(jnp.roll(logits, 1, axis=1), rewards, bins)
    assert float(shifted) > 10.0


# ----------------------------------------------------------------------------- agent tokens
class _World(nnx.Module):
    def __init__(self, dyn):
        self.dynamics = dyn


@pytest.fixture(scope="module")
def agent():
    from test_dynamics import A, L, N, dyn_config

    from dreamer4.dynamics.model import Dynamics

    dyn = Dynamics(dyn_config().dynamics.net, L, N, A, rngs=nnx.Rngs(0))
    return Agent(_World(dyn), AgentNet(num_tasks=2, mtp=3, head_hidden=16, num_bins=11), A, rngs=nnx.Rngs(1))


def test_agent_visibility():
    vis = agent_visibility(3)
    assert vis[3].all()  # the agent token reads every token of its step
    assert not vis[:3, 3].any() and vis[:3, :3].all()  # nothing reads the agent token


def test_agent_tokens_leave_the_world_model_unchanged(agent):
    from test_dynamics import _inputs
    from test_dynamics import jit_call as fwd  # one compilation for every agent pass below

    z, tau, d, acts, mask = _inputs(4)
    task0 = jnp.zeros(acts.shape, jnp.int32)
    z_hat, h0 = fwd(agent, z, tau, d, acts, mask, task0)
    np.testing.assert_allclose(z_hat, fwd(agent.dynamics, z, tau, d, acts, mask), atol=1e-5)
    z_hat1, h1 = fwd(agent, z, tau, d, acts, mask, jnp.ones_like(task0))
    np.testing.assert_array_equal(z_hat, z_hat1)  # the task never reaches the world model
    assert not np.allclose(h0, h1, atol=1e-4)  # but it does reach the agent token
    # the agent token reads past agent tokens (time layers): a task change at step 0 alone moves h_2
    _, h2 = fwd(agent, z, tau, d, acts, mask, task0.at[:, 0].set(1))
    assert not np.allclose(h2[:, 2], h0[:, 2], atol=1e-5)
    # ... and never the future: steps <= 1 are unchanged by a change at step 2
    _, h3 = fwd(agent, z, tau, d, acts, mask, task0.at[:, 2].set(1))
    np.testing.assert_allclose(h3[:, :2], h0[:, :2], atol=1e-6)
    # the agent token reads the frame: changing z_1 moves h_1
    _, h4 = fwd(agent, z.at[:, 1].add(1.0), tau, d, acts, mask, task0)
    assert not np.allclose(h4[:, 1], h0[:, 1], atol=1e-4)

    # no gradient flows from the world model's prediction into the task embedding
    g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(z, tau, d, acts, mask, task0)[0] ** 2)))(agent)
    assert float(jnp.abs(g.task_embed.embedding[...]).max()) == 0.0


def test_agent_kv_cache_equals_full_pass(agent):
    from test_dynamics import T, _inputs, jit_call, jit_step

    z, tau, d, acts, mask = _inputs(5)
    task = jnp.zeros(acts.shape, jnp.int32)
    z_full, h_full = jit_call(agent, z, tau, d, acts, mask, task)
    prefill = nnx.jit(lambda m, *a: m.prefill(*a, T))
    (z_pre, h_pre), cache = prefill(agent, z[:, :2], tau[:, :2], d[:, :2], acts[:, :2], mask[:, :2], task[:, :2])
    np.testing.assert_allclose(h_pre, h_full[:, :2], atol=2e-5)
    for t in range(2, T):
        s = slice(t, t + 1)
        (z_t, h_t), cache = jit_step(
            agent, z[:, s], tau[:, s], d[:, s], acts[:, s], mask[:, s], task[:, s], cache, jnp.int32(t)
        )
        np.testing.assert_allclose(h_t[:, 0], h_full[:, t], atol=2e-5)
        np.testing.assert_allclose(z_t[:, 0], z_full[:, t], atol=2e-5)


def test_heads_shapes_and_prior_copy(agent):
    h = jax.random.normal(jax.random.PRNGKey(0), (2, 5, agent.dynamics.cfg.width))
    assert agent.policy(h).shape == (2, 5, 3, agent.A)
    assert agent.reward(h).shape == (2, 5, 3, 11) and agent.value(h).shape == (2, 5, 1, 11)
    np.testing.assert_allclose(agent.reward_now(h), 0.0, atol=1e-5)  # zero-initialised outputs
    assert not np.allclose(agent.policy_logits(h), agent.policy_logits(h, prior=True))
    freeze_prior(agent)
    np.testing.assert_array_equal(agent.policy_logits(h), agent.policy_logits(h, prior=True))


def test_crafter_score_geometric_mean():
    from dreamer4.policy.evaluate import crafter_score

    # exp(mean(ln(1 + s))) - 1: rates 0% and 100% -> sqrt(1 * 101) - 1
    np.testing.assert_allclose(crafter_score([0.0, 100.0]), math.sqrt(101) - 1, rtol=1e-9)
    np.testing.assert_allclose(crafter_score([5.0] * 22), 5.0, rtol=1e-9)
    assert crafter_score([0.0] * 22) == 0.0


# ----------------------------------------------------------------------------- issue 13: critic, continuation, state heads
def test_alive_weights_hand_values():
    # c_0 is the real start (ignored); w_t = c_1 ... c_t
    w = Lo.alive_weights(jnp.array([[0.3, 0.9, 0.5, 1.0]]))
    np.testing.assert_allclose(w, [[1.0, 0.9, 0.45, 0.45]], rtol=1e-6)


def test_expected_return_counts_the_reward_into_a_death_and_nothing_after():
    # a death at state 2 (c_2 = 0) whose arrival reward is -1 (Craftax's health penalty): the real
    # game counts it, so the imagined return must too: 1 + (-1) = 0, and state 3's 100 never counts
    r = jnp.array([[0.0, 1.0, -1.0, 100.0], [5.0, 1.0, 2.0, 4.0]])
    c = jnp.array([[1.0, 1.0, 0.0, 1.0], [0.3, 0.5, 0.5, 1.0]])
    # row 2: w = [1, 0.5, 0.25, 0.25] -> 1 * 1 + 0.5 * 2 + 0.25 * 4 = 3 (r_0 and c_0 ignored)
    np.testing.assert_allclose(Lo.expected_return(r, c), [0.0, 3.0], rtol=1e-6)
    # = lambda_returns' R_0 at gamma = lambda = 1 with zero values
    R = Lo.lambda_returns(r, jnp.zeros_like(r), c, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(R[:, 0], [0.0, 3.0], rtol=1e-6)


def test_lambda_returns_stop_at_an_imagined_death():
    # death at state 2 (c_2 = 0): R_1 = r_2 only, nothing after the death leaks back
    r = jnp.array([[0.0, 1.0, 2.0, 100.0]])
    v = jnp.array([[0.0, 10.0, 10.0, 10.0]])
    c = jnp.array([[1.0, 1.0, 0.0, 1.0]])
    R = Lo.lambda_returns(r, v, c, gamma=0.5, lam=0.5)
    # R_1 = r_2 + 0 = 2; R_0 = r_1 + 0.5 * 1 * (0.5 * 10 + 0.5 * 2) = 1 + 3 = 4
    np.testing.assert_allclose(R[0, :2], [4.0, 2.0], rtol=1e-6)


def test_advantages_centering_removes_a_common_critic_lag():
    R = jnp.array([[3.0, 4.0], [5.0, 6.0]])
    v = R - jnp.array([[1.0, 1.2], [0.8, 1.0]])  # every R - v > 0: the value lags by ~1 everywhere
    raw = Lo.advantages(R, v, center=False)
    assert bool((raw > 0).all())
    np.testing.assert_allclose(Lo.advantages(R, v), [[0.0, 0.2], [-0.2, 0.0]], atol=1e-6)
    # weighted centring: weights (1, 1, 0, 0) -> mean of the first row (1.1)
    w = jnp.array([[1.0, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(Lo.advantages(R, v, w), [[-0.1, 0.1], [-0.3, -0.1]], atol=1e-6)


def test_pmpo_with_float_weights_hand_value():
    logp = jnp.array([-1.0, -2.0, -3.0])
    adv = jnp.array([1.0, -1.0, 1.0])
    w = jnp.array([1.0, 0.5, 0.25])
    loss, m = Lo.pmpo_loss(logp, adv, jnp.zeros(3), alpha=0.5, beta=0.0, mask_N=w)
    # D+ = {0, 2} weights 1, 0.25: mean logp = (-1 - 0.75) / 1.25 = -1.4; D- = {1}: -2
    np.testing.assert_allclose(loss, 0.5 * -2.0 - 0.5 * -1.4, rtol=1e-6)
    np.testing.assert_allclose(m["pmpo_pos_frac"], 1.25 / 1.75, rtol=1e-6)


def test_state_heads_loss_hand_values():
    bins = symlog_bins(5)
    # continuation logit 0 -> BCE ln 2 whatever the label; rows marked invalid do not count
    c = jnp.array([[0.0, 0.0, 50.0]])
    term = jnp.array([[True, False, True]])
    valid = jnp.array([[True, True, False]])
    logits = jnp.zeros((1, 3, 5))
    L_r, L_c, acc_dead, acc_alive = Lo.state_heads_loss(logits, c, jnp.zeros((1, 3)), term, valid, bins)
    np.testing.assert_allclose(L_c, math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(L_r, math.log(5.0), rtol=1e-6)  # uniform over 5 bins
    # logit -3 on a terminal row: softplus(-3) = 0.04859 ; +3 on an alive row: the same
    c2 = jnp.array([[-3.0, 3.0, 0.0]])
    _, L_c2, acc_dead, acc_alive = Lo.state_heads_loss(logits, c2, jnp.zeros((1, 3)), term, valid, bins)
    np.testing.assert_allclose(L_c2, math.log1p(math.exp(-3.0)), rtol=1e-5)
    assert float(acc_dead) == 1.0 and float(acc_alive) == 1.0


def test_state_reward_ignores_the_same_step_action_token_reward_does_not(agent):
    """Frames fixed, only the actions changed: the state heads' reward and continuation are unchanged
    (they never read an action), while the agent token (and the paper's token reward) moves."""
    from test_dynamics import _inputs

    from dreamer4.config import Config
    from dreamer4.policy.imagine import imagined_reward_cont

    agent = nnx.clone(agent)  # the module fixture is shared: perturb a copy
    z, tau, d, acts, mask = _inputs(6)
    task = jnp.zeros(acts.shape, jnp.int32)
    other = (acts + 1) % agent.A
    m = jnp.ones_like(mask)
    # give the zero-initialised reward outputs random weights
    for layer in (agent.reward.out, agent.state_heads.reward):
        st = nnx.state(layer)
        leaves, tree = jax.tree.flatten(st)
        keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
        noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
        nnx.update(layer, jax.tree.unflatten(tree, noisy))
    _, h1 = agent(z, tau, d, acts, m, task)
    _, h2 = agent(z, tau, d, other, m, task)
    assert not np.allclose(h1, h2, atol=1e-4)
    roll1 = {"h": h1, "actions": acts[:, 1:], "z": z[:, 1:]}
    roll2 = {"h": h2, "actions": other[:, 1:], "z": z[:, 1:]}
    for source, same in (("state", True), ("token", False)):
        cfg = dataclasses.replace(Config(), agent=dataclasses.replace(Config().agent, reward_source=source))
        r1, c1 = imagined_reward_cont(agent, roll1, z[:, 0], cfg)
        r2, c2 = imagined_reward_cont(agent, roll2, z[:, 0], cfg)
        np.testing.assert_array_equal(c1, c2)
        assert np.array_equal(r1, r2) == same, source
    # ... and the state reward does read the frames (same source, other latents)
    r_state, _ = imagined_reward_cont(agent, roll1, z[:, 0], Config())
    r3, _ = imagined_reward_cont(agent, {**roll1, "z": z[:, 1:] + 1.0}, z[:, 0], Config())
    assert Config().agent.reward_source == "state" and not np.allclose(r_state[:, 1:], r3[:, 1:])


def test_mean_ci_student_t_hand_value():
    from dreamer4.policy.evaluate import mean_ci

    # mean 2.5, s = sqrt(5/3) = 1.290994, t_{0.975,3} = 3.182446 -> half 2.054261
    c = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert c["n"] == 4 and c["mean"] == 2.5
    np.testing.assert_allclose(c["ci95"], [2.5 - 2.054261, 2.5 + 2.054261], rtol=1e-5)
    assert np.isnan(mean_ci([1.0])["ci95"][0])

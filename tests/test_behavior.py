"""PPO behaviour policy: loss pieces against hand-worked values, a short CPU training that beats
uniform random on the same seeds, resume after a stop, and collection with PPO / mixtures."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_test_config

from dreamer4.behavior import ppo
from dreamer4.behavior.model import push_frame
from dreamer4.config import ConfigError
from dreamer4.data.behavior import assign_envs, parse_mix

# ---------------------------------------------------------------------------------------------
# Pure pieces, each against numbers worked out by hand (in the comments).


def test_gae_hand_worked():
    # gamma = lam = 0.5. Env 0: r = [1, 0, 2], V = [0.5, 1, 0], done after step 1, V_last = 4.
    #   delta_2 = 2 + 0.5*4 - 0 = 4                 A_2 = 4
    #   delta_1 = 0 + 0 (done) - 1 = -1            A_1 = -1 (no bootstrap through the end)
    #   delta_0 = 1 + 0.5*1 - 0.5 = 1              A_0 = 1 + 0.25*(-1) = 0.75
    # Env 1: r = 0, V = 0, no done, V_last = 8: A_2 = 4, A_1 = 0.25*4 = 1, A_0 = 0.25.
    rewards = jnp.array([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    values = jnp.array([[0.5, 0.0], [1.0, 0.0], [0.0, 0.0]])
    dones = jnp.array([[False, False], [True, False], [False, False]])
    adv, ret = ppo.gae(rewards, values, dones, jnp.array([4.0, 8.0]), 0.5, 0.5)
    np.testing.assert_allclose(adv, [[0.75, 0.25], [-1.0, 1.0], [4.0, 4.0]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[1.25, 0.25], [0.0, 1.0], [4.0, 4.0]], rtol=1e-6)


def test_gae_lambda_one_is_discounted_return_minus_value():
    # lam = 1, no dones: A_t = sum_k gamma^k r_{t+k} + gamma^(T-t) V_last - V_t (plain numpy loop).
    rng = np.random.default_rng(0)
    r, v = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    last, g = rng.normal(size=3), 0.9
    want = np.zeros((5, 3))
    for t in range(5):
        want[t] = sum(g**k * r[t + k] for k in range(5 - t)) + g ** (5 - t) * last - v[t]
    adv, _ = ppo.gae(jnp.asarray(r), jnp.asarray(v), jnp.zeros((5, 3), bool), jnp.asarray(last), g, 1.0)
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-5)


def test_clipped_surrogate_hand_worked():
    # eps = 0.2; ratios 1.5, 0.5, 1.1 with advantages 2, -1, 3:
    #   min(1.5*2, 1.2*2) = 2.4;  min(0.5*-1, 0.8*-1) = -0.8;  min(1.1*3, 1.1*3) = 3.3
    #   loss = -(2.4 - 0.8 + 3.3) / 3 = -1.63333;  clipped share = 2/3
    old = jnp.array([-1.0, -2.0, -0.5])
    new = old + jnp.log(jnp.array([1.5, 0.5, 1.1]))
    loss, frac = ppo.clipped_surrogate_loss(new, old, jnp.array([2.0, -1.0, 3.0]), 0.2)
    assert float(loss) == pytest.approx(-4.9 / 3, rel=1e-5)
    assert float(frac) == pytest.approx(2 / 3)


def test_clipped_value_loss_hand_worked():
    # V = [1, 3], V_old = [0, 2.9], R = [2, 2], eps = 0.2:
    #   env 0: (1-2)^2 = 1, V_clip = 0.2 -> (0.2-2)^2 = 3.24, max 3.24
    #   env 1: (3-2)^2 = 1, V_clip = 3.0 -> 1, max 1;  loss = 0.5 * (3.24 + 1) / 2 = 1.06
    loss = ppo.clipped_value_loss(jnp.array([1.0, 3.0]), jnp.array([0.0, 2.9]), jnp.array([2.0, 2.0]), 0.2)
    assert float(loss) == pytest.approx(1.06, rel=1e-5)


def test_entropy_and_log_prob_hand_worked():
    # uniform over 4: ln 4; probs (1/4, 3/4): -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351
    h = ppo.categorical_entropy(jnp.array([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9]]))
    np.testing.assert_allclose(h, [math.log(4.0), 0.5623351], rtol=1e-5)
    lp = ppo.categorical_log_prob(jnp.array([[0.0, math.log(3.0)]]), jnp.array([1]))
    assert float(lp[0]) == pytest.approx(math.log(0.75), rel=1e-6)


def test_advantage_normalisation():
    a = ppo.normalize_advantages(jnp.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(a, np.array([-1.0, 0.0, 1.0]) / np.sqrt(2.0 / 3.0), rtol=1e-5)


def test_push_frame_stack_order_and_reset():
    f = lambda v: jnp.full((2, 1, 1, 3), v, jnp.uint8)  # noqa: E731
    s = push_frame(jnp.zeros((2, 1, 1, 6), jnp.uint8), f(5), jnp.array([True, True]))
    assert s[0, 0, 0].tolist() == [5] * 6  # a new episode fills the stack with its first frame
    s = push_frame(s, f(7), jnp.array([False, True]))
    assert s[0, 0, 0].tolist() == [5, 5, 5, 7, 7, 7]  # oldest first, newest last
    assert s[1, 0, 0].tolist() == [7] * 6


def test_walk_policy_moves_about_sixty_percent_of_the_time():
    """walk: a move w.p. 1/2, else uniform over 17 actions -> P(move) = 1/2 + 1/2 * 4/17 = 0.6176,
    each move 0.6176 / 4 = 0.154, every other action 1/2 * 1/17 = 0.0294."""
    import jax

    from dreamer4.data.behavior import MOVE_ACTIONS
    from dreamer4.data.policies import make_policy

    pol = make_policy("walk", type("Spec", (), {"num_actions": 17})(), None)
    frames = jnp.zeros((20000, 1, 1, 1), jnp.uint8)
    a, _ = pol.act(pol.init(20000), jax.random.PRNGKey(0), frames, jnp.zeros(20000, bool))
    freq = np.bincount(np.asarray(a), minlength=17) / a.shape[0]
    assert np.isin(np.asarray(a), MOVE_ACTIONS).mean() == pytest.approx(0.5 + 0.5 * 4 / 17, abs=0.01)
    np.testing.assert_allclose(freq[list(MOVE_ACTIONS)], (0.5 + 0.5 * 4 / 17) / 4, atol=0.01)
    np.testing.assert_allclose(np.delete(freq, MOVE_ACTIONS), 0.5 / 17, atol=0.006)


def test_mix_parsing_and_env_assignment():
    assert parse_mix("ppo:runs/a=b=3,random=1") == [("ppo:runs/a=b", 0.75), ("random", 0.25)]
    for bad in ("random", "random=x", "random=-1", "random=0", "random=1,random=2"):
        with pytest.raises(ConfigError, match="collect.mix"):
            parse_mix(bad)
    a = assign_envs([0.25, 0.75], 16, seed=3, writer=0)
    assert sorted(a).count(0) == 4 and a.count(1) == 12  # counts exactly weight * N
    assert a == assign_envs([0.25, 0.75], 16, seed=3, writer=0)  # deterministic from the seed
    assert a != assign_envs([0.25, 0.75], 16, seed=4, writer=0)  # and placed by it
    assert assign_envs([1 / 3, 2 / 3], 4, 0, 0).count(0) in (1, 2)


# ---------------------------------------------------------------------------------------------
# A short online training on CPU (one per session), then collection with it.

# The tiny preset's PPO (16 envs x 32 steps, 32 updates = 16k env steps), evaluated on 64 worlds.
BEHAVIOR_OVERRIDES = ["runtime.wandb=disabled", "behavior.eval_envs=64"]


def test_update_returns_the_runner_types_init_gives():
    """PPO's jitted update compiles once: the runner it returns has the shapes, dtypes and weak types
    of the one init builds. (A reset Craftax state holds weak-typed arrays and a stepped one does
    not: before init made them strong, the second update compiled the whole update again.)"""
    import jax

    from dreamer4.behavior.train import PPO
    from dreamer4.data.env import make_env

    cfg = make_test_config(BEHAVIOR_OVERRIDES)
    env, params, spec = make_env(cfg.env.name)
    fns = PPO(cfg, env, params, spec)
    key = jax.random.PRNGKey(0)
    reset = jax.eval_shape(lambda k: fns.reset_v(jax.random.split(k, 2), params)[1], key)
    assert any(x.weak_type for x in jax.tree.leaves(reset))  # what init has to undo

    def types(tree):
        return [(x.shape, x.dtype, x.weak_type) for x in jax.tree.leaves(tree)]

    runner = jax.eval_shape(fns.init, key)
    out, _ = jax.eval_shape(fns._update, runner)
    assert jax.tree.structure(out) == jax.tree.structure(runner) and types(out) == types(runner)


@pytest.fixture(scope="module")
def trained_ppo(tmp_path_factory):
    """(run dir, the Preempted of the first call, final result, log): a SIGUSR1 at update 12 stops
    the first call (PPO's host loop checkpoints update 12 and raises), the second resumes to 32."""
    import signal

    from dreamer4.behavior import train as behavior_train
    from dreamer4.runtime import preempt
    from dreamer4.runtime.host_loop import HostLoop

    class SignalAt12(HostLoop):
        def record(self, step, metrics):
            if step == 12:
                signal.raise_signal(signal.SIGUSR1)  # as `scancel --signal=USR1` would
            super().record(step, metrics)

    run = tmp_path_factory.mktemp("ppo") / "run"
    cfg = make_test_config(BEHAVIOR_OVERRIDES)
    logs = []
    with pytest.MonkeyPatch.context() as mp, preempt.handling():
        mp.setattr(behavior_train, "HostLoop", SignalAt12)
        with pytest.raises(preempt.Preempted) as first:
            behavior_train.train_behavior(cfg, run, log=logs.append)
    with preempt.handling():
        final = behavior_train.train_behavior(cfg, run, log=logs.append)
    return run, first.value, final, logs


@pytest.mark.slow
def test_ppo_trains_resumes_and_beats_random(trained_ppo):
    from dreamer4.runtime.logging import read_metrics

    run, first, final, logs = trained_ppo
    assert (first.step, first.signal_name) == (12, "SIGUSR1")  # 12: a log step, not a checkpoint step
    assert any("resumed from update 12" in line for line in logs)
    assert final["update"] == 32 and final["env_steps"] == 32 * 16 * 32 and final["complete"]
    steps = [m["step"] for m in read_metrics(run / "behavior") if "loss" in m]
    assert steps == [4 * i for i in range(1, 9)]  # the resumed run continues the log, no update counted twice
    ckpts = sorted(int(p.name) for p in (run / "behavior" / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == [12, 16, 32]  # the signal's checkpoint, then the regular ones
    ev = json.loads((run / "behavior" / "eval.json").read_text())
    # Same seeded worlds, first 128 steps: the trained policy collects more reward and achievements.
    assert ev["eval_policy_return"] > ev["eval_random_return"] + 0.1, ev
    assert ev["eval_policy_achievements"] > ev["eval_random_achievements"], ev


def test_ppo_checkpoint_spec_resolution(trained_ppo, tmp_path):
    from dreamer4.behavior.policy import resolve_checkpoint

    run = trained_ppo[0]
    ck = run / "behavior" / "checkpoints"
    assert resolve_checkpoint(run) == (ck, 32)
    assert resolve_checkpoint(run / "behavior") == (ck, 32)
    assert resolve_checkpoint(ck / "16") == (ck, 16)
    with pytest.raises(ConfigError, match="no PPO checkpoint found at .*nowhere"):
        resolve_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="step directory .* does not exist"):
        resolve_checkpoint(ck / "999")


@pytest.mark.slow
def test_collect_with_ppo_mixture_and_epsilon(trained_ppo, tmp_path):
    from dreamer4.data.collect import collect
    from dreamer4.data.store import read_manifest

    run = trained_ppo[0]
    early = f"ppo:{run}/behavior/checkpoints/16"
    mix = f"{early}=0.5,random=0.5"
    cfg = make_test_config(
        ["collect.policy=random", f"collect.mix={json.dumps(mix)}", "collect.epsilon=0.1", "collect.num_episodes=6"]
    )
    root = tmp_path / "ds"
    collect(cfg, root, log=lambda *a: None)
    m = read_manifest(root)
    assert m["behavior_policy"] == mix and m["epsilon"] == 0.1
    assert m["behavior_mixture"] == [{"policy": early, "weight": 0.5}, {"policy": "random", "weight": 0.5}]
    eps = [e for s in m["shards"] for e in s["episodes"]]
    assert len(eps) == 6 and {e["policy"] for e in eps} == {early, "random"}

    with pytest.raises(ConfigError, match="no PPO checkpoint found"):
        collect(make_test_config(["collect.policy=ppo:/nonexistent/run"]), tmp_path / "ds2", log=lambda *a: None)

"""Agent stage end to end on the session dataset: BC + reward, imagination RL, freezing, evaluation."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOK_OVERRIDES, make_test_config
from flax import nnx
from test_dynamics import DYN_OVERRIDES

from dreamer4.runtime.logging import read_metrics

AGENT_OVERRIDES = [
    "agent.mtp=3",
    "agent.head_hidden=16",
    "agent.num_bins=21",
    "agent.context_len=2",
    "agent.horizon=3",
    "agent.bc.steps=6",
    "agent.bc.batch_size=4",
    "agent.bc.seq_len=6",
    "agent.bc.lr=3e-3",
    "agent.bc.warmup_steps=1",
    "agent.bc.log_every=2",
    "agent.bc.ckpt_every=6",
    "agent.imagine.steps=4",
    "agent.imagine.batch_size=4",
    "agent.imagine.lr=3e-3",
    "agent.imagine.warmup_steps=1",
    "agent.imagine.log_every=2",
    "agent.imagine.ckpt_every=4",
    "agent.critic_warmup=2",
    "agent.eval_episodes=4",
    "agent.eval_envs=4",
    "agent.eval_max_steps=10",
    "agent.eval_imagine=2",
]


def agent_config(extra=()):
    return make_test_config(TOK_OVERRIDES + DYN_OVERRIDES + AGENT_OVERRIDES + list(extra))


# world_run and trained_agent (the run these tests train) are session fixtures in conftest.py:
# tests/test_play.py plays the same run.


def _leaves(module):
    return jax.tree.leaves(nnx.state(module))


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b)))


def test_bc_and_imagine_train_and_log(trained_agent):
    bc = [r for r in read_metrics(trained_agent / "agent_bc") if "loss" in r]
    assert [r["step"] for r in bc] == [2, 4, 6]
    for k in ("video", "bc", "bc_next", "reward", "reward_now"):
        assert all(np.isfinite(r[k]) for r in bc), k
    assert bc[0]["bc"] > 0 and bc[0]["action_label_frac"] > 0  # the labeled half of the dataset
    im = [r for r in read_metrics(trained_agent / "agent") if "loss" in r]
    assert [r["step"] for r in im] == [2, 4]
    for k in ("policy", "value", "pmpo_kl", "pmpo_pos_frac", "entropy", "imagined_reward_sum", "raw_adv_pos_frac"):
        assert all(np.isfinite(r[k]) for r in im), k
    # critic warm-up: updates 1-2 train the value only, the policy joins from update 3
    assert [r["policy_on"] for r in im] == [0.0, 1.0]
    for k in ("state_reward", "state_cont", "cont_acc_alive"):
        assert all(np.isfinite(r[k]) for r in bc), k


def test_freezing_per_phase(trained_agent):
    from dreamer4.policy.train import STAGE_BC
    from dreamer4.runtime.loading import load_agent, load_world_model

    world, _, _ = load_world_model(trained_agent)
    bc, _, _ = load_agent(trained_agent, STAGE_BC)
    im, _, _ = load_agent(trained_agent)
    # phase bc: the tokenizer is frozen, the dynamics transformer trains with the heads
    assert _same(bc.world.tokenizer, world.tokenizer)
    assert not _same(bc.world.dynamics, world.dynamics)
    # phase imagine: the whole world model, the reward head and the task embedding do not change
    assert _same(im.world, bc.world)
    assert _same(im.reward, bc.reward) and _same(im.task_embed, bc.task_embed)
    # the prior is the frozen BC policy; the policy and value heads moved away from it
    assert _same(im.prior, bc.policy)
    assert not _same(im.policy, bc.policy) and not _same(im.value, bc.value)


def test_imagination_rollout_shapes(trained_agent, dataset):
    from dreamer4.data.loader import make_loader
    from dreamer4.policy.imagine import imagine_rollout
    from dreamer4.runtime.loading import load_agent

    agent, wcfg, info = load_agent(trained_agent)
    batch = next(iter(make_loader(dataset[0], agent_config(), "train", batch_size=2, seq_len=2)))
    # compiled, as training runs them (eagerly, every op would compile on its own)
    z = nnx.jit(lambda m, f: m.world.latents(f))(agent, jnp.asarray(batch["frames"]))
    sampling = dataclasses.replace(wcfg.dynamics.sampling, sample_steps=2)
    roll = nnx.jit(lambda m, *a: imagine_rollout(m, *a, horizon=3, sampling=sampling))(
        agent,
        z,
        jnp.asarray(batch["actions"]),
        jnp.asarray(batch["action_mask"]),
        jnp.zeros((2,), jnp.int32),
        jax.random.PRNGKey(0),
    )
    D, L, N = agent.dynamics.cfg.width, agent.dynamics.L, agent.dynamics.N
    assert roll["h"].shape == (2, 4, D) and roll["z"].shape == (2, 3, L, N) and roll["actions"].shape == (2, 3)
    assert roll["actions"].dtype == jnp.int32 and int(roll["actions"].min()) >= 0
    assert int(roll["actions"].max()) < info["num_actions"]
    assert all(bool(jnp.all(jnp.isfinite(roll[k]))) for k in ("h", "z"))

    # the critic warm-up switch: with policy_on = 0 the policy head gets no gradient, the value does
    from dreamer4.policy.imagine import imagined_reward_cont
    from dreamer4.policy.train import imagine_terms

    cfg = agent_config()
    r, c = nnx.jit(lambda m, roll, z: imagined_reward_cont(m, roll, z, cfg))(agent, roll, z[:, -1])
    assert r.shape == c.shape == (2, 4) and float(c[:, 0].min()) == 1.0 and bool(((c >= 0) & (c <= 1)).all())
    grad = nnx.jit(nnx.grad(lambda m, on: imagine_terms(m, roll, r, c, on, cfg)[0]))  # `on` traced: one compilation
    for on in (0.0, 1.0):
        g = grad(agent, jnp.float32(on))
        pol = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(nnx.state(g.policy)))
        val = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(nnx.state(g.value)))
        assert (pol > 0) == bool(on) and val > 0


def test_imagine_resumes(trained_agent, dataset):
    from dreamer4.policy.train import train_agent

    train_agent(agent_config(["agent.imagine.steps=6"]), dataset[0], trained_agent, phase="imagine")
    steps = [r["step"] for r in read_metrics(trained_agent / "agent") if "loss" in r]
    assert steps == [2, 4, 6]  # continued from 4, not restarted


def test_cli_errors_name_the_missing_stage(dataset, tmp_path, capsys):
    from dreamer4.cli import main

    rc = main(["train-agent", "--data", str(dataset[0]), "--run", str(tmp_path / "none")])
    assert rc == 2 and "holds no trained dynamics" in capsys.readouterr().err
    rc = main(["evaluate", "--run", str(tmp_path / "none")])
    assert rc == 2 and "holds no trained agent" in capsys.readouterr().err


def test_bc_refuses_a_dataset_without_labeled_episodes(world_run, dataset, tmp_path):
    """collect.labeled_fraction=0: the BC loss would be 0 at every step, the prior left untrained."""
    import json
    import shutil

    from dreamer4.data.store import DatasetError
    from dreamer4.policy.train import train_bc

    data = tmp_path / "ds"
    shutil.copytree(dataset[0], data)
    m = json.loads((data / "manifest.json").read_text())
    assert not (data / "manifest.log").exists()  # a finished dataset is one manifest.json
    for shard in m["shards"]:
        for ep in shard["episodes"]:
            ep["labeled"] = False
    m["labeled_fraction"] = 0.0
    (data / "manifest.json").write_text(json.dumps(m))
    run = tmp_path / "run"
    for stage in ("tokenizer", "dynamics"):
        shutil.copytree(world_run / stage, run / stage)
    with pytest.raises(DatasetError, match=r"no labeled 'train' episode .*labeled_fraction was 0.0\)"):
        train_bc(agent_config(), data, run)
    assert not (run / "agent_bc" / "checkpoints").exists()


@pytest.mark.slow
def test_evaluate_real_episodes_and_report(trained_agent):
    from dreamer4.pipelines.report import write_report
    from dreamer4.policy.evaluate import crafter_score, evaluate

    res = evaluate(trained_agent, episodes=3)
    P = res["policies"]
    assert set(P) == {"bc", "imagine", "random", "dataset"}
    for name in ("bc", "imagine", "random"):
        p = P[name]
        assert p["episodes"] == 3 and 1 <= p["length_mean"] <= 10  # capped at agent.eval_max_steps
        assert len(p["achievements"]) == 22  # every Craftax-Classic achievement is reported
        np.testing.assert_allclose(p["crafter_score"], crafter_score(list(p["achievements"].values())))
        np.testing.assert_allclose(p["reward_pct_of_max"], 100 * p["return_mean"] / 22)
    assert P["dataset"]["episodes"] == 8
    for name in ("bc", "imagine", "random"):
        lo, hi = P[name]["return_ci95"]
        assert lo <= P[name]["return_mean"] <= hi
    # paired differences: same starting worlds, so n = episodes; the mean is the difference of means
    c = res["comparisons"]["imagine_minus_bc"]
    assert c["n"] == 3
    np.testing.assert_allclose(c["mean"], P["imagine"]["return_mean"] - P["bc"]["return_mean"], atol=1e-5)
    im = res["imagination"]  # from the imagination policy's own real starts
    assert im["rollouts"] == 2 and np.isfinite(im["imagined_return_mean"]) and np.isfinite(im["real_return_mean"])
    out = trained_agent / "evaluate"
    table = (out / "table.md").read_text()
    assert "| metric | bc | imagine | random | dataset |" in table and "collect_wood" in table
    for f in ("results.json", "achievements.png", "real_bc.gif", "real_imagine.gif", "imagined_0.gif"):
        assert (out / f).exists(), f
    page = write_report(trained_agent).read_text()
    assert "Agent in the real game" in page and "evaluate/achievements.png" in page
    assert "agent/curves.png" in page and (trained_agent / "agent" / "curves.png").exists()
    assert "paired over the same starting worlds" in page


@pytest.mark.slow
def test_one_player_acts_as_the_agent_or_as_random(trained_agent):
    """evaluate's single player: with use_random it draws exactly random_act's actions (so the
    paired random baseline is unchanged) and leaves the caches alone, without it the agent acts
    and writes its caches; one compilation for both."""
    from dreamer4.policy.evaluate import agent_or_random_act, random_act
    from dreamer4.runtime.loading import load_agent

    agent, wcfg, facts = load_agent(trained_agent, "agent")
    graphdef, weights = nnx.split(agent)
    N, A = 4, facts["num_actions"]
    init, act = agent_or_random_act(graphdef, 8, wcfg.dynamics.context_tau, A)
    pstate = init((weights, jnp.asarray(False)), N)
    frame = jax.random.randint(jax.random.PRNGKey(1), (N, *facts["frame_shape"]), 0, 256).astype(jnp.uint8)
    prev, key = jnp.zeros((N,), jnp.int32), jax.random.PRNGKey(7)
    act_j = jax.jit(act)
    a_rand, p_rand = act_j((weights, jnp.asarray(True)), pstate, key, frame, prev, jnp.int32(0))
    np.testing.assert_array_equal(a_rand, random_act(A)[1](None, pstate, key, frame, prev, 0)[0])
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(p_rand))  # the empty caches, untouched
    a_agent, p_agent = act_j((weights, jnp.asarray(False)), pstate, key, frame, prev, jnp.int32(0))
    assert np.asarray(a_agent).min() >= 0 and np.asarray(a_agent).max() < A
    assert all(np.asarray(x).any() for x in jax.tree.leaves(p_agent))  # step 0 written into every cache
    assert act_j._cache_size() == 1


CHROMIUM = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium on this machine (.ci/run installs it)")
def test_report_renders_in_headless_chromium(trained_agent, tmp_path):
    """The report loads in a real browser: every image and GIF it links decodes, tables are laid out."""
    import re
    import subprocess

    from dreamer4.pipelines.report import write_report

    page = write_report(trained_agent).read_text()
    # A copy of the page next to it (same relative links) that records, once loaded, how many
    # images it has and how many failed to decode.
    probe = trained_agent / "_probe.html"
    probe.write_text(
        page.replace(
            "</body>",
            """<script>window.addEventListener('load', () => {
      const imgs = [...document.images];
      document.body.setAttribute('data-images', imgs.length);
      document.body.setAttribute('data-broken', imgs.filter(i => !i.complete || i.naturalWidth === 0).length);
      document.body.setAttribute('data-tables', document.querySelectorAll('table tr').length);
    });</script></body>""",
        )
    )
    try:
        r = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=10000",
                "--dump-dom",
                probe.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        probe.unlink()
    m = re.search(r'<body data-images="(\d+)" data-broken="(\d+)" data-tables="(\d+)"', r.stdout)
    assert m, (r.returncode, r.stdout[:500], r.stderr[-2000:])
    images, broken, rows = map(int, m.groups())
    n_linked = len(re.findall(r"<img src=", page))
    assert images == n_linked >= 5 and broken == 0  # grid, achievements chart, real and imagined GIFs
    assert rows > 10

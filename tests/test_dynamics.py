"""Dynamics: block-causal mask, KV cache, action masking, sampler, training and resume."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOK_OVERRIDES, make_test_config
from flax import nnx

from dreamer4.config import ConfigError
from dreamer4.dynamics.model import Dynamics, d_index, tau_index
from dreamer4.dynamics.sampler import rollout
from dreamer4.runtime.logging import read_metrics

DYN_OVERRIDES = [
    "dynamics.width=32",
    "dynamics.depth=2",
    "dynamics.num_heads=2",
    "dynamics.num_kv_heads=1",
    "dynamics.time_every=2",
    "dynamics.spatial_tokens=2",
    "dynamics.register_tokens=2",
    "dynamics.k_max=8",
    "dynamics.sample_steps=4",
    "dynamics.eval_context=2",
    "dynamics.eval_horizon=2",
    "dynamics.eval_episodes=2",
    "dynamics.train.batch_size=4",
    "dynamics.train.seq_len=4",
    "dynamics.train.lr=3e-3",
    "dynamics.train.warmup_steps=2",
    "dynamics.train.log_every=2",
    "dynamics.train.ckpt_every=4",
    "dynamics.train.eval_every=0",
]
L, N, A, B, T = 4, 8, 17, 2, 5


def dyn_config(extra=()):
    return make_test_config(TOK_OVERRIDES + DYN_OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def dyn():
    return Dynamics(dyn_config().dynamics.net, L, N, A, rngs=nnx.Rngs(0))


# A model's full pass and its KV-cached step, compiled (t traced), as the sampler and imagination
# run them: eagerly, every op would compile on its own. Shared with tests/test_policy.py.
jit_call = nnx.jit(lambda m, *a: m(*a))
jit_step = nnx.jit(lambda m, *a: m.step(*a))


def _inputs(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    z = jax.random.normal(k[0], (B, T, L, N))
    tau = jax.random.randint(k[1], (B, T), 0, 8) / 8.0
    d = jnp.full((B, T), 1 / 8)
    acts = jax.random.randint(k[2], (B, T), 0, A)
    mask = jnp.ones((B, T), bool)
    return z, tau, d, acts, mask


def test_discrete_indices():
    np.testing.assert_array_equal(tau_index(jnp.array([0.0, 0.1, 0.5, 0.875, 1.0]), 8), [0, 1, 4, 7, 8])
    np.testing.assert_array_equal(d_index(jnp.array([1.0, 0.5, 0.25, 0.125, 1 / 64]), 8), [0, 1, 2, 3, 3])


@pytest.mark.parametrize("t", [0, 2])
def test_block_causal_all_tokens(dyn, t):
    z, tau, d, acts, mask = _inputs()
    y = dyn.transformer(dyn.tokens(z, tau, d, acts, mask))
    # change everything about step t+1: latents, signal level, step size and action
    z2 = z.at[:, t + 1].add(1.0)
    tau2 = tau.at[:, t + 1].set(0.0)
    d2 = d.at[:, t + 1].set(1.0)
    acts2 = acts.at[:, t + 1].set((acts[:, t + 1] + 1) % A)
    y2 = dyn.transformer(dyn.tokens(z2, tau2, d2, acts2, mask))
    assert y.shape == (B, T, dyn.num_tokens, 32)
    # every token of steps <= t, including the action token (0), the signal token (1) and registers
    np.testing.assert_allclose(y[:, : t + 1], y2[:, : t + 1], atol=1e-5)
    assert not np.allclose(y[:, t + 1], y2[:, t + 1], atol=1e-4)
    assert not np.allclose(y[:, T - 1], y2[:, T - 1], atol=1e-4)


def test_kv_cache_equals_full_forward(dyn):
    z, tau, d, acts, mask = _inputs(1)
    full = dyn(z, tau, d, acts, mask)
    cache = dyn.init_cache(B, T)
    for t in range(T):
        out, cache = jit_step(
            dyn, z[:, t : t + 1], tau[:, t : t + 1], d[:, t : t + 1], acts[:, t : t + 1], mask[:, t : t + 1], cache, t
        )
        np.testing.assert_allclose(out[:, 0], full[:, t], atol=2e-5)


def test_unlabeled_actions_never_reach_the_embedding(dyn):
    z, tau, d, acts, _ = _inputs(2)
    none = jnp.zeros((B, T), bool)
    out1 = dyn(z, tau, d, acts, none)
    out2 = dyn(z, tau, d, (acts + 5) % A, none)
    np.testing.assert_array_equal(out1, out2)
    # and with labels the actions matter (so the check above can fail)
    assert not np.allclose(dyn(z, tau, d, acts, ~none), dyn(z, tau, d, (acts + 5) % A, ~none), atol=1e-5)

    def loss(m):
        return jnp.sum(m(z, tau, d, acts, none) ** 2)

    grads = nnx.grad(loss)(dyn)
    assert float(jnp.abs(grads.action_embed.embedding[...]).max()) == 0.0
    assert float(jnp.abs(grads.action_base[...]).max()) > 0.0


@pytest.mark.parametrize("K", [1, 2, 4, 8])
def test_sampler_shapes_for_every_k(dyn, K):
    z, _, _, acts, mask = _inputs(3)
    out = rollout(dyn, z[:, :2], acts, mask, jax.random.PRNGKey(0), K, horizon=3, context_tau=0.9)
    assert out.shape == (B, 3, L, N) and bool(jnp.all(jnp.isfinite(out)))
    with pytest.raises(ValueError):
        rollout(dyn, z[:, :2], acts, mask, jax.random.PRNGKey(0), 3, horizon=1, context_tau=0.9)


@pytest.fixture(scope="module")
def trained_dynamics(dataset, trained_tokenizer):
    from dreamer4.dynamics.train import train_dynamics

    root, _ = dataset
    run, _ = trained_tokenizer
    results = train_dynamics(dyn_config(["dynamics.train.steps=16"]), root, run)
    return run, results


def test_training_reduces_loss_and_evaluates(trained_dynamics):
    run, results = trained_dynamics
    m = [r for r in read_metrics(run / "dynamics") if "loss" in r]
    losses = [r["loss"] for r in m]
    assert len(losses) == 8
    assert np.mean(losses[-3:]) < np.mean(losses[:2]), losses
    for k in ("eval_psnr_K1", "eval_psnr_K4", "eval_psnr_true_actions", "eval_action_gap_db"):
        assert np.isfinite(results[k]), k
    assert list((run / "dynamics" / "videos").glob("dream_*.gif"))


def test_resume_keeps_tokenizer_frozen(trained_dynamics, dataset):
    from dreamer4.dynamics.train import train_dynamics
    from dreamer4.runtime.loading import load_tokenizer, load_world_model

    run, _ = trained_dynamics
    root, _ = dataset
    before, _, _ = load_world_model(run)
    train_dynamics(dyn_config(["dynamics.train.steps=20"]), root, run, evaluate=False)
    steps = [r["step"] for r in read_metrics(run / "dynamics") if "loss" in r]
    assert max(steps) == 20 and steps.count(16) == 1  # continued from 16, not restarted
    after, _, _ = load_world_model(run)
    tok, _, _ = load_tokenizer(run)
    for a, b in zip(jax.tree.leaves(nnx.state(after.tokenizer)), jax.tree.leaves(nnx.state(tok))):
        np.testing.assert_array_equal(a, b)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(nnx.state(after.dynamics)), jax.tree.leaves(nnx.state(before.dynamics)))
    ]
    assert any(changed)


def test_dream_writes_table_plot_and_videos(trained_dynamics):
    from dreamer4.dynamics.evaluate import dream

    run, _ = trained_dynamics
    metrics = dream(run)
    out = run / "dream"
    assert (out / "table.md").exists() and (out / "psnr_vs_horizon.png").exists()
    assert list(out.glob("real_vs_imagined_*.gif"))
    res = json.loads((out / "results.json").read_text())
    assert sorted(int(k) for k in res["curves"] if k.isdigit()) == [1, 2, 4, 8]
    assert np.isfinite(metrics["eval_psnr_none_actions"])
    # the copy-last-frame baselines and CIs sit beside every open-loop figure
    for name in ("eval_psnr_copy_last", "eval_psnr_copy_last_tokenized", "eval_psnr_K4"):
        assert metrics[f"{name}_lo"] <= metrics[name] <= metrics[f"{name}_hi"]
    # the grounding probe ran on held-out transitions, with its chance level stated
    g = res["grounding"]
    assert g["n_transitions"] > 0 and g["identification_movement"]["chance"] == 0.2
    im = g["identification_movement"]
    assert im["n"] == g["n_movement_changed"] > 0  # the test data has moves with a view change
    assert metrics["grounding_identification_movement"] == pytest.approx(im["accuracy"])
    assert im["ci95"][0] <= im["accuracy"] <= im["ci95"][1]
    assert metrics["grounding_identification_movement_lo"] == pytest.approx(im["ci95"][0])
    # decoded pixels against copying, paired: the difference of means is the mean difference
    pm = {k: g[f"pixel_mse_{k}"]["mean"] for k in ("generated", "copy_last_frame", "generated_minus_copy")}
    assert pm["generated_minus_copy"] == pytest.approx(pm["generated"] - pm["copy_last_frame"], rel=1e-4, abs=1e-7)
    assert g["psnr_of_mean_mse_copy_last_frame"] == pytest.approx(-10 * np.log10(pm["copy_last_frame"]), rel=1e-4)
    assert metrics["grounding_pixel_mse_minus_copy"] == pytest.approx(pm["generated_minus_copy"])
    table = (out / "table.md").read_text()
    assert "copy last frame" in table and "movement identification" in table


def test_bad_spatial_tokens(dataset, trained_tokenizer, tmp_path):
    import shutil

    from dreamer4.dynamics.train import train_dynamics

    root, _ = dataset
    run = tmp_path / "run"
    shutil.copytree(trained_tokenizer[0] / "tokenizer", run / "tokenizer")
    with pytest.raises(ConfigError, match=r"'dynamics.spatial_tokens' \(3\) must divide .* \(4\)"):
        train_dynamics(dyn_config(["dynamics.spatial_tokens=3"]), root, run)


def assert_cached_steps_equal_full_pass(m, z, tau, d, acts, mask):
    """Step-by-step generation with the KV cache gives the full pass's outputs (both compiled);
    returns the full pass."""
    full = jit_call(m, z, tau, d, acts, mask)
    cache, steps = m.init_cache(B, T), []
    for t in range(T):
        s = slice(t, t + 1)
        y, cache = jit_step(m, z[:, s], tau[:, s], d[:, s], acts[:, s], mask[:, s], cache, jnp.int32(t))
        steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)
    return full


def test_space_rope_positions_and_cached_steps():
    """dynamics.space_rope: the spatial tokens' (row, column // group) on the tokenizer's patch
    grid, the other tokens at (0, 0); frame-by-frame with the KV cache equals the full pass; and
    a tokenizer without a grid (or a grouping that splits rows unevenly) is refused by key."""
    from dreamer4.dynamics.model import space_positions

    extra = [
        "dynamics.space_rope=true",
        "dynamics.spatial_tokens=6",
        "tokenizer.num_latents=12",
        "tokenizer.latent_layout=patch",
    ]
    net = dyn_config(extra).dynamics.net
    # a 2 x 6 grid of 12 latents, 6 tokens of 2 latents: token z = latents 2z, 2z+1
    pos = space_positions(net, 12, (2, 6))
    assert pos.tolist() == [[0, 0]] * 4 + [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    m = Dynamics(net, 12, N, A, latent_grid=(2, 6), rngs=nnx.Rngs(0))
    z = jax.random.normal(jax.random.PRNGKey(1), (B, T, 12, N))
    _, tau, d, acts, mask = _inputs()
    full = assert_cached_steps_equal_full_pass(m, z, tau, d, acts, mask)
    # the rotation is really applied: moving the grid changes the output
    m2 = Dynamics(net, 12, N, A, latent_grid=(3, 4), rngs=nnx.Rngs(0))
    assert not np.allclose(jit_call(m2, z, tau, d, acts, mask), full, atol=1e-4)
    with pytest.raises(ValueError, match="dynamics.space_rope.*latent_layout=patch"):
        Dynamics(net, 12, N, A, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"dynamics.spatial_tokens' \(6\).*4x3"):
        space_positions(net, 12, (4, 3))


def test_time_neighbourhood_table_and_cached_steps():
    """dynamics.time_neighbourhood: each spatial token's 3 x 3 grid neighbours (hand-worked on a
    2 x 3 token grid), the other tokens only themselves; the KV-cached steps equal the full pass;
    without a grid it is refused by key."""
    from dreamer4.dynamics.model import time_neighbour_table

    extra = ["dynamics.time_neighbourhood=1", "dynamics.spatial_tokens=6", "tokenizer.num_latents=12"]
    net = dyn_config(extra + ["tokenizer.latent_layout=patch"]).dynamics.net
    table = time_neighbour_table(net, 12, (2, 6), 1)  # tokens of 2 latents: a 2 x 3 token grid
    f = 2 + net.register_tokens  # first spatial token
    assert table.shape == (f + 6, 9)
    for s in range(f):  # action, signal and register tokens: themselves, in the middle slot
        assert table[s].tolist() == [-1] * 4 + [s] + [-1] * 4
    # slots: (-1,-1) (-1,0) (-1,1) (0,-1) (0,0) (0,1) (1,-1) (1,0) (1,1)
    assert table[f + 0].tolist() == [-1, -1, -1, -1, f, f + 1, -1, f + 3, f + 4]  # top left
    assert table[f + 4].tolist() == [f, f + 1, f + 2, f + 3, f + 4, f + 5, -1, -1, -1]  # bottom middle
    m = Dynamics(net, 12, N, A, latent_grid=(2, 6), rngs=nnx.Rngs(0))
    for blk in m.transformer.blocks:  # a trained-like selector, so its bias takes part
        if blk.kind == "time":
            blk.select.kernel[...] = 0.3 * jax.random.normal(jax.random.PRNGKey(5), blk.select.kernel.shape)
    z = jax.random.normal(jax.random.PRNGKey(1), (B, T, 12, N))
    _, tau, d, acts, mask = _inputs()
    assert_cached_steps_equal_full_pass(m, z, tau, d, acts, mask)
    with pytest.raises(ValueError, match="dynamics.time_neighbourhood.*latent_layout=patch"):
        Dynamics(net, 12, N, A, rngs=nnx.Rngs(0))


def test_action_broadcast_adds_the_labeled_action_to_every_spatial_token():
    """dynamics.action_broadcast: spatial token inputs = the off case's + emb(action_t) where
    labeled; unlabeled steps are bit-identical to the off case (nothing reaches the table)."""
    on = Dynamics(dyn_config(["dynamics.action_broadcast=true"]).dynamics.net, L, N, A, rngs=nnx.Rngs(0))
    off = Dynamics(dyn_config().dynamics.net, L, N, A, rngs=nnx.Rngs(0))  # same init, same weights
    z, tau, d, acts, mask = _inputs(4)
    mask = mask.at[:, 1].set(False)
    t_on, t_off = on.tokens(z, tau, d, acts, mask), off.tokens(z, tau, d, acts, mask)
    first = 2 + on.R  # spatial tokens start here
    np.testing.assert_array_equal(t_on[:, :, :first], t_off[:, :, :first])
    emb = on.action_embed.embedding[...][acts] * mask[..., None]
    np.testing.assert_allclose(t_on[:, :, first:], t_off[:, :, first:] + emb[:, :, None], atol=1e-6)
    np.testing.assert_array_equal(t_on[:, 1], t_off[:, 1])  # the unlabeled step
    grads = nnx.grad(lambda m: jnp.sum(m(z, tau, d, acts, jnp.zeros_like(mask)) ** 2))(on)
    assert float(jnp.abs(grads.action_embed.embedding[...]).max()) == 0.0

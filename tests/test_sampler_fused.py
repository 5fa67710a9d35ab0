"""The fused per-frame sampler (`generate_step`: K steps in a fori_loop, donated KV cache) computes
what the unrolled K-step loop computed, and holds no host round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOK_OVERRIDES, make_test_config
from flax import nnx
from test_dynamics import DYN_OVERRIDES  # the same small network as the dynamics tests

from dreamer4.dynamics.model import Dynamics
from dreamer4.dynamics.sampler import context_inputs, generate_step, prefill_context
from dreamer4.dynamics.shortcut import denoise_frame

L, N, A, B = 4, 8, 17, 2
TAU_CTX = 0.9


@pytest.fixture(scope="module")
def dyn():
    return Dynamics(make_test_config(TOK_OVERRIDES + DYN_OVERRIDES).dynamics.net, L, N, A, rngs=nnx.Rngs(0))


@nnx.jit(static_argnames=("K",))
def _unrolled_step(dyn, cache, t, action_B1, mask_B1, key, K):
    """The sampler as it was before the fori_loop: K predict calls unrolled in Python."""
    k_noise, k_ctx = jax.random.split(key)
    state = {"cache": cache}

    def predict(z, tau, d):
        tau_B1 = jnp.full((B, 1), tau, jnp.float32)
        d_B1 = jnp.full((B, 1), d, jnp.float32)
        z1, state["cache"] = dyn.step(z, tau_B1, d_B1, action_B1, mask_B1, state["cache"], t)
        return z1

    z_t = denoise_frame(predict, k_noise, (B, 1, L, N), K, dyn.cfg.k_max)
    zc, tau, d = context_inputs(z_t, k_ctx, TAU_CTX, dyn.cfg.k_max)
    _, cache = dyn.step(zc, tau, d, action_B1, mask_B1, state["cache"], t)
    return z_t, cache


def _context(dyn, seed):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    z = jax.random.normal(k[0], (B, 2, L, N))
    acts = jax.random.randint(k[1], (B, 4), 0, A)
    mask = jnp.ones((B, 4), bool)
    return prefill_context(dyn, z, acts[:, :2], mask[:, :2], k[2], max_len=4, context_tau=TAU_CTX), acts, mask


@pytest.mark.parametrize("K", [1, 4, 8])
def test_fused_step_equals_unrolled(dyn, K):
    cache, acts, mask = _context(dyn, K)
    ref_cache = jax.tree.map(jnp.copy, cache)
    key = jax.random.PRNGKey(11)
    for t in (2, 3):
        a, m = acts[:, t : t + 1], mask[:, t : t + 1]
        z_ref, ref_cache = _unrolled_step(dyn, ref_cache, jnp.int32(t), a, m, jax.random.fold_in(key, t), K=K)
        before = cache
        z, cache = generate_step(dyn, cache, jnp.int32(t), a, m, jax.random.fold_in(key, t), K=K, context_tau=TAU_CTX)
        np.testing.assert_allclose(np.asarray(z), np.asarray(z_ref), rtol=1e-5, atol=1e-5)
        for x, y in zip(jax.tree.leaves(cache), jax.tree.leaves(ref_cache)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
        # the cache was donated: its buffers now live on in the returned cache
        assert all(x.is_deleted() for x in jax.tree.leaves(before))


def test_generate_step_has_no_host_transfer(dyn):
    cache, acts, mask = _context(dyn, 0)
    t, key = jax.device_put(jnp.int32(2)), jax.random.PRNGKey(0)
    a, m = acts[:, 2:3], mask[:, 2:3]
    generate_step(
        dyn, jax.tree.map(jnp.copy, cache), t, a, m, key, K=4, context_tau=TAU_CTX
    )  # compile outside the guard
    with jax.transfer_guard("disallow"):
        z, cache = generate_step(dyn, cache, t, a, m, key, K=4, context_tau=TAU_CTX)
        z.block_until_ready()


def test_generate_step_walks_the_module_graph_once(dyn, monkeypatch):
    """generate_step is a module_jit function: nnx.split runs at a module's first call only, and
    in-place weight updates (nnx.update, loading a checkpoint) are still read by the next call."""
    from dreamer4.nn import module_jit as mj

    calls = []
    split = mj.nnx.split
    monkeypatch.setattr(mj.nnx, "split", lambda *a: calls.append(1) or split(*a))
    d2 = Dynamics(make_test_config(TOK_OVERRIDES + DYN_OVERRIDES).dynamics.net, L, N, A, rngs=nnx.Rngs(1))
    cache, acts, mask = _context(d2, 0)
    t, key = jnp.int32(2), jax.random.PRNGKey(0)
    a, m = acts[:, 2:3], mask[:, 2:3]
    outs = []
    for _ in range(3):
        z, _ = generate_step(d2, jax.tree.map(jnp.copy, cache), t, a, m, key, K=2, context_tau=TAU_CTX)
        outs.append(np.asarray(z))
    assert len(calls) == 1 and np.array_equal(outs[0], outs[2])
    # new weights in place (the same Variable objects): the next call sees them, without a new split
    nnx.update(d2, jax.tree.map(lambda x: x * 1.5, nnx.state(d2, nnx.Param)))
    z_new, _ = generate_step(d2, jax.tree.map(jnp.copy, cache), t, a, m, key, K=2, context_tau=TAU_CTX)
    assert len(calls) == 1
    ref = nnx.jit(generate_step.fn, static_argnames=("K", "context_tau"))
    z_ref, _ = ref(d2, jax.tree.map(jnp.copy, cache), t, a, m, key, K=2, context_tau=TAU_CTX)
    np.testing.assert_allclose(np.asarray(z_new), np.asarray(z_ref), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(z_new), outs[0])

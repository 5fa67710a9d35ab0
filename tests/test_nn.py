"""Shared nn blocks: norms, soft-cap, RoPE, GQA attention vs a numpy reference, masks, the axial
transformer's causality and space visibility, KV-cache stepping == full pass, bf16 compute, remat."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dreamer4.nn import (
    Attention,
    AxialTransformer,
    RMSNorm,
    SwiGLU,
    apply_rope,
    apply_rope_2d,
    cached_time_mask,
    causal_time_mask,
    dot_product_attention,
    layer_kinds,
    rms_norm,
    rope_frequencies,
    soft_cap,
    space_mask,
)
from dreamer4.nn import attention as attention_module
from dreamer4.nn import fused_attention as fused_module
from dreamer4.nn.layers import broadcast_param, glu, stacked_linear

B, T, S, D = 2, 6, 5, 32
# Token S-1 is an "agent" token: it reads every token of its step, no other token reads it.
AGENT_VIS = space_mask(["z"] * (S - 1) + ["agent"], {"z": ["z"]})


def forward(m, x, **kw):
    """The full pass, jitted (eager op-by-op dispatch is the slow part on CPU)."""
    return nnx.jit(lambda m, x: m(x, **kw))(m, x)


def rand(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def make_model(**kw):
    args = dict(
        width=D,
        depth=4,
        num_heads=4,
        num_kv_heads=2,
        time_every=2,
        logit_cap=20.0,
        visibility=AGENT_VIS,
        rngs=nnx.Rngs(0),
    )
    args.update(kw)
    return AxialTransformer(**args)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def x():
    return rand(1, (B, T, S, D))


# -- layers ----------------------------------------------------------------------------------------
def test_rms_norm_matches_numpy():
    x_np = np.random.default_rng(0).normal(size=(3, 7, 16)).astype(np.float32) * 3.0
    scale = np.random.default_rng(1).normal(size=(16,)).astype(np.float32)
    ref = x_np / np.sqrt((x_np.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(rms_norm(jnp.asarray(x_np), jnp.asarray(scale)), ref, rtol=1e-5, atol=1e-5)
    # The module starts at scale 1 and keeps the input dtype (bf16 in, bf16 out).
    y = RMSNorm(16)(jnp.asarray(x_np, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), ref / scale, rtol=2e-2, atol=2e-2)


def test_soft_cap_values():
    got = soft_cap(jnp.array([0.0, 1.0, 100.0, -100.0]), 2.0)
    np.testing.assert_allclose(got, [0.0, 2 * np.tanh(0.5), 2.0, -2.0], rtol=1e-6)
    assert float(soft_cap(jnp.array(100.0), 2.0)) <= 2.0
    x = jnp.array([0.0, 1.0, 100.0])
    np.testing.assert_array_equal(soft_cap(x, 0.0), x)  # cap <= 0 disables
    np.testing.assert_array_equal(soft_cap(x, -1.0), x)


@pytest.mark.parametrize("form", ["__call__", "fused"])
def test_swiglu_matches_formula(form):
    mlp = SwiGLU(8, 12, rngs=nnx.Rngs(0))
    x_np = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    g, u, d = (np.asarray(w.kernel[...]) for w in (mlp.w_gate, mlp.w_up, mlp.w_down))
    a = x_np @ g
    ref = (a / (1 + np.exp(-a)) * (x_np @ u)) @ d
    np.testing.assert_allclose(getattr(mlp, form)(jnp.asarray(x_np)), ref, rtol=1e-5, atol=1e-5)


def test_swiglu_form_is_chosen_by_the_platform_it_is_lowered_for():
    """One process, three lowerings (`jax.export`, no device needed): for CPU the gate and up
    projections are two matmuls x (3 x 8) @ W (8 x 12), for CUDA and TPU one x @ [G, U] (8 x 2 x 12)."""
    mlp = SwiGLU(8, 12, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(mlp)

    def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x))

    for platform, fused in (("cpu", False), ("cuda", True), ("tpu", True)):
        module = jax.export.export(jax.jit(jax.grad(loss)), platforms=(platform,))(state, jnp.ones((3, 8)))
        dots = " ".join(line for line in module.mlir_module().splitlines() if "dot_general" in line)
        one = "(tensor<3x8xf32>, tensor<8x2x12xf32>) -> tensor<3x2x12xf32>"
        two = "(tensor<3x8xf32>, tensor<8x12xf32>) -> tensor<3x12xf32>"
        assert (dots.count(one), dots.count(two)) == ((1, 0) if fused else (0, 2)), platform


_FSDP_SWIGLU = """
import collections, re, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from dreamer4.nn.layers import SwiGLU
from dreamer4.runtime.mesh import fsdp_spec
mesh = Mesh(np.array(jax.devices()).reshape(1, 4), ("data", "fsdp"))
graphdef, state = nnx.split(SwiGLU(64, 256, rngs=nnx.Rngs(0)))
state = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, fsdp_spec(a.shape, 4))), state)
x = jax.device_put(jax.random.normal(jax.random.key(1), (64, 10, 64)), NamedSharding(mesh, P(("data", "fsdp"))))
out = {}
for form in ("separate", "fused"):
    f = jax.jit(jax.value_and_grad(lambda st, x: jnp.sum(getattr(nnx.merge(graphdef, st), form)(x) ** 2)))
    hlo = f.lower(state, x).compile().as_text()
    ops = re.findall(r"\\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\\(", hlo)
    value, grads = f(state, x)
    out[form] = {"collectives": dict(collections.Counter(ops)), "value": float(value),
                 "grads": [np.asarray(g).tolist() for g in jax.tree.leaves(grads)]}
import json; print(json.dumps(out))
"""


def test_swiglu_fused_form_keeps_each_weights_fsdp_shard():
    """Over 4 FSDP devices (weights sharded along F; more activations than weights, as in
    training), the fused form gathers its two stacked weights like the separate form gathers
    each, with no all-to-all (concatenating along the sharded F made XLA reshard with 3), and
    gives the same loss and gradients. (With fewer activations than weights, XLA's partitioner
    keeps the weights sharded and moves activations instead, for either form.)"""
    import json
    import subprocess
    import sys

    from conftest import REPO, xla_flags

    env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _FSDP_SWIGLU], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    sep, fused = out["separate"], out["fused"]
    assert "all-to-all" not in fused["collectives"] and fused["collectives"].get("all-gather", 0) >= 1, out
    assert sum(fused["collectives"].values()) <= sum(sep["collectives"].values()), out
    assert fused["value"] == pytest.approx(sep["value"], rel=1e-5)
    for a, b in zip(fused["grads"], sep["grads"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ["__call__", "fused"])
def test_swiglu_gradients_match_numpy(form):
    """Both forms (on a CPU, calling the module runs `separate`: two matmuls and a checkpointed
    activation; `fused`: one matmul over [G, U] stacked and `glu`'s own backward, which returns
    [da, db] as one array): every gradient of L = sum(y * w) equals the chain rule worked in float64 numpy,
        a = x G, b = x U, s = sigmoid(a), h = a s b, y = h D;
        dh = w D^T, dD = h^T w, db = dh a s, da = dh b (s + a s (1 - s)),
        dG = x^T da, dU = x^T db, dx = da G^T + db U^T."""
    mlp = SwiGLU(8, 12, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 3, 8))
    G, U, D = (np.asarray(m.kernel[...], np.float64) for m in (mlp.w_gate, mlp.w_up, mlp.w_down))
    a, b = x @ G, x @ U
    s = 1 / (1 + np.exp(-a))
    h = a * s * b
    dh = w @ D.T
    db, da = dh * a * s, dh * b * (s + a * s * (1 - s))
    want = {
        "x": da @ G.T + db @ U.T,
        "w_gate": np.einsum("ntd,ntf->df", x, da),
        "w_up": np.einsum("ntd,ntf->df", x, db),
        "w_down": np.einsum("ntf,ntd->fd", h, w),
    }

    def loss(mlp, x):
        return jnp.sum(getattr(mlp, form)(x) * jnp.asarray(w, jnp.float32))

    g_mlp, g_x = jax.jit(nnx.grad(loss, argnums=(0, 1)))(mlp, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(g_x, want["x"], rtol=1e-4, atol=1e-5)
    for name in ("w_gate", "w_up", "w_down"):
        np.testing.assert_allclose(getattr(g_mlp, name).kernel[...], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_stacked_linear_equals_each_layer_and_glu_backward_in_bf16():
    """stacked_linear (one matmul over the weights stacked as D x 3 x F) gives each bf16-compute
    layer's output exactly; glu's bf16 gradient matches float64 autodiff of silu(g) * u to bf16
    resolution."""
    rngs = nnx.Rngs(3)
    lins = [nnx.Linear(16, 8, use_bias=False, dtype=jnp.bfloat16, rngs=rngs) for _ in range(3)]
    x = rand(4, (2, 5, 16))
    y = stacked_linear(x, lins)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 5, 3, 8)
    for k, lin in enumerate(lins):
        np.testing.assert_array_equal(np.asarray(y[..., k, :], np.float32), np.asarray(lin(x), np.float32))

    gu = (3 * rand(5, (6, 2, 5))).astype(jnp.bfloat16)
    w = rand(6, (6, 5))
    got = jax.grad(lambda gu: jnp.sum(glu(gu).astype(jnp.float32) * w))(gu)
    a, b, w64 = (np.asarray(v, np.float64) for v in (gu[:, 0].astype(jnp.float32), gu[:, 1].astype(jnp.float32), w))
    s = 1 / (1 + np.exp(-a))
    want = np.stack([w64 * b * (s + a * s * (1 - s)), w64 * a * s], 1)
    assert got.dtype == jnp.bfloat16 and got.shape == gu.shape
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-2, atol=1e-2)


def test_rope_dot_depends_only_on_offset():
    H = 16
    q, k = rand(2, (H,)), rand(3, (H,))

    def dot(m, n):
        return float(jnp.dot(apply_rope(q, m), apply_rope(k, n)))

    assert dot(3, 1) == pytest.approx(dot(7, 5), abs=1e-5)  # offset 2 twice
    assert dot(0, 4) == pytest.approx(dot(10, 14), abs=1e-5)  # offset -4 twice
    assert abs(dot(3, 1) - dot(3, 0)) > 1e-3  # another offset, another dot
    np.testing.assert_allclose(apply_rope(q, 0), q, atol=1e-7)  # position 0: no rotation
    assert float(jnp.linalg.norm(apply_rope(q, 9))) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)
    np.testing.assert_allclose(rope_frequencies(8), [1.0, 0.1, 0.01, 0.001], rtol=1e-5)
    # Positions broadcast over leading dims: rows of x_TH at positions 0..T-1.
    x_TH = rand(4, (5, H))
    rows = jnp.stack([apply_rope(x_TH[t], t) for t in range(5)])
    np.testing.assert_allclose(apply_rope(x_TH, jnp.arange(5)), rows, atol=1e-6)


def test_rope_2d_rotates_halves_by_row_and_column():
    H = 16
    q, k = rand(2, (H,)), rand(3, (H,))

    def dot(m, n):  # m, n: (row, col)
        return float(jnp.dot(apply_rope_2d(q, *m), apply_rope_2d(k, *n)))

    # each half is the 1-D rotation of its own coordinate
    got = apply_rope_2d(q, 2, 5)
    np.testing.assert_allclose(got[:8], apply_rope(q[:8], 2), atol=1e-6)
    np.testing.assert_allclose(got[8:], apply_rope(q[8:], 5), atol=1e-6)
    # hand-worked: H = 4, row 1, col 0: first pair rotated by 1 rad, second pair untouched
    x = jnp.array([1.0, 0.0, 2.0, 3.0])
    np.testing.assert_allclose(apply_rope_2d(x, 1, 0), [np.cos(1.0), np.sin(1.0), 2.0, 3.0], atol=1e-6)
    # logits depend on the 2-D offset only: "one tile left" is the same relation everywhere
    assert dot((3, 4), (3, 3)) == pytest.approx(dot((7, 1), (7, 0)), abs=1e-5)
    assert dot((0, 2), (1, 2)) == pytest.approx(dot((5, 6), (6, 6)), abs=1e-5)
    assert abs(dot((3, 4), (3, 3)) - dot((3, 4), (2, 4))) > 1e-3  # left vs up: different
    with pytest.raises(ValueError, match="divisible by 4"):
        apply_rope_2d(rand(1, (6,)), 0, 0)


# -- attention vs an independent numpy reference ---------------------------------------------------
def reference_attention(att, x_NLD, mask_LL, positions_L):
    """Plain loops-over-heads attention in numpy (float64) with the module's weights."""
    x = np.asarray(x_NLD, np.float64)
    K, G, H = att.num_heads, att.num_kv_heads, att.head_dim
    w = {n: np.asarray(getattr(att, n).kernel[...], np.float64) for n in ("wq", "wk", "wv", "wo")}
    q = (x @ w["wq"]).reshape(*x.shape[:2], K, H)
    k = (x @ w["wk"]).reshape(*x.shape[:2], G, H)
    v = (x @ w["wv"]).reshape(*x.shape[:2], G, H)

    def norm(a, scale):
        return a / np.sqrt((a**2).mean(-1, keepdims=True) + 1e-6) * np.asarray(scale, np.float64)

    q, k = norm(q, att.q_norm.scale[...]), norm(k, att.k_norm.scale[...])
    if att.rope:  # rotate (a_j, b_j) = (x_j, x_{j+H/2}) as the complex number a_j + i b_j
        freq = 10000.0 ** (-np.arange(H // 2) * 2.0 / H)
        rot = np.exp(1j * np.asarray(positions_L)[:, None, None] * freq)  # L, 1, J

        def rope(a):
            z = (a[..., : H // 2] + 1j * a[..., H // 2 :]) * rot
            return np.concatenate([z.real, z.imag], -1)

        q, k = rope(q), rope(k)
    out = numpy_attention(q, k, v, mask_LL, att.logit_cap)
    return out.reshape(*x.shape[:2], K * H) @ w["wo"]


def numpy_attention(q, k, v, mask, cap, bias=None):
    """out_NQKH of grouped-query attention in numpy (float64), one query head at a time: query head
    h reads kv head h // R; logits capped, then bias[:, :, h] added, masked keys at -inf."""
    K, G, H = q.shape[2], k.shape[2], q.shape[3]
    out = np.zeros(q.shape)
    for h in range(K):
        g = h // (K // G)
        logits = np.einsum("nqe,nme->nqm", q[:, :, h], k[:, :, g]) / np.sqrt(H)
        if cap > 0:
            logits = cap * np.tanh(logits / cap)
        if bias is not None:
            logits = logits + bias[:, :, h]
        logits = np.where(mask, logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out[:, :, h] = np.einsum("nqm,nme->nqe", p / p.sum(-1, keepdims=True), v[:, :, g])
    return out


@pytest.mark.parametrize("kv_heads,rope,cap", [(4, False, 0.0), (4, True, 3.0), (2, True, 0.0), (1, False, 3.0)])
def test_attention_matches_numpy_reference(kv_heads, rope, cap):
    L = 6
    att = Attention(D, 4, kv_heads, rope=rope, logit_cap=cap, rngs=nnx.Rngs(0))
    # Non-trivial QK-norm scales so the reference checks where they apply.
    att.q_norm.scale[...] = 1.0 + 0.5 * rand(7, (att.head_dim,))
    att.k_norm.scale[...] = 1.0 + 0.5 * rand(8, (att.head_dim,))
    x_NLD = rand(5, (3, L, D)) * 2.0
    mask_LL = causal_time_mask(L) | (np.arange(L)[None, :] == L - 1)  # causal plus one global key
    positions = np.arange(L) + 3
    got = att(x_NLD, mask_LL, positions=positions)
    np.testing.assert_allclose(got, reference_attention(att, x_NLD, mask_LL, positions), rtol=1e-4, atol=1e-4)


def test_attention_bias_and_mask_match_numpy():
    """Grouped heads (K=4 over G=2), an (N, Q, M) mask, a per-query-head bias added after the cap:
    the einsum kernel against plain numpy loops over heads."""
    N, Q, M, K, G, H, cap = 2, 3, 5, 4, 2, 8, 2.0
    q, k, v = (np.asarray(rand(i, s), np.float64) for i, s in ((1, (N, Q, K, H)), (2, (N, M, G, H)), (3, (N, M, G, H))))
    q, k = 2 * q, 2 * k
    bias = np.asarray(rand(4, (N, Q, K, M)), np.float64)
    mask = np.array(jax.random.bernoulli(jax.random.PRNGKey(5), 0.6, (N, Q, M)))
    mask[:, :, 0] = True
    want = numpy_attention(q, k, v, mask, cap, bias)
    f32 = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
    got = dot_product_attention(*f32, mask, logit_cap=cap, bias_NQKM=jnp.asarray(bias, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_broadcast_param_tiles_forward_and_sums_gradients():
    """y[b, t] = p; dL/dp = sum_bt dL/dy[b, t] (worked in numpy), in p's dtype."""
    p = rand(1, (3, 4))
    w = np.asarray(rand(2, (2, 5, 3, 4)), np.float64)
    y = broadcast_param(p, (2, 5))
    assert y.shape == (2, 5, 3, 4)
    np.testing.assert_array_equal(y, np.broadcast_to(np.asarray(p), (2, 5, 3, 4)))
    grad = jax.jit(jax.grad(lambda p: jnp.sum(broadcast_param(p, (2, 5)) * jnp.asarray(w, jnp.float32))))(p)
    assert grad.dtype == p.dtype
    np.testing.assert_allclose(grad, w.sum(axis=(0, 1)), rtol=1e-5, atol=1e-5)
    # a bf16 parameter gets a bf16 gradient of the same sum (1000 rows of 1/3)
    g16 = jax.grad(lambda p: jnp.sum(broadcast_param(p, (1000,)).astype(jnp.float32) / 3))(
        jnp.zeros((1,), jnp.bfloat16)
    )
    assert g16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g16, np.float32), [1000 / 3], rtol=1e-2)


@pytest.mark.parametrize("G", [4, 2, 1])
def test_jax_nn_attention_equals_the_einsum_reference(G):
    """implementation="xla" (jax.nn.dot_product_attention) computes what the einsum reference does:
    GQA, no mask, a (Q, M) mask and an (N, Q, M) mask (rows with a single visible key included);
    "auto" on a CPU is the einsum path itself, and a soft-cap always runs the einsum path."""
    N, Q, M, K, H = 3, 5, 7, 4, 8
    q, k, v = rand(1, (N, Q, K, H)) * 2, rand(2, (N, M, G, H)) * 2, rand(3, (N, M, G, H))
    mask_QM = (np.arange(M)[None, :] <= np.arange(Q)[:, None]) | (np.arange(M)[None, :] == M - 1)
    mask_NQM = np.array(jax.random.bernoulli(jax.random.PRNGKey(4), 0.5, (N, Q, M)))
    mask_NQM[:, :, 0] = True  # masks built here never leave a row empty
    mask_NQM[0, 1] = np.arange(M) == 3  # a row with one visible key
    for mask in (None, mask_QM, mask_NQM):
        ref = dot_product_attention(q, k, v, mask, implementation="einsum")
        got = dot_product_attention(q, k, v, mask, implementation="xla")
        assert got.shape == ref.shape == (N, Q, K, H) and got.dtype == ref.dtype
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
        auto = dot_product_attention(q, k, v, mask, implementation="auto")
        np.testing.assert_array_equal(auto, ref)
    capped = dot_product_attention(q, k, v, mask_QM, logit_cap=2.0, implementation="xla")
    np.testing.assert_array_equal(
        capped, dot_product_attention(q, k, v, mask_QM, logit_cap=2.0, implementation="einsum")
    )
    with pytest.raises(ValueError, match="implementation"):
        dot_product_attention(q, k, v, implementation="flash")


def test_auto_attention_falls_back_to_einsum_where_cudnn_refuses(monkeypatch):
    """The "auto" kernel tries cuDNN where it could run (GPU, bf16); what jax.nn refuses while tracing (here:
    no cuDNN at all) runs the einsum reference instead of failing."""
    monkeypatch.setattr(attention_module, "_cudnn_takes", lambda *a: True)
    q, k = rand(1, (2, 4, 4, 8), jnp.bfloat16), rand(2, (2, 6, 2, 8), jnp.bfloat16)
    mask = np.tril(np.ones((4, 6), bool), 2)
    got = jax.jit(lambda q, k: dot_product_attention(q, k, k, mask, implementation="auto"))(q, k)
    ref = dot_product_attention(q, k, k, mask, implementation="einsum")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))


def test_transformer_with_jax_nn_attention_equals_einsum(x, monkeypatch):
    """The module setting switches every attention layer (space with a visibility mask, causal time,
    the cached step): the full pass and a cached step agree with the einsum reference."""
    m = make_model(logit_cap=0.0)
    calls = []
    jax_nn = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: calls.append(1) or jax_nn(*a, **kw))
    outs = {}
    for impl in ("einsum", "xla"):
        monkeypatch.setattr(attention_module, "IMPLEMENTATION", impl)
        # fresh functions per setting: a jit cache keyed on the function would reuse the other's trace
        y = nnx.jit(lambda m, x: m(x))(m, x)
        _, cache = nnx.jit(lambda m, x: m.prefill(x, max_len=8))(m, x[:, :3])
        y3, _ = nnx.jit(lambda m, x_t, c, t: m.step(x_t, c, t))(m, x[:, 3:4], cache, jnp.int32(3))
        outs[impl] = (y, y3)
        assert bool(calls) == (impl == "xla")
    for a, b in zip(outs["einsum"], outs["xla"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# -- fused (Pallas) attention, through Pallas' interpreter on the CPU ---------------------------------
@pytest.mark.parametrize(
    "N, Q, M, K, G, cap, mask_kind",
    [
        (3, 5, 5, 4, 2, 2.0, "causal"),  # GQA, soft-cap, one (Q, M) mask for all
        (2, 7, 7, 4, 4, 0.0, None),  # no cap, no mask
        (2, 6, 6, 6, 2, 3.0, "per_batch"),  # R = 3 query heads per kv head, an (N, Q, M) mask
        (2, 1, 9, 4, 1, 50.0, "cache"),  # one query against a cache of 9 slots (a cached step)
        (1, 20, 20, 2, 1, 50.0, "causal"),  # longer than one 16-row block
        (1, 80, 80, 4, 2, 50.0, "causal"),  # the tokenizer's frame: tiles of 64 + 16 positions
        (2, 20, 40, 4, 2, 5.0, "per_batch"),  # 40 keys: 32 + 16, the last tile part padding
        (1, 48, 16, 2, 2, 3.0, None),  # 48 queries: 32 + 16 against one key tile
    ],
)
@pytest.mark.parametrize("tiling", ["binary", "single"])
def test_fused_attention_equals_the_einsum_reference(N, Q, M, K, G, cap, mask_kind, tiling):
    """Forward and the gradients of q, k and v, in float32, against `einsum_attention`, with the
    sequences cut into power-of-two tiles ("binary", the default) or padded to one ("single")."""
    H = 16
    q, k, v = rand(1, (N, Q, K, H)) * 2, rand(2, (N, M, G, H)) * 2, rand(3, (N, M, G, H))
    mask = {
        None: None,
        "causal": causal_time_mask(Q),
        "cache": cached_time_mask(5, M, window=4),
        "per_batch": np.array(jax.random.bernoulli(jax.random.PRNGKey(4), 0.5, (N, Q, M))) | (np.arange(M) == 0),
    }[mask_kind]
    w = rand(5, (N, Q, K, H))

    def run(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v) * w)  # noqa: E731
        return [fn(q, k, v), *jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)]

    got = run(lambda q, k, v: fused_module.fused_attention(q, k, v, mask, cap, tiling=tiling))
    ref = run(lambda q, k, v: attention_module.einsum_attention(q, k, v, mask, cap))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_fused_attention_tiles_and_tanh():
    """The tiles cover a sequence rounded up to 16 with powers of two, largest first; the kernels'
    tanh (one exp and a division) equals tanh to float32 resolution, also where exp overflows."""
    tiles = fused_module._tiles
    assert tiles(80, "binary") == ((0, 64), (64, 16))
    assert tiles(1, "binary") == tiles(16, "binary") == ((0, 16),)
    assert tiles(17, "binary") == ((0, 32),)
    assert tiles(100, "binary") == ((0, 64), (64, 32), (96, 16))
    assert tiles(256, "binary") == ((0, 256),)
    assert tiles(80, "single") == ((0, 128),)
    assert tiles(5, "single") == ((0, 16),)
    with pytest.raises(ValueError, match="tiling 'wide'"):
        fused_module.fused_attention(*(rand(i, (1, 4, 2, 16)) for i in range(3)), tiling="wide")
    x = np.concatenate([np.linspace(-100, 100, 2001), [0.0, 1e-30, -1e-7, 44.5, 89.0, -89.0]]).astype(np.float32)
    got = np.asarray(fused_module._tanh(jnp.asarray(x)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, np.tanh(x.astype(np.float64)), rtol=0, atol=3e-7)


def test_pallas_attention_falls_back_where_the_kernels_do_not_apply():
    """implementation="pallas" runs the reference for a logit bias and for shapes the kernels do
    not take (head width 8); fused_attention itself refuses them by name."""
    q, k = rand(1, (2, 4, 4, 8)), rand(2, (2, 4, 2, 8))
    ref = dot_product_attention(q, k, k, None, 3.0, implementation="einsum")
    np.testing.assert_array_equal(dot_product_attention(q, k, k, None, 3.0, implementation="pallas"), ref)
    with pytest.raises(ValueError, match="head width"):
        fused_module.fused_attention(q, k, k)
    q, k = rand(1, (2, 4, 4, 16)), rand(2, (2, 4, 2, 16))
    bias = rand(3, (2, 4, 4, 4))
    np.testing.assert_array_equal(
        dot_product_attention(q, k, k, None, 3.0, implementation="pallas", bias_NQKM=bias),
        dot_product_attention(q, k, k, None, 3.0, implementation="einsum", bias_NQKM=bias),
    )
    with pytest.raises(ValueError, match="mask shape"):
        fused_module.fused_attention(q, k, k, np.ones((3, 4), bool))


def test_auto_attention_runs_the_fused_kernels_for_capped_gpu_shapes(monkeypatch):
    """On one GPU with bf16 inputs, "auto" sends soft-capped attention of more than one query to
    the fused kernels (16 queries; 14, the dynamics' space attention) and keeps the einsum
    reference for a single cached query, a bias, uncapped logits (cuDNN's turn), float32 and a
    multi-device job. On this CPU it never picks them."""
    q, k = rand(1, (2, 16, 4, 16), jnp.bfloat16), rand(2, (2, 16, 2, 16), jnp.bfloat16)
    assert not attention_module._gpu_half(q, k, k)  # CPU backend: "auto" stays off the kernels here
    monkeypatch.setattr(attention_module, "_gpu_half", lambda q, k, v: q.dtype == jnp.bfloat16)
    calls = []
    kernel = fused_module.fused_attention
    monkeypatch.setattr(fused_module, "fused_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    mask = causal_time_mask(16)

    def auto(q, k, cap=5.0, mask=mask, bias=None):
        calls.clear()
        out = dot_product_attention(q, k, k, mask, cap, implementation="auto", bias_NQKM=bias)
        return np.asarray(out, np.float32), len(calls)

    out, n = auto(q, k)
    assert n == 1
    ref = dot_product_attention(q, k, k, mask, 5.0, implementation="einsum")
    np.testing.assert_allclose(out, np.asarray(ref, np.float32), atol=2e-2)
    assert auto(q[:, :14], k[:, :14], mask=space_mask(["z"] * 12 + ["a"] * 2, {"z": ["z"]}))[1] == 1
    assert auto(q[:, :1], k, mask=cached_time_mask(3, 16))[1] == 0  # one cached query
    assert auto(q, k, bias=rand(3, (2, 16, 4, 16)))[1] == 0
    assert auto(q, k, cap=0.0)[1] == 0  # uncapped: cuDNN is tried (refused on CPU), then einsum
    assert auto(q.astype(jnp.float32), k.astype(jnp.float32))[1] == 0
    monkeypatch.setattr(attention_module, "_one_device", lambda: False)  # no SPMD rule for the kernels
    assert auto(q, k)[1] == 0


def test_transformer_with_pallas_attention_equals_einsum(monkeypatch):
    """DREAMER4_ATTENTION=pallas switches every layer (space with the agent-token mask, causal time,
    the cached step) to the fused kernels: same outputs and gradients as the reference."""
    m = make_model(width=64, logit_cap=20.0)  # head width 16: the kernels' smallest
    x = rand(1, (B, T, S, 64))
    calls = []
    kernel = fused_module.fused_attention
    monkeypatch.setattr(fused_module, "fused_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    outs = {}
    for impl in ("einsum", "pallas"):
        monkeypatch.setattr(attention_module, "IMPLEMENTATION", impl)
        y, grads = nnx.jit(lambda m, x: nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(m))(m, x)
        _, cache = nnx.jit(lambda m, x: m.prefill(x, max_len=8))(m, x[:, :3])
        y3, _ = nnx.jit(lambda m, x_t, c, t: m.step(x_t, c, t))(m, x[:, 3:4], cache, jnp.int32(3))
        outs[impl] = (y, y3, *jax.tree.leaves(grads))
        assert bool(calls) == (impl == "pallas")
    for a, b in zip(outs["einsum"], outs["pallas"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# -- masks -----------------------------------------------------------------------------------------
def test_masks():
    np.testing.assert_array_equal(causal_time_mask(3), [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    w = causal_time_mask(5, window=2)
    assert w[4].tolist() == [False, False, False, True, True] and w[0].tolist() == [True] + [False] * 4
    for t in range(5):  # the cache mask is the full mask's row t (padded to the cache length)
        np.testing.assert_array_equal(cached_time_mask(t, 7, 2)[0, :5], w[t])
        assert not np.asarray(cached_time_mask(t, 7, 2)[0, 5:]).any()
    # A ring of C = 3 slots (step u in slot u mod 3), worked by hand: at t = 1 slots 0, 1 hold
    # steps 0, 1 and slot 2 nothing yet; at t = 5 slots 0, 1, 2 hold steps 3, 4, 5, of which a
    # window of 2 reads steps 4 and 5.
    assert np.asarray(cached_time_mask(1, 3, 3)[0]).tolist() == [True, True, False]
    assert np.asarray(cached_time_mask(jnp.int32(5), 3, 3)[0]).tolist() == [True, True, True]
    assert np.asarray(cached_time_mask(5, 3, 2)[0]).tolist() == [False, True, True]
    # Agent token (last): sees everything; nothing else sees it.
    assert AGENT_VIS[-1].all() and not AGENT_VIS[:-1, -1].any() and AGENT_VIS[:-1, :-1].all()
    vis = space_mask(["p", "p", "lat"], {"p": ["p"], "lat": ["p", "lat"]})
    np.testing.assert_array_equal(vis, [[1, 1, 0], [1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(space_mask(vis), vis)
    with pytest.raises(ValueError, match="attend to no token"):
        space_mask(["a", "b"], {"a": ["b"], "b": []})
    with pytest.raises(ValueError, match="square"):
        space_mask(np.ones((2, 3), bool))


def test_layer_rule():
    assert layer_kinds(8, 4) == ("space",) * 3 + ("time",) + ("space",) * 3 + ("time",)
    assert layer_kinds(4, 2) == ("space", "time", "space", "time")
    assert layer_kinds(2, 1) == ("time", "time") and layer_kinds(2, 0) == ("space", "space")
    assert make_model(kinds=("time", "space", "space", "time")).time_layers == (0, 3)


# -- axial transformer -----------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0, 3])
def test_causality_over_time(model, x, t):
    fwd = nnx.jit(lambda m, x: m(x))  # one compilation for the four passes
    y = fwd(model, x)
    assert model.kinds == ("space", "time", "space", "time")
    later = x.at[:, t + 1 :].add(rand(2, (B, T - t - 1, S, D)))  # every token of steps > t
    y2 = fwd(model, later)
    np.testing.assert_allclose(y2[:, : t + 1], y[:, : t + 1], atol=1e-6)
    # ... and the change does reach step t+1 and every later step (the test can fail).
    assert (np.abs(np.asarray(y2 - y))[:, t + 1 :].max(axis=(0, 2, 3)) > 1e-3).all()
    # Only the last token index of step t+1 changed: steps <= t still untouched.
    last = x.at[:, t + 1, S - 1].add(3.0)
    y3 = fwd(model, last)
    np.testing.assert_allclose(y3[:, : t + 1], y[:, : t + 1], atol=1e-6)
    assert np.abs(np.asarray(y3 - y))[:, t + 1, S - 1].max() > 1e-3
    # Changing step t itself changes step t and all later steps.
    now = x.at[:, t].add(rand(3, (B, S, D)))
    y4 = fwd(model, now)
    np.testing.assert_allclose(y4[:, :t], y[:, :t], atol=1e-6)
    assert (np.abs(np.asarray(y4 - y))[:, t:].max(axis=(0, 2, 3)) > 1e-3).all()


def test_space_visibility_hides_token_from_others(x):
    vis = np.ones((S, S), bool)
    vis[1:, 0] = False  # token 0 is seen by nobody but itself
    m = make_model(depth=1, time_every=0, visibility=vis)
    assert m.kinds == ("space",)
    fwd = nnx.jit(lambda m, x: m(x))
    y = fwd(m, x)
    x2 = x.at[:, :, 0].add(rand(4, (B, T, D)))  # token 0 changed at every step
    y2 = fwd(m, x2)
    np.testing.assert_allclose(y2[:, :, 1:], y[:, :, 1:], atol=1e-6)
    assert (np.abs(np.asarray(y2 - y))[:, :, 0].max(axis=(0, 2)) > 1e-3).all()
    # A visibility given at call time overrides the constructor's: now token 0 leaks.
    everyone = np.ones((S, S), bool)
    y3 = forward(m, x2, visibility=everyone)
    assert np.abs(np.asarray(y3 - forward(m, x, visibility=everyone)))[:, :, 1:].max() > 1e-3


def test_kv_cache_steps_equal_full_pass(model, x):
    y_full = forward(model, x)
    step = nnx.jit(lambda m, x_t, c, t: m.step(x_t, c, t))
    cache = model.init_cache(B, max_len=8)
    assert len(cache) == 2 and cache[0]["k"].shape == (B, S, 8, 2, D // 4)
    for t in range(T):
        if t == 2:  # a denoising pass at the same t with other inputs: overwritten by the next call
            _, cache = step(model, x[:, t : t + 1] + 1.0, cache, jnp.int32(t))
        y_t, cache = step(model, x[:, t : t + 1], cache, jnp.int32(t))
        np.testing.assert_allclose(y_t[:, 0], y_full[:, t], atol=1e-5)
    # Prefill a context of 3 steps, then continue step by step.
    y_ctx, cache = nnx.jit(lambda m, x: m.prefill(x, max_len=8))(model, x[:, :3])
    np.testing.assert_allclose(y_ctx, y_full[:, :3], atol=1e-5)
    for t in range(3, T):
        y_t, cache = step(model, x[:, t : t + 1], cache, jnp.int32(t))
        np.testing.assert_allclose(y_t[:, 0], y_full[:, t], atol=1e-5)
    # Past the cache: a clear error for a concrete t, NaN (never a silent overwrite) under jit.
    with pytest.raises(ValueError, match="does not fit a KV cache of 8 steps"):
        model.step(x[:, :1], cache, 8)
    assert np.isnan(np.asarray(step(model, x[:, :1], cache, jnp.int32(8))[0])).all()


def test_sliding_window_cache_equals_full_pass(x):
    m = make_model(time_window=3)
    y_full = forward(m, x)
    assert np.abs(np.asarray(y_full - forward(make_model(), x)))[:, 3:].max() > 1e-4  # the window matters
    step = nnx.jit(lambda m, x_t, c, t: m.step(x_t, c, t))
    cache = m.init_cache(B, max_len=T)
    # A window of 3 needs 3 slots whatever the length: a ring buffer (step u in slot u mod 3).
    assert cache[0]["k"].shape[2] == 3 and m.is_ring(3) and not m.is_ring(2)
    for t in range(T):
        if t == 4:  # a denoising pass at the same t (slot 1, which held step 1): overwritten next
            _, cache = step(m, x[:, t : t + 1] + 1.0, cache, jnp.int32(t))
        y_t, cache = step(m, x[:, t : t + 1], cache, jnp.int32(t))
        np.testing.assert_allclose(y_t[:, 0], y_full[:, t], atol=1e-5)
    # Prefill a context longer than the ring (its last 3 steps kept), then continue: same outputs.
    y_ctx, cache = nnx.jit(lambda m, x: m.prefill(x, max_len=100))(m, x[:, :5])
    assert cache[0]["k"].shape[2] == 3
    np.testing.assert_allclose(y_ctx, y_full[:, :5], atol=1e-5)
    for t in range(5, T):
        y_t, cache = step(m, x[:, t : t + 1], cache, jnp.int32(t))
        np.testing.assert_allclose(y_t[:, 0], y_full[:, t], atol=1e-5)
    # Past any max_len: a ring takes every t (no NaN guard), and step t still equals the full
    # pass of a sequence whose last 3 steps are those the ring holds.
    x_long = jnp.concatenate([x, x[:, ::-1]], 1)
    y_long = forward(m, x_long)
    cache = m.init_cache(B, max_len=4)
    for t in range(2 * T):
        y_t, cache = step(m, x_long[:, t : t + 1], cache, jnp.int32(t))
        np.testing.assert_allclose(y_t[:, 0], y_long[:, t], atol=1e-5)
    # A cache shorter than the window is not a ring: it holds steps 0 .. C - 1 only.
    short = m.init_cache(B, max_len=2)
    with pytest.raises(ValueError, match="does not fit a KV cache of 2 steps"):
        m.step(x[:, :1], short, 2)
    with pytest.raises(ValueError, match="a context of 3 steps does not fit a cache of 2"):
        m.prefill(x[:, :3], max_len=2)


def test_time_neighbourhood_reads_only_grid_neighbours(x):
    """A time layer with a neighbour table: token s at step t depends on the tokens nb(s) of steps
    <= t and on nothing else; a token past the table's rows (an agent token) reads only itself;
    the selector's logit bias changes the output; KV-cached steps equal the full pass."""
    nb = [[-1, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, -1]]  # 4 tokens on a line: (left, self, right)
    m = AxialTransformer(
        width=D, depth=1, num_heads=4, num_kv_heads=2, kinds=["time"], time_neighbours=nb, rngs=nnx.Rngs(0)
    )
    y = forward(m, x)  # x has S = 5 tokens: token 4 is beyond the table
    diff_TS = np.abs(np.asarray(forward(m, x.at[:, 2, 1].add(1.0)) - y)).max(axis=(0, 3))
    assert (diff_TS[:2] == 0).all()  # causal: earlier steps untouched
    assert (diff_TS[2:, :3] > 1e-4).all() and (diff_TS[2:, 3:] == 0).all()  # tokens 0, 1, 2 read token 1
    plain = AxialTransformer(width=D, depth=1, num_heads=4, num_kv_heads=2, kinds=["time"], rngs=nnx.Rngs(0))
    diff_plain = np.abs(np.asarray(forward(plain, x.at[:, 2, 1].add(1.0)) - forward(plain, x))).max(axis=(0, 3))
    assert (diff_plain[2:, 1] > 1e-4).all() and (diff_plain[:, [0, 2]] == 0).all()  # axial: own position only
    sel = m.blocks[0].select
    assert sel.kernel.shape == (D, 4 * 3) and float(jnp.abs(sel.kernel[...]).max()) == 0.0  # zero at init
    sel.kernel[...] = rand(3, sel.kernel.shape)
    y_sel = forward(m, x)
    assert np.abs(np.asarray(y_sel - y)).max() > 1e-3
    step = nnx.jit(lambda m, x_t, c, t: m.step(x_t, c, t))
    cache = m.init_cache(B, max_len=T + 2, num_tokens=S)
    for t in range(T):
        y_t, cache = step(m, x[:, t : t + 1], cache, jnp.int32(t))
        np.testing.assert_allclose(y_t[:, 0], y_sel[:, t], atol=1e-5)
    y_ctx, _ = nnx.jit(lambda m, x: m.prefill(x, max_len=T))(m, x[:, :3])
    np.testing.assert_allclose(y_ctx, y_sel[:, :3], atol=1e-5)
    with pytest.raises(ValueError, match="neighbour table has 4 rows but each step has only 3 tokens"):
        forward(m, x[:, :, :3])


def test_bf16_compute_with_fp32_params(model, x):
    m16 = make_model(dtype=jnp.bfloat16, param_dtype=jnp.float32)  # same seed: same fp32 weights
    params = nnx.state(m16, nnx.Param)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    y16 = nnx.jit(lambda m, x: m(x))(m16, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16 and np.isfinite(np.asarray(y16, np.float32)).all()
    y32 = np.asarray(forward(model, x))
    err = np.abs(np.asarray(y16, np.float32) - y32)
    assert err.mean() < 0.05 and err.max() < 0.5, (err.mean(), err.max())
    # The cached path runs in bf16 too, with a bf16 cache.
    cache = m16.init_cache(B, T)
    assert cache[0]["k"].dtype == jnp.bfloat16
    y_t, _ = nnx.jit(lambda m, x_t, c, t: m.step(x_t, c, t))(m16, x[:, :1].astype(jnp.bfloat16), cache, 0)
    np.testing.assert_allclose(np.asarray(y_t, np.float32)[:, 0], np.asarray(y16, np.float32)[:, 0], atol=0.1)


def test_remat_gives_the_same_gradients(x):
    def loss(m, x):
        return jnp.mean(m(x) ** 2)

    grads = [nnx.jit(nnx.grad(loss))(make_model(depth=2, remat=r), x) for r in (False, True)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_residual_stream_dtype_follows_the_train_config(monkeypatch):
    """`train.residual: compute` runs the stream between layers in the compute dtype (bf16 here);
    the default keeps it float32 (the models add float32 position embeddings to their inputs)."""
    from dreamer4.config import ConfigError, load_config
    from dreamer4.nn.transformer import Block
    from dreamer4.runtime.loading import build_tokenizer

    seen = []
    orig = Block.__call__

    def recording(self, x, *a, **k):  # the dtype that reaches each layer
        seen.append(x.dtype)
        return orig(self, x, *a, **k)

    monkeypatch.setattr(Block, "__call__", recording)
    frames = jax.random.uniform(jax.random.PRNGKey(0), (1, 3, 63, 63, 3))
    outs = {}
    for residual, want in (("fp32", jnp.float32), ("compute", jnp.bfloat16)):
        overrides = ["tokenizer.train.precision=bf16", f"tokenizer.train.residual={residual}"]
        tok = build_tokenizer(load_config("configs/tiny.yaml", overrides), (63, 63, 3))
        seen.clear()
        outs[residual] = tok.encode(frames)
        assert seen and set(seen) == {jnp.dtype(want)}, (residual, seen)
    # the same weights (same seed): the bf16 stream changes the latents by bf16 rounding only
    a, b = (np.asarray(outs[r], np.float32) for r in ("fp32", "compute"))
    assert np.isfinite(b).all() and np.linalg.norm(a - b) / np.linalg.norm(a) < 0.05
    with pytest.raises(ConfigError, match=r"tokenizer.train.residual.*expected one of \['fp32', 'compute'\]"):
        load_config("configs/tiny.yaml", ["tokenizer.train.residual=bf16"])

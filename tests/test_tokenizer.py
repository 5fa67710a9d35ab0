"""Causal tokenizer: shapes, mask, causality, frame-by-frame == whole clip, training, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, TEST_OVERRIDES, TOK_OVERRIDES, bench_module, make_test_config
from flax import nnx

from dreamer4.data.store import Dataset, DatasetError
from dreamer4.runtime.logging import read_metrics
from dreamer4.tokenizer.model import Tokenizer, sample_patch_mask
from dreamer4.tokenizer.train import tokenizer_loss, train_tokenizer


def tok_config(extra=()):
    return make_test_config(TOK_OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def model():
    cfg = tok_config()
    m = Tokenizer(cfg.tokenizer.net, (63, 63, 3), rngs=nnx.Rngs(0))
    # The read-out starts at zero (training begins from the bias); give it weights so that the
    # causality checks below see the decoder's output depend on its input.
    k = m.patch_out.kernel
    k[...] = 0.05 * jax.random.normal(jax.random.PRNGKey(1), k.shape)
    return m


@pytest.fixture(scope="module")
def frames(dataset):
    root, _ = dataset
    ds = Dataset.open(root)
    ep = ds.episodes[0]
    return jnp.asarray(ds.read(ep, 0, 5, ("frame",))["frame"][None], jnp.float32) / 255.0  # 1,5,H,W,C


def test_shapes_and_padding(model, frames):
    assert model.num_patches == 64  # 63x63 padded to 64x64, patch 8
    z = model.encode(frames)
    assert z.shape == (1, 5, 4, 8) and float(jnp.abs(z).max()) < 1.0
    assert model.decode(z).shape == frames.shape
    np.testing.assert_array_equal(model.unpatchify(model.patchify(frames)), frames)


def test_mask_sampling():
    m = sample_patch_mask(jax.random.PRNGKey(0), 64, 8, 256, 0.9)
    rate = np.asarray(m.mean(-1))  # per image
    assert 0.40 < rate.mean() < 0.50  # E[p] = 0.45 for p ~ U(0, 0.9)
    assert rate.max() < 0.97 and rate.min() < 0.1  # spread across images, p never above 0.9


def test_masked_patches_are_replaced(model, frames):
    P = model.num_patches
    mask = jnp.zeros((1, 5, P), bool).at[:, :, 3].set(True)
    changed = frames.at[:, :, 0:8, 24:32].add(0.5)  # pixels of patch 3 (row 0, column 3)
    np.testing.assert_allclose(model.encode(frames, mask), model.encode(changed, mask), atol=1e-6)
    assert not np.allclose(model.encode(frames), model.encode(changed), atol=1e-4)


@pytest.mark.parametrize("t", [0, 2])
def test_causality(model, frames, t):
    later = frames.at[:, t + 1].set(1.0 - frames[:, t + 1])
    z, z2 = model.encode(frames), model.encode(later)
    np.testing.assert_allclose(z[:, : t + 1], z2[:, : t + 1], atol=1e-6)
    assert not np.allclose(z[:, t + 1], z2[:, t + 1], atol=1e-4)
    zl = z.at[:, t + 1].set(-z[:, t + 1])
    d, d2 = model.decode(z), model.decode(zl)
    np.testing.assert_allclose(d[:, : t + 1], d2[:, : t + 1], atol=1e-6)
    assert not np.allclose(d[:, t + 1], d2[:, t + 1], atol=1e-4)


def test_frame_by_frame_equals_whole_clip(model, frames):
    z_all = model.encode(frames)
    d_all = model.decode(z_all)
    cache = model.init_cache(1, 8)
    enc_step = nnx.jit(lambda m, x, c, t: m.encode_step(x, c, t))
    dec_step = nnx.jit(lambda m, z, c, t: m.decode_step(z, c, t))
    for t in range(frames.shape[1]):
        z_t, cache = enc_step(model, frames[:, t : t + 1], cache, t)
        d_t, cache = dec_step(model, z_t, cache, t)
        np.testing.assert_allclose(z_t[:, 0], z_all[:, t], atol=2e-5)
        np.testing.assert_allclose(d_t[:, 0], d_all[:, t], atol=2e-5)


@pytest.fixture(scope="module")
def trained(trained_tokenizer):
    return trained_tokenizer


def test_training_reduces_loss_and_evaluates(trained):
    run, results = trained
    m = read_metrics(run / "tokenizer")
    losses = [r["loss"] for r in m if "loss" in r]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0], losses
    for k in ("eval_psnr", "eval_ssim", "eval_psnr_mean_frame_baseline"):
        assert np.isfinite(results[k])
    assert list((run / "tokenizer" / "images").glob("recon_grid_*.png"))
    assert (run / "tokenizer" / "config.yaml").exists()


def _cli(args, env_extra=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "dreamer4.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _args(root, run, extra=()):
    a = ["train-tokenizer", "--config", "configs/tiny.yaml", "--data", str(root), "--run", str(run)]
    for o in TEST_OVERRIDES + TOK_OVERRIDES + ["tokenizer.train.steps=24"] + list(extra):
        if not o.startswith("collect.policy"):
            a += ["--set", o]
    return a


def test_resume_after_sigkill_continues_step_and_stream(dataset, trained, tmp_path):
    root, _ = dataset
    run = tmp_path / "run"
    proc = _cli(_args(root, run))
    ckpts = run / "tokenizer" / "checkpoints"
    deadline = time.time() + 400
    while time.time() < deadline:
        done = [p for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.exists() else []
        if any(int(p.name) >= 8 for p in done):
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = _cli(_args(root, run))
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log
    assert "resumed from checkpoint step" in log
    # The resumed run reproduces the uninterrupted run's losses step for step (same data stream).
    ref = {r["step"]: r["loss"] for r in read_metrics(trained[0] / "tokenizer") if "loss" in r}
    got = {r["step"]: r["loss"] for r in read_metrics(run / "tokenizer") if "loss" in r}
    assert max(got) == 24
    for s in range(12, 25, 2):
        assert got[s] == pytest.approx(ref[s], rel=1e-4, abs=1e-6), (s, got[s], ref[s])


# Restoring onto another device (and process) count: tests/test_multihost.py continues a
# 2-process x 2-device tokenizer checkpoint in 1 process x 1 device and checks the losses.


def test_other_frame_size_is_a_clear_error(dataset, trained, tmp_path):
    root, _ = dataset
    fake = tmp_path / "full"
    fake.mkdir()
    m = json.loads((root / "manifest.json").read_text())
    m["frame_shape"] = [130, 110, 3]
    (fake / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match=r"frames of shape \(130, 110, 3\) .* configured for \(63, 63, 3\)"):
        train_tokenizer(tok_config(["tokenizer.train.steps=24"]), fake, trained[0])


def test_loss_is_finite_and_positive(model, frames):
    loss, metrics = tokenizer_loss(model, {"frames": (frames * 255).astype(jnp.uint8)}, jax.random.PRNGKey(1))
    assert float(loss) > 0 and np.isfinite(float(metrics["psnr"]))


def test_bf16_compute_keeps_fp32_params(frames):
    from dreamer4.runtime.loading import build_tokenizer

    m = build_tokenizer(tok_config(["tokenizer.train.precision=bf16"]), (63, 63, 3))
    params = jax.tree.leaves(nnx.state(m, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    loss, _ = tokenizer_loss(m, {"frames": (frames * 255).astype(jnp.uint8)}, jax.random.PRNGKey(0))
    assert np.isfinite(float(loss))


def test_patch_layout_one_latent_per_patch(frames):
    """latent_layout=patch: L = P latents read off the patch tokens; causal, masked patches unseen,
    frame-by-frame equal to the whole clip; a latent count other than P is refused by name."""
    cfg = tok_config(["tokenizer.latent_layout=patch", "tokenizer.num_latents=64"]).tokenizer.net
    m = Tokenizer(cfg, (63, 63, 3), rngs=nnx.Rngs(0))
    m.patch_out.kernel[...] = 0.05 * jax.random.normal(jax.random.PRNGKey(1), m.patch_out.kernel.shape)
    assert not hasattr(m, "latent_tokens") and not hasattr(m, "patch_queries")
    z = m.encode(frames)
    assert z.shape == (1, 5, 64, 8) and m.decode(z).shape == frames.shape
    # causality in both directions (encoder and decoder)
    later = frames.at[:, 3].set(1.0 - frames[:, 3])
    np.testing.assert_allclose(m.encode(later)[:, :3], z[:, :3], atol=1e-6)
    assert not np.allclose(m.encode(later)[:, 3], z[:, 3], atol=1e-4)
    d, d2 = m.decode(z), m.decode(z.at[:, 3].set(-z[:, 3]))
    np.testing.assert_allclose(d[:, :3], d2[:, :3], atol=1e-6)
    assert not np.allclose(d[:, 3], d2[:, 3], atol=1e-4)
    # a dropped patch's pixels reach no latent
    mask = jnp.zeros((1, 5, 64), bool).at[:, :, 3].set(True)
    changed = frames.at[:, :, 0:8, 24:32].add(0.5)
    np.testing.assert_allclose(m.encode(frames, mask), m.encode(changed, mask), atol=1e-6)
    cache = m.init_cache(1, 8)
    for t in range(frames.shape[1]):
        z_t, cache = m.encode_step(frames[:, t : t + 1], cache, t)
        np.testing.assert_allclose(z_t[:, 0], z[:, t], atol=2e-5)
    bad = tok_config(["tokenizer.latent_layout=patch"]).tokenizer.net  # 4 latents, 64 patches
    with pytest.raises(ValueError, match=r"tokenizer.num_latents.*\(4\).*number of patches \(64"):
        Tokenizer(bad, (63, 63, 3), rngs=nnx.Rngs(0))


def test_tokenizer_ab_compares_runs_on_the_same_held_out_clips(trained_tokenizer, dataset, tmp_path):
    """benchmarks/tokenizer_ab.py: per-frame PSNR as computed independently here; a run against
    itself differs by exactly 0 (the pairing is by episode, on the same clips)."""

    from dreamer4.runtime.loading import load_tokenizer
    from dreamer4.runtime.stage import open_dataset

    ab = bench_module("tokenizer_ab")
    run, root = trained_tokenizer[0], dataset[0]
    out = tmp_path / "ab.json"
    ab.main(["--data", str(root), "--runs", str(run), str(run), "--frames", "4", "--json", str(out)])
    res = json.loads(out.read_text())
    tok, cfg, _ = load_tokenizer(run)
    ds = open_dataset(root, cfg)
    eps = [e for e in ds.split("eval") if e.length >= 4]
    assert res["episodes"] == len(eps) > 0
    clips = np.stack([ds.read(e, (e.length - 4) // 2, (e.length - 4) // 2 + 4, ("frame",))["frame"] for e in eps])
    x = clips.astype(np.float32) / 255.0
    recon = np.clip(np.asarray(tok.decode(tok.encode(jnp.asarray(x))), np.float32), 0, 1)
    mse_EF = ((recon.astype(np.float64) - x) ** 2).mean(axis=(2, 3, 4))
    want = float(np.mean(10 * np.log10(1.0 / mse_EF)))
    a, b = res["rows"]
    assert abs(a["psnr_mean_per_frame"] - want) < 0.02, (a, want)
    assert b["diff_vs_first_db"] == 0.0 and b["diff_ci95"] == [0.0, 0.0]
    assert a["precision"] == cfg.tokenizer.train.precision and a["residual"] == cfg.tokenizer.train.residual

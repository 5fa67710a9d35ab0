"""Training and evaluation of the causal tokenizer on a dataset, on the shared runtime.

    dreamer4 train-tokenizer --config CFG --data DATASET_DIR --run RUN_DIR

writes RUN_DIR/tokenizer/: config.yaml, checkpoints/, metrics.jsonl, images/, eval.json.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dreamer4.config import Config, TokenizerConfig
from dreamer4.data.loader import window_source
from dreamer4.data.store import Dataset, DatasetError
from dreamer4.runtime.distributed import log0
from dreamer4.runtime.images import image_grid, psnr, psnr_from_mse, ssim
from dreamer4.runtime.loading import build_tokenizer
from dreamer4.runtime.lock import stage_lock
from dreamer4.runtime.stage import StageDir, open_dataset
from dreamer4.runtime.train_loop import Stage, loader_factory, train
from dreamer4.tokenizer.model import Tokenizer, sample_patch_mask

STAGE = "tokenizer"


def mse_loss(recon_BTHWC, frames_BTHWC):
    """L = mean over pixels of (x_hat - x)^2, frames in [0, 1]."""
    return jnp.mean((recon_BTHWC.astype(jnp.float32) - frames_BTHWC) ** 2)


def tokenizer_loss(model: Tokenizer, batch: dict, key: jax.Array, mask_prob_max: float = TokenizerConfig.mask_prob_max):
    """Masked-autoencoding loss: drop patches with per-image p ~ U(0, p_max), reconstruct all."""
    frames_BTHWC = batch["frames"].astype(jnp.float32) / 255.0
    B, T = frames_BTHWC.shape[:2]
    mask_BTP = sample_patch_mask(key, B, T, model.num_patches, mask_prob_max)
    recon_BTHWC = model(frames_BTHWC, mask_BTP)
    loss = mse_loss(recon_BTHWC, frames_BTHWC)
    return loss, {"mse": loss, "psnr": psnr_from_mse(loss), "mask_frac": mask_BTP.mean()}


def middle_clips(ds: Dataset, frames: int, max_episodes: int | None = None, key: str = "tokenizer.eval_frames"):
    """uint8 clips_EFHWC: F consecutive frames from the middle of each eval episode of >= F steps
    (the first `max_episodes` of them; all without it). `key` names F in the error when none is long enough."""
    eps = [e for e in ds.split("eval") if e.length >= frames][:max_episodes]
    if not eps:
        raise DatasetError(
            f"dataset {ds.root} has no eval episode of >= {key}={frames} steps "
            f"({len(ds.split('eval'))} eval episodes; collect.eval_fraction was {ds.manifest.get('eval_fraction')})"
        )
    start = [(e.length - frames) // 2 for e in eps]
    return np.stack([ds.read(e, s0, s0 + frames, ("frame",))["frame"] for e, s0 in zip(eps, start)])


def eval_frames(ds: Dataset, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Held-out clips and the train-set mean frame.

    Returns (frames_EFHWC uint8: F consecutive frames from the middle of each of E eval episodes,
    mean_frame_HWC float in [0, 1] over middle frames of up to 64 train episodes). The mean frame
    is the trivial baseline: the best constant prediction that has not seen the eval data.
    """
    clips = middle_clips(ds, cfg.tokenizer.eval_frames, cfg.tokenizer.eval_episodes)
    train = ds.split("train")[:64]
    sample = np.concatenate(
        [ds.read(e, e.length // 2, min(e.length, e.length // 2 + 8), ("frame",))["frame"] for e in train]
    )
    return clips, sample.astype(np.float32).mean(0) / 255.0


def evaluate_tokenizer(
    model: Tokenizer, frames_EFHWC: np.ndarray, mean_frame_HWC: np.ndarray
) -> tuple[dict, np.ndarray]:
    """PSNR/SSIM of whole-clip encode->decode on held-out frames, against two constant baselines:
    the train-set mean frame (the trivial baseline) and the eval clips' own mean (an oracle)."""
    x = jnp.asarray(frames_EFHWC, jnp.float32) / 255.0
    recon = jax.jit(lambda m, x: m.decode(m.encode(x)))(model, x)
    recon = jnp.clip(recon.astype(jnp.float32), 0.0, 1.0)
    train_mean = jnp.broadcast_to(jnp.asarray(mean_frame_HWC), x.shape)
    oracle_mean = jnp.broadcast_to(x.mean(axis=(0, 1), keepdims=True), x.shape)
    p = psnr(recon, x)  # (E, F)
    s = ssim(recon, x)
    out = {
        "eval_psnr": float(p.mean()),
        "eval_ssim": float(s.mean()),
        "eval_psnr_mean_frame_baseline": float(psnr(train_mean, x).mean()),
        "eval_ssim_mean_frame_baseline": float(ssim(train_mean, x).mean()),
        "eval_psnr_oracle_mean_baseline": float(psnr(oracle_mean, x).mean()),
    }
    out["eval_psnr_gain_over_baseline"] = out["eval_psnr"] - out["eval_psnr_mean_frame_baseline"]
    out.update({f"eval_psnr_t{t}": float(v) for t, v in enumerate(np.asarray(p.mean(0)))})
    n = min(8, x.shape[1])
    grid = image_grid(
        [np.asarray(x[0, :n]), np.asarray(recon[0, :n]), np.asarray(x[-1, :n]), np.asarray(recon[-1, :n])]
    )
    return out, grid


def train_tokenizer(cfg: Config, data_dir: str | Path, run_dir: str | Path) -> dict:
    stage = StageDir(run_dir, STAGE)
    with stage_lock(stage.lock_path, STAGE, log=log0):  # one writer per stage (runtime/lock.py)
        ds = open_dataset(data_dir, cfg)
        frame_shape = tuple(ds.frame_shape)
        # The training schedule may change on resume (e.g. more steps); the network may not.
        stage.check_network(cfg)
        if stage.has_model():
            stage.check_dataset(ds, stage.facts(), data_dir)
        tc = cfg.tokenizer.train
        model = build_tokenizer(cfg, frame_shape)
        frames, mean_frame = eval_frames(ds, cfg)

        def evaluate(m, step, logger):
            metrics, grid = evaluate_tokenizer(m, frames, mean_frame)
            logger.log_image(step, "recon_grid", grid)
            return metrics

        train(
            Stage(
                name=STAGE,
                stage_dir=stage.dir,
                cfg=cfg,
                train=tc,
                model=model,
                loss_fn=partial(tokenizer_loss, mask_prob_max=cfg.tokenizer.mask_prob_max),
                make_iterator=loader_factory(
                    window_source(data_dir, cfg, "train", tc.seq_len, seq_len_key="tokenizer.train.seq_len"),
                    cfg,
                    tc.batch_size,
                    batch_key="tokenizer.train.batch_size",
                ),
                prepare=lambda b, step: {"frames": b["frames"]},
                evaluate=evaluate,
                meta={"frame_shape": list(frame_shape), "data": str(data_dir)},
            )
        )
        return stage.results()

"""Training and evaluation of the causal tokenizer on a dataset, on the shared runtime.

    dreamer4 train-tokenizer --config CFG --data DATASET_DIR --run RUN_DIR

writes RUN_DIR/tokenizer/: config.yaml, checkpoints/, metrics.jsonl, images/, eval.json.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamer4.config import Config, ConfigError, load_config
from dreamer4.data.loader import make_loader
from dreamer4.data.store import Dataset, DatasetError
from dreamer4.runtime.images import image_grid, psnr, ssim
from dreamer4.runtime.train_loop import Stage, load_trained, stage_complete, train
from dreamer4.tokenizer.model import Tokenizer, sample_patch_mask

STAGE = "tokenizer"


def mse_loss(recon_BTHWC, frames_BTHWC):
    """L = mean over pixels of (x_hat - x)^2, frames in [0, 1]."""
    return jnp.mean((recon_BTHWC.astype(jnp.float32) - frames_BTHWC) ** 2)


def tokenizer_loss(model: Tokenizer, batch: dict, key: jax.Array):
    """Masked-autoencoding loss: drop patches with per-image p ~ U(0, p_max), reconstruct all."""
    frames_BTHWC = batch["frames"].astype(jnp.float32) / 255.0
    B, T = frames_BTHWC.shape[:2]
    mask_BTP = sample_patch_mask(key, B, T, model.num_patches, model.cfg.mask_prob_max)
    recon_BTHWC = model(frames_BTHWC, mask_BTP)
    loss = mse_loss(recon_BTHWC, frames_BTHWC)
    return loss, {"mse": loss, "psnr": 10.0 * jnp.log10(1.0 / jnp.maximum(loss, 1e-10)),
                  "mask_frac": mask_BTP.mean()}


def build_tokenizer(cfg: Config, frame_shape, seed: int | None = None) -> Tokenizer:
    dtype = jnp.bfloat16 if cfg.tokenizer.train.precision == "bf16" else jnp.float32
    return Tokenizer(cfg.tokenizer, tuple(frame_shape), rngs=nnx.Rngs(cfg.seed if seed is None else seed),
                     dtype=dtype)


def eval_frames(data_dir, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Held-out clips and the train-set mean frame.

    Returns (frames_EFHWC uint8: F consecutive frames from the middle of each of E eval episodes,
    mean_frame_HWC float in [0, 1] over middle frames of up to 64 train episodes). The mean frame
    is the trivial baseline: the best constant prediction that has not seen the eval data.
    """
    ds = Dataset.open(data_dir, env_name=cfg.env.name)
    F = cfg.tokenizer.eval_frames
    eps = [e for e in ds.split("eval") if e.length >= F][: cfg.tokenizer.eval_episodes]
    if not eps:
        raise DatasetError(f"dataset {data_dir} has no eval episode of >= tokenizer.eval_frames={F} steps")
    clips = np.stack([ds.read(e, (e.length - F) // 2, (e.length - F) // 2 + F, ("frame",))["frame"] for e in eps])
    train = ds.split("train")[:64]
    sample = np.concatenate([ds.read(e, e.length // 2, min(e.length, e.length // 2 + 8), ("frame",))["frame"]
                             for e in train])
    return clips, sample.astype(np.float32).mean(0) / 255.0


def evaluate_tokenizer(model: Tokenizer, frames_EFHWC: np.ndarray, mean_frame_HWC: np.ndarray
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
        "eval_psnr": float(p.mean()), "eval_ssim": float(s.mean()),
        "eval_psnr_mean_frame_baseline": float(psnr(train_mean, x).mean()),
        "eval_ssim_mean_frame_baseline": float(ssim(train_mean, x).mean()),
        "eval_psnr_oracle_mean_baseline": float(psnr(oracle_mean, x).mean()),
    }
    out["eval_psnr_gain_over_baseline"] = out["eval_psnr"] - out["eval_psnr_mean_frame_baseline"]
    out.update({f"eval_psnr_t{t}": float(v) for t, v in enumerate(np.asarray(p.mean(0)))})
    n = min(8, x.shape[1])
    grid = image_grid([np.asarray(x[0, :n]), np.asarray(recon[0, :n]),
                       np.asarray(x[-1, :n]), np.asarray(recon[-1, :n])])
    return out, grid


def check_frame_shape(data_dir, run_stage_dir: Path, expected) -> None:
    ds = Dataset.open(data_dir)
    if tuple(ds.frame_shape) != tuple(expected):
        raise DatasetError(
            f"dataset {data_dir} has frames of shape {tuple(ds.frame_shape)} but the tokenizer in "
            f"{run_stage_dir} is configured for {tuple(expected)}; use a dataset of the same env/frame size")


def train_tokenizer(cfg: Config, data_dir: str | Path, run_dir: str | Path) -> dict:
    stage_dir = Path(run_dir) / STAGE
    ds = Dataset.open(data_dir, env_name=cfg.env.name)
    frame_shape = tuple(ds.frame_shape)
    saved = stage_dir / "config.yaml"
    if saved.exists():
        prev = load_config(saved)
        # The training schedule may change on resume (e.g. more steps); the network may not.
        if dataclasses.replace(prev.tokenizer, train=cfg.tokenizer.train) != cfg.tokenizer:
            raise ConfigError(f"{saved} was written with another tokenizer network config than this run's; "
                              f"resume with the same tokenizer.* keys, or use a new --run directory")
    ckpt_meta = stage_dir / "model.json"
    if ckpt_meta.exists():
        meta = json.loads(ckpt_meta.read_text())
        check_frame_shape(data_dir, stage_dir, meta["frame_shape"])
    tc = cfg.tokenizer.train
    model = build_tokenizer(cfg, frame_shape)
    frames, mean_frame = eval_frames(data_dir, cfg)

    def evaluate(m, step, logger):
        metrics, grid = evaluate_tokenizer(m, frames, mean_frame)
        logger.log_image(step, "recon_grid", grid)
        return metrics

    stage_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        ckpt_meta.write_text(json.dumps({"frame_shape": list(frame_shape), "data": str(data_dir)}, indent=1))
    stage = Stage(
        name=STAGE, stage_dir=stage_dir, cfg=cfg, train=tc, model=model, loss_fn=tokenizer_loss,
        make_iterator=lambda: iter(make_loader(data_dir, cfg, "train", batch_size=tc.batch_size,
                                               seq_len=tc.seq_len, batch_key="tokenizer.train.batch_size",
                                               seq_len_key="tokenizer.train.seq_len")),
        prepare=lambda b, step: {"frames": b["frames"]},
        evaluate=evaluate, meta={"frame_shape": list(frame_shape)},
    )
    train(stage)
    return json.loads((stage_dir / "eval.json").read_text())


def load_tokenizer(run_dir: str | Path) -> tuple[Tokenizer, Config, tuple]:
    """The trained, frozen tokenizer of RUN_DIR with the config it was trained with."""
    stage_dir = Path(run_dir) / STAGE
    if not (stage_dir / "config.yaml").exists() or not (stage_dir / "model.json").exists():
        raise DatasetError(f"{stage_dir} holds no trained tokenizer (run `dreamer4 train-tokenizer` first)")
    cfg = load_config(stage_dir / "config.yaml")
    frame_shape = tuple(json.loads((stage_dir / "model.json").read_text())["frame_shape"])
    model = build_tokenizer(cfg, frame_shape)
    model, _ = load_trained(stage_dir, model)
    return model, cfg, frame_shape


def tokenizer_complete(cfg: Config, run_dir) -> bool:
    return stage_complete(Path(run_dir) / STAGE, cfg.tokenizer.train.steps)

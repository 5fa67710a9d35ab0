"""Training of the dynamics model on a dataset, with the frozen tokenizer of the same run.

    dreamer4 train-dynamics --config CFG --data DATASET_DIR --run RUN_DIR

The tokenizer is loaded from RUN_DIR/tokenizer with its own saved config and frozen: it lives in
the `WorldModel` next to the dynamics so that its weights are placed, sharded and checkpointed
with the run like any state, but the optimizer only trains variables under `dynamics`. Latents are
computed on the fly from uint8 frames inside the compiled step.

Writes RUN_DIR/dynamics/: config.yaml, checkpoints/, metrics.jsonl, images/, eval.json.
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
from dreamer4.dynamics.model import Dynamics
from dreamer4.dynamics.shortcut import shortcut_forcing_loss
from dreamer4.runtime.train_loop import Stage, load_trained, stage_complete, train
from dreamer4.tokenizer.model import Tokenizer
from dreamer4.tokenizer.train import load_tokenizer

STAGE = "dynamics"
# Only the dynamics' parameters are trained; the tokenizer inside the world model stays frozen.
TRAINABLE = nnx.All(nnx.Param, nnx.PathContains("dynamics"))


class WorldModel(nnx.Module):
    """The frozen tokenizer and the dynamics, as one module (one state, one checkpoint)."""

    def __init__(self, tokenizer: Tokenizer, dynamics: Dynamics):
        self.tokenizer = tokenizer
        self.dynamics = dynamics

    def latents(self, frames_BTHWC_uint8):
        """Clean tokenizer latents z1 of uint8 frames, with no gradient into the tokenizer."""
        return jax.lax.stop_gradient(self.tokenizer.encode(frames_BTHWC_uint8.astype(jnp.float32) / 255.0))


def build_dynamics(cfg: Config, tok_cfg: Config, num_actions: int, seed: int | None = None) -> Dynamics:
    L = tok_cfg.tokenizer.num_latents
    if L % cfg.dynamics.spatial_tokens:
        raise ConfigError(f"config key 'dynamics.spatial_tokens' ({cfg.dynamics.spatial_tokens}) must divide the "
                          f"run's tokenizer.num_latents ({L})")
    dtype = jnp.bfloat16 if cfg.dynamics.train.precision == "bf16" else jnp.float32
    return Dynamics(cfg.dynamics, tok_cfg.tokenizer.num_latents, tok_cfg.tokenizer.latent_dim, num_actions,
                    rngs=nnx.Rngs(cfg.seed + 1 if seed is None else seed), dtype=dtype)


def split_images(x, n_img: int):
    """(B, T, ...) -> sequences (B - n_img, T, ...) and single images (n_img * T, 1, ...)."""
    seq, img = x[: x.shape[0] - n_img], x[x.shape[0] - n_img:]
    return seq, img.reshape((img.shape[0] * img.shape[1], 1) + img.shape[2:])


def make_dynamics_loss(cfg: Config):
    dc = cfg.dynamics

    def loss_fn(world: WorldModel, batch: dict, key):
        """Shortcut forcing on sequences, plus the single-image share (start frames)."""
        z1 = world.latents(batch["frames"])
        B, T = z1.shape[:2]
        n_img = int(round(B * dc.single_image_share)) if T > 1 else 0
        k_seq, k_img = jax.random.split(key)
        split = [split_images(x, n_img) for x in (z1, batch["actions"], batch["action_mask"])]
        parts = []
        for i, (k, name) in enumerate(((k_seq, "seq"), (k_img, "img"))):
            z, a, m = (x[i] for x in split)
            if z.shape[0] == 0:
                continue
            predict = (lambda a_, m_: lambda z_, tau, d: world.dynamics(z_, tau, d, a_, m_))(a, m)
            loss, metrics = shortcut_forcing_loss(predict, z, k, dc.k_max)
            parts.append((loss, metrics, z.shape[0] * z.shape[1], name))
        total = sum(n for _, _, n, _ in parts)
        loss = sum(l * n for l, _, n, _ in parts) / total
        out = {f"{name}_{k}": v for _, m, _, name in parts for k, v in m.items()}
        out["action_label_frac"] = batch["action_mask"].mean()
        return loss, out

    return loss_fn


def make_prepare(cfg: Config):
    dc = cfg.dynamics

    def prepare(batch: dict, step: int) -> dict:
        out = {"frames": batch["frames"], "actions": batch["actions"], "action_mask": batch["action_mask"]}
        if dc.short_seq_len and step % 2 == 0:  # alternate short and long batches
            out = {k: v[:, : dc.short_seq_len] for k, v in out.items()}
        return out

    return prepare


def check_run_tokenizer(run_dir: Path, data_dir, cfg: Config):
    tokenizer, tok_cfg, frame_shape = load_tokenizer(run_dir)
    ds = Dataset.open(data_dir, env_name=cfg.env.name)
    if tuple(ds.frame_shape) != tuple(frame_shape):
        raise DatasetError(f"dataset {data_dir} has frames of shape {tuple(ds.frame_shape)} but the tokenizer "
                           f"in {run_dir / 'tokenizer'} was trained on {tuple(frame_shape)}")
    return tokenizer, tok_cfg, frame_shape, ds


def train_dynamics(cfg: Config, data_dir: str | Path, run_dir: str | Path, evaluate: bool = True) -> dict:
    run_dir = Path(run_dir)
    stage_dir = run_dir / STAGE
    saved = stage_dir / "config.yaml"
    if saved.exists():
        prev = load_config(saved)
        if dataclasses.replace(prev.dynamics, train=cfg.dynamics.train) != cfg.dynamics:
            raise ConfigError(f"{saved} was written with another dynamics network config than this run's; "
                              f"resume with the same dynamics.* keys, or use a new --run directory")
    tokenizer, tok_cfg, frame_shape, ds = check_run_tokenizer(run_dir, data_dir, cfg)
    dynamics = build_dynamics(cfg, tok_cfg, ds.num_actions)
    world = WorldModel(tokenizer, dynamics)
    tc = cfg.dynamics.train
    stage_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (stage_dir / "model.json").write_text(json.dumps(
            {"frame_shape": list(frame_shape), "num_actions": ds.num_actions, "data": str(data_dir)}, indent=1))

    eval_hook = None
    if evaluate:
        from dreamer4.dynamics.evaluate import open_loop_eval_hook

        eval_hook = open_loop_eval_hook(cfg, data_dir)
    stage = Stage(
        name=STAGE, stage_dir=stage_dir, cfg=cfg, train=tc, model=world, loss_fn=make_dynamics_loss(cfg),
        make_iterator=lambda: iter(make_loader(data_dir, cfg, "train", batch_size=tc.batch_size,
                                               seq_len=tc.seq_len, batch_key="dynamics.train.batch_size",
                                               seq_len_key="dynamics.train.seq_len")),
        prepare=make_prepare(cfg), evaluate=eval_hook, trainable=TRAINABLE,
        meta={"frame_shape": list(frame_shape), "num_actions": ds.num_actions},
    )
    train(stage)
    p = stage_dir / "eval.json"
    return json.loads(p.read_text()) if p.exists() else {}


def load_world_model(run_dir: str | Path) -> tuple[WorldModel, Config, dict]:
    """The trained world model of RUN_DIR (tokenizer + dynamics) with the dynamics stage config."""
    run_dir = Path(run_dir)
    stage_dir = run_dir / STAGE
    if not (stage_dir / "model.json").exists():
        raise DatasetError(f"{stage_dir} holds no trained dynamics (run `dreamer4 train-dynamics` first)")
    cfg = load_config(stage_dir / "config.yaml")
    info = json.loads((stage_dir / "model.json").read_text())
    tokenizer, tok_cfg, _ = load_tokenizer(run_dir)
    world = WorldModel(tokenizer, build_dynamics(cfg, tok_cfg, info["num_actions"]))
    world, _ = load_trained(stage_dir, world, trainable=TRAINABLE)
    return world, cfg, info


def dynamics_complete(cfg: Config, run_dir) -> bool:
    return stage_complete(Path(run_dir) / STAGE, cfg.dynamics.train.steps)

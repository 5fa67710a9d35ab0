"""Training of the dynamics model on a dataset, with the frozen tokenizer of the same run.

    dreamer4 train-dynamics --config CFG --data DATASET_DIR --run RUN_DIR

The tokenizer is loaded from RUN_DIR/tokenizer with its own saved config and frozen: it lives in
the `WorldModel` next to the dynamics so that its weights are placed, sharded and checkpointed
with the run like any state, but the optimizer only trains variables under `dynamics`. Latents are
encoded once per training window before the first step (RUN_DIR/latents: dynamics/latent_cache.py)
or, with `dynamics.latent_cache: false`, from uint8 frames inside every compiled step.

Writes RUN_DIR/dynamics/: config.yaml, checkpoints/, metrics.jsonl, images/, eval.json.
"""

from __future__ import annotations

from pathlib import Path

import jax

from dreamer4.config import Config
from dreamer4.data.loader import window_source
from dreamer4.dynamics.evaluate import open_loop_eval_hook
from dreamer4.dynamics.latent_cache import build_latent_cache
from dreamer4.dynamics.model import WorldModel, batch_latents, observed
from dreamer4.dynamics.shortcut import shortcut_forcing_loss
from dreamer4.runtime.distributed import log0
from dreamer4.runtime.loading import TRAINABLE, build_dynamics, load_tokenizer
from dreamer4.runtime.lock import stage_lock
from dreamer4.runtime.stage import StageDir, open_dataset
from dreamer4.runtime.train_loop import Stage, loader_factory, train

STAGE = "dynamics"


def split_images(x, n_img: int):
    """(B, T, ...) -> sequences (B - n_img, T, ...) and single images (n_img * T, 1, ...)."""
    seq, img = x[: x.shape[0] - n_img], x[x.shape[0] - n_img :]
    return seq, img.reshape((img.shape[0] * img.shape[1], 1) + img.shape[2:])


def make_dynamics_loss(cfg: Config):
    dc = cfg.dynamics

    def loss_fn(world: WorldModel, batch: dict, key):
        """Shortcut forcing on sequences, plus the single-image share (start frames)."""
        z1 = batch_latents(world, batch)  # from the latent cache (dynamics.latent_cache) or encoded here
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
            loss, metrics = shortcut_forcing_loss(
                predict,
                z,
                k,
                dc.k_max,
                flow_share=dc.flow_share,
                context_prob=dc.context_prob,
                context_tau=dc.context_tau,
                ramp=dc.ramp_weight,
            )
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
        out = {**observed(batch), "actions": batch["actions"], "action_mask": batch["action_mask"]}
        if dc.short_seq_len and step % 2 == 0:  # alternate short and long batches
            out = {k: v[:, : dc.short_seq_len] for k, v in out.items()}
        return out

    return prepare


def train_dynamics(cfg: Config, data_dir: str | Path, run_dir: str | Path, evaluate: bool = True) -> dict:
    stage = StageDir(run_dir, STAGE)
    with stage_lock(stage.lock_path, STAGE, log=log0):  # one writer per stage (runtime/lock.py)
        stage.check_network(cfg)
        tokenizer, tok_cfg, frame_shape = load_tokenizer(run_dir)
        ds = open_dataset(data_dir, cfg)
        StageDir(run_dir, "tokenizer").check_dataset(ds, {"frame_shape": frame_shape}, data_dir)
        world = WorldModel(tokenizer, build_dynamics(cfg, tok_cfg, ds.num_actions, latent_grid=tokenizer.latent_grid))
        tc = cfg.dynamics.train
        source = window_source(data_dir, cfg, "train", tc.seq_len, seq_len_key="dynamics.train.seq_len")
        if cfg.dynamics.latent_cache:
            source = build_latent_cache(tokenizer, source, Path(run_dir) / "latents", tc.batch_size, log=log0)
        train(
            Stage(
                name=STAGE,
                stage_dir=stage.dir,
                cfg=cfg,
                train=tc,
                model=world,
                loss_fn=make_dynamics_loss(cfg),
                make_iterator=loader_factory(source, cfg, tc.batch_size, batch_key="dynamics.train.batch_size"),
                prepare=make_prepare(cfg),
                evaluate=open_loop_eval_hook(cfg, ds) if evaluate else None,
                trainable=TRAINABLE[STAGE],
                meta={"frame_shape": list(frame_shape), "num_actions": ds.num_actions, "data": str(data_dir)},
            )
        )
        return stage.results()

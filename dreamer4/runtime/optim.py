"""The optimiser of every dataset-driven training stage: clip_by_global_norm -> AdamW with linear
warm-up and cosine decay. Loading builds the same optimizer skeleton to restore a checkpoint."""

from __future__ import annotations

import optax

from dreamer4.config import TrainConfig


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.lr,
        warmup_steps=min(tc.warmup_steps, max(tc.steps - 1, 1)),
        decay_steps=max(tc.steps, 2),
        end_value=tc.lr * 0.1,
    )
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip), optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay)
    )

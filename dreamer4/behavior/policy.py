"""A trained PPO checkpoint as a collection policy: `collect.policy=ppo:CHECKPOINT`.

CHECKPOINT is a run directory (RUN_DIR, holding behavior/checkpoints/), the stage directory
(RUN_DIR/behavior), its checkpoints/ directory (all three mean: the latest checkpoint), or one
checkpoint step directory (RUN_DIR/behavior/checkpoints/<update>) to pick an earlier stage of
training. The kind "ppo" is listed in the policy registry, `data/policies.py`.

The policy keeps its frame stack as its state (reset to the episode's first frame on is_first)
and samples from its categorical distribution, as it did in training.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from dreamer4.behavior.model import push_frame
from dreamer4.behavior.train import PPO, _from_saved, _to_saved, abstract_runner
from dreamer4.config import ConfigError, from_dict
from dreamer4.data.behavior import BehaviorPolicy
from dreamer4.data.env import EnvSpec, make_env
from dreamer4.runtime.checkpoint import Checkpointer
from dreamer4.runtime.stage import CHECKPOINTS, StageDir


def resolve_checkpoint(path: str | Path) -> tuple[Path, int]:
    """(checkpoints directory, step) that a CHECKPOINT spec names; ConfigError when there is none."""
    p = Path(path)
    where = f"collect policy 'ppo:{path}'"
    if p.name.isdigit() and p.parent.name == "checkpoints":
        if not p.is_dir():
            raise ConfigError(f"{where}: checkpoint step directory {p} does not exist")
        return p.parent, int(p.name)
    for d in (StageDir(p, "behavior").checkpoints, p / CHECKPOINTS, p):
        if d.is_dir():
            steps = sorted(int(c.name) for c in d.iterdir() if c.is_dir() and c.name.isdigit())
            if steps:
                return d, steps[-1]
    raise ConfigError(
        f"{where}: no PPO checkpoint found at {p} (expected a run directory holding "
        f"behavior/checkpoints/<update>/ from `dreamer4 train-behavior`, or one such step directory)"
    )


def load_ppo(path: str | Path, env_spec: EnvSpec | None = None):
    """(graphdef, params, behavior config, meta) of a PPO checkpoint, checked against `env_spec`."""
    ckpt_dir, step = resolve_checkpoint(path)
    ck = Checkpointer(ckpt_dir, async_save=False)
    try:
        meta = ck.restore_meta(step)
        cfg = from_dict(meta["config"])
        if env_spec is not None and (
            meta["env"] != env_spec.name
            or tuple(meta["frame_shape"]) != env_spec.frame_shape
            or meta["num_actions"] != env_spec.num_actions
        ):
            raise ConfigError(
                f"collect policy 'ppo:{path}': the checkpoint was trained on env {meta['env']!r} with frames "
                f"{tuple(meta['frame_shape'])} and {meta['num_actions']} actions, but this collection uses "
                f"env {env_spec.name!r} with frames {env_spec.frame_shape} and {env_spec.num_actions} actions"
            )
        env, env_params, spec = make_env(cfg.env.name)
        fns = PPO(cfg, env, env_params, spec)
        like = abstract_runner(fns, cfg.seed)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _to_saved(like))
        saved, _ = ck.restore(target, step)
        params = _from_saved(saved, like)["params"]
    finally:
        ck.close()
    return fns.graphdef, params, cfg.behavior, meta


def ppo_policy(path: str, env_spec: EnvSpec, collect_cfg) -> BehaviorPolicy:
    graphdef, params, b, meta = load_ppo(path, env_spec)
    H, W, C = env_spec.frame_shape

    def init(num_envs: int):
        return jnp.zeros((num_envs, H, W, C * b.frame_stack), jnp.uint8)

    def act(stack_NHWCK, key, frames_NHWC, is_first_N):
        stack_NHWCK = push_frame(stack_NHWCK, frames_NHWC, is_first_N)
        logits_NA, _ = nnx.merge(graphdef, params)(stack_NHWCK)
        return jax.random.categorical(key, logits_NA).astype(jnp.int32), stack_NHWCK

    return BehaviorPolicy("ppo", init, act)

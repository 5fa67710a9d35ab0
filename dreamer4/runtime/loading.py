"""Building the models of a run from their configs, and loading trained ones from a run directory.

This layer sits below training and evaluation: both import it, it imports neither. A model is
assembled from explicit parts (model modules: tokenizer/model.py, dynamics/model.py,
policy/heads.py) with only the network part of its stage's config; what it was trained on (frame
shape, action count, dataset) comes from the stage's checkpoint meta (runtime/stage.py).

    tokenizer, tok_cfg, frame_shape = load_tokenizer(run_dir)
    world, world_cfg, facts = load_world_model(run_dir)      # tokenizer + dynamics
    agent, world_cfg, facts = load_agent(run_dir, "agent")   # or "agent_bc"

`TRAINABLE` says, per stage, which parameters the optimizer trains; checkpoints hold (model,
optimizer), so loading needs the same filter to rebuild the optimizer skeleton it restores into.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from dreamer4.config import Config, ConfigError, TrainConfig
from dreamer4.dynamics.model import Dynamics, WorldModel
from dreamer4.policy.heads import Agent
from dreamer4.runtime.checkpoint import Checkpointer
from dreamer4.runtime.distributed import log0
from dreamer4.runtime.mesh import make_mesh
from dreamer4.runtime.optim import make_optimizer
from dreamer4.runtime.stage import CHECKPOINTS, StageDir
from dreamer4.tokenizer.model import Tokenizer

TRAINABLE = {
    "tokenizer": nnx.Param,
    # Only the dynamics' parameters are trained; the tokenizer inside the world model stays frozen.
    "dynamics": nnx.All(nnx.Param, nnx.PathContains("dynamics")),
    # BC trains the world model's dynamics with the new agent parts; never the tokenizer, the prior
    # (a later copy of the policy) or the value head (it only learns in imagination).
    "agent_bc": nnx.All(
        nnx.Param, nnx.Not(nnx.Any(nnx.PathContains("tokenizer"), nnx.PathContains("prior"), nnx.PathContains("value")))
    ),
    # Imagination trains the policy and value heads only: transformer, reward head and prior frozen.
    "agent": nnx.All(nnx.Param, nnx.Any(nnx.PathContains("policy"), nnx.PathContains("value"))),
}


def _dtype(tc: TrainConfig):
    return jnp.bfloat16 if tc.precision == "bf16" else jnp.float32


def _stream_dtype(tc: TrainConfig):
    """The residual stream's dtype: the compute dtype with `residual: compute`, else None (float32)."""
    return _dtype(tc) if tc.residual == "compute" else None


# ----------------------------------------------------------------------------- building
def build_tokenizer(cfg: Config, frame_shape, seed: int | None = None) -> Tokenizer:
    return Tokenizer(
        cfg.tokenizer.net,
        tuple(frame_shape),
        rngs=nnx.Rngs(cfg.seed if seed is None else seed),
        dtype=_dtype(cfg.tokenizer.train),
        stream_dtype=_stream_dtype(cfg.tokenizer.train),
    )


def build_dynamics(
    cfg: Config, tok_cfg: Config, num_actions: int, seed: int | None = None, latent_grid=None
) -> Dynamics:
    """The dynamics of `cfg` over the latents of the tokenizer configured by `tok_cfg` (whose
    `Tokenizer.latent_grid` is `latent_grid`)."""
    L = tok_cfg.tokenizer.num_latents
    if L % cfg.dynamics.spatial_tokens:
        raise ConfigError(
            f"config key 'dynamics.spatial_tokens' ({cfg.dynamics.spatial_tokens}) must divide the "
            f"run's tokenizer.num_latents ({L})"
        )
    return Dynamics(
        cfg.dynamics.net,
        L,
        tok_cfg.tokenizer.latent_dim,
        num_actions,
        latent_grid=latent_grid,
        rngs=nnx.Rngs(cfg.seed + 1 if seed is None else seed),
        dtype=_dtype(cfg.dynamics.train),
        stream_dtype=_stream_dtype(cfg.dynamics.train),
    )


def build_agent(cfg: Config, world: WorldModel, num_actions: int) -> Agent:
    """`world` with fresh agent tokens and heads (the agent network of `cfg`)."""
    return Agent(world, cfg.agent.net, num_actions, rngs=nnx.Rngs(cfg.seed + 2))


# ----------------------------------------------------------------------------- loading
def load_trained(
    stage_dir: str | Path, model: nnx.Module, step: int | None = None, trainable=nnx.Param
) -> tuple[nnx.Module, dict]:
    """Load the model weights of a stage's checkpoint (default: the newest that restores; a damaged
    newer one is moved aside, runtime/checkpoint.py) into `model`, in place.

    Checkpoints hold (model, optimizer); the optimizer part is restored into a throw-away skeleton.
    The weights come back replicated over all devices of all processes (every process must call
    this), whatever mesh saved them; a training stage then reshards them onto its own mesh.
    """
    ckpt = Checkpointer(Path(stage_dir) / CHECKPOINTS, async_save=False)
    try:
        _, full = nnx.split((model, nnx.Optimizer(model, make_optimizer(TrainConfig()), wrt=trainable)))
        replicated = jax.sharding.NamedSharding(make_mesh(), jax.sharding.PartitionSpec())
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), full)
        if step is None:  # the newest checkpoint that restores (damaged newer ones are moved aside)
            found = ckpt.restore_latest_good(target, log=log0)
            if found is None:
                raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
            _, state, meta = found
        else:
            state, meta = ckpt.restore(target, step)
        nnx.update(model, state[0])
    finally:
        ckpt.close()
    return model, meta


def load_tokenizer(run_dir: str | Path) -> tuple[Tokenizer, Config, tuple]:
    """The trained, frozen tokenizer of RUN_DIR with the config it was trained with, and its frame shape."""
    stage = StageDir(run_dir, "tokenizer")
    frame_shape = tuple(stage.facts()["frame_shape"])
    cfg = stage.trained_config()
    model = build_tokenizer(cfg, frame_shape)
    model, _ = load_trained(stage.dir, model, trainable=TRAINABLE["tokenizer"])
    return model, cfg, frame_shape


def load_world_model(run_dir: str | Path) -> tuple[WorldModel, Config, dict]:
    """The trained world model of RUN_DIR (tokenizer + dynamics), the dynamics stage's config and
    its model facts (frame_shape, num_actions, data)."""
    stage = StageDir(run_dir, "dynamics")
    facts = stage.facts()
    cfg = stage.trained_config()
    tokenizer, tok_cfg, _ = load_tokenizer(run_dir)
    world = WorldModel(tokenizer, build_dynamics(cfg, tok_cfg, facts["num_actions"], latent_grid=tokenizer.latent_grid))
    world, _ = load_trained(stage.dir, world, trainable=TRAINABLE["dynamics"])
    return world, cfg, facts


def fresh_agent(cfg: Config, run_dir: str | Path) -> tuple[Agent, Config, dict]:
    """The trained world model of RUN_DIR with fresh agent tokens and heads; (agent, world cfg, world facts)."""
    world, wcfg, facts = load_world_model(run_dir)
    return build_agent(cfg, world, facts["num_actions"]), wcfg, facts


def load_agent(run_dir: str | Path, stage_name: str = "agent") -> tuple[Agent, Config, dict]:
    """The agent of RUN_DIR/<stage_name> (agent_bc or agent) with its weights; (agent, world cfg, world facts)."""
    stage = StageDir(run_dir, stage_name)
    cfg = stage.trained_config()
    agent, wcfg, facts = fresh_agent(cfg, run_dir)
    agent, _ = load_trained(stage.dir, agent, trainable=TRAINABLE[stage_name])
    return agent, wcfg, facts

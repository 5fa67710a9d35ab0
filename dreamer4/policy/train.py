"""Training of the agent: behaviour cloning + reward model, then RL in imagination (sec. 3.3).

    dreamer4 train-agent --config CFG --data DATASET_DIR --run RUN_DIR [--phase bc|imagine|all]

Phase bc  (RUN_DIR/agent_bc/): the world model of RUN_DIR/dynamics gets agent tokens and heads.
  Trained: dynamics transformer + task embedding + policy and reward heads (the tokenizer stays
  frozen). Loss = video_weight * shortcut forcing (the video loss continues, on every episode)
  + bc_weight * BC with MTP (labeled actions only: unlabeled episodes deliver none)
  + reward_weight * reward two-hot with MTP (every episode). The agent outputs come from the
  main shortcut-forcing pass, so, as in the paper, the agent reads noisy representations.
Phase imagine  (RUN_DIR/agent/): starts from the BC weights; the policy head is copied into a
  frozen prior; only the policy and value heads train. Each batch element is one dataset
  context of agent.context_len steps, from which ONE rollout of agent.horizon steps is imagined
  with the policy's own actions (policy/imagine.py); rewards come from the reward head, values
  from the value head, then lambda-returns, value TD loss and PMPO with the reverse KL to the
  prior (policy/losses.py). There is no continuation head: imagined episodes never terminate.
Both phases run through the shared runtime (runtime/train_loop.py), so each is resumable.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamer4.config import Config, load_config
from dreamer4.data.loader import make_loader
from dreamer4.data.store import Dataset, DatasetError
from dreamer4.dynamics.shortcut import shortcut_forcing_loss
from dreamer4.dynamics.train import load_world_model
from dreamer4.policy.heads import Agent, freeze_prior
from dreamer4.policy.imagine import imagine_rollout
from dreamer4.policy.losses import (bc_mtp_loss, lambda_returns, pmpo_loss, reverse_kl, reward_mtp_loss,
                                    value_loss)
from dreamer4.runtime.train_loop import Stage, load_trained, stage_complete, train

STAGE_BC, STAGE_IMAGINE = "agent_bc", "agent"
PHASES = ("bc", "imagine", "all")
# BC trains the world model's dynamics with the new agent parts; never the tokenizer, the prior
# (a later copy of the policy) or the value head (it only learns in imagination).
TRAINABLE_BC = nnx.All(nnx.Param, nnx.Not(nnx.Any(nnx.PathContains("tokenizer"), nnx.PathContains("prior"),
                                                  nnx.PathContains("value"))))
# Imagination trains the policy and value heads only: transformer, reward head and prior frozen.
TRAINABLE_IMAGINE = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("policy"), nnx.PathContains("value")))
TRAINABLE = {STAGE_BC: TRAINABLE_BC, STAGE_IMAGINE: TRAINABLE_IMAGINE}


def build_agent(cfg: Config, run_dir) -> tuple[Agent, Config, dict]:
    """The trained world model of RUN_DIR with fresh agent tokens and heads."""
    world, wcfg, info = load_world_model(run_dir)
    agent = Agent(world, cfg.agent, info["num_actions"], rngs=nnx.Rngs(cfg.seed + 2))
    return agent, wcfg, info


def make_bc_loss(cfg: Config, k_max: int):
    ac = cfg.agent

    def loss_fn(agent: Agent, batch: dict, key):
        z1 = agent.world.latents(batch["frames"])
        a, m = batch["actions"], batch["action_mask"]
        task = jnp.zeros(a.shape, jnp.int32)
        main = {}

        def predict(z, tau, d):
            z1_hat, h = agent(z, tau, d, a, m, task)
            main.setdefault("h", h)  # shortcut forcing calls the main (graded) pass first
            return z1_hat

        video, vm = shortcut_forcing_loss(predict, z1, key, k_max)
        h = main["h"]
        pol = agent.policy(h)
        bc, bc_per = bc_mtp_loss(pol, a, m)
        rew, rew_per = reward_mtp_loss(agent.reward(h), batch["rewards"], agent.bins)
        loss = ac.video_weight * video + ac.bc_weight * bc + ac.reward_weight * rew
        # next-action accuracy on labeled targets (distance 1)
        nxt_m = m[:, 1:].astype(jnp.float32)
        acc = jnp.sum((jnp.argmax(pol[:, :-1, 0], -1) == a[:, 1:]) * nxt_m) / jnp.maximum(nxt_m.sum(), 1.0)
        metrics = {"video": video, "bc": bc, "bc_next": bc_per[0], "bc_next_acc": acc, "reward": rew,
                   "reward_now": rew_per[0], "action_label_frac": m.mean(), **vm}
        return loss, metrics

    return loss_fn


def imagine_terms(agent: Agent, roll: dict, cfg: Config):
    """Losses on one batch of imagined rollouts; the heads are the only thing with gradients."""
    ac = cfg.agent
    h = roll["h"]  # B H+1 D
    r = jax.lax.stop_gradient(agent.reward_now(h))  # r[:, i] = reward on arriving at step i
    v_logits = agent.value_logits(h)
    v = jax.lax.stop_gradient(agent.value_now(h))
    R = lambda_returns(r, v, jnp.ones_like(r), ac.gamma, ac.lam)  # B H
    v_loss = value_loss(v_logits[:, :-1], R, agent.bins)
    logits = agent.policy_logits(h[:, :-1])
    logp_all = jax.nn.log_softmax(logits, -1)
    logp = jnp.take_along_axis(logp_all, roll["actions"][..., None], -1)[..., 0]
    kl = reverse_kl(logits, agent.policy_logits(h[:, :-1], prior=True))
    p_loss, pm = pmpo_loss(logp.reshape(-1), (R - v[:, :-1]).reshape(-1), kl.reshape(-1), ac.pmpo_alpha,
                           ac.pmpo_beta)
    metrics = {"policy": p_loss, "value": v_loss, "imagined_reward_sum": r[:, 1:].sum(1).mean(),
               "return_mean": R.mean(), "value_mean": v.mean(),
               "entropy": -jnp.sum(jnp.exp(logp_all) * logp_all, -1).mean(), **pm}
    return p_loss + v_loss, metrics


def make_imagine_loss(cfg: Config, sample_steps: int):
    ac = cfg.agent

    def loss_fn(agent: Agent, batch: dict, key):
        # The rollout reads a gradient-free copy of the agent: nothing is differentiated through it.
        graphdef, state = nnx.split(agent)
        frozen = nnx.merge(graphdef, jax.lax.stop_gradient(state))
        z_ctx = frozen.world.latents(batch["frames"])
        task = jnp.zeros((z_ctx.shape[0],), jnp.int32)
        roll = imagine_rollout(frozen, z_ctx, batch["actions"], batch["action_mask"], task, key, ac.horizon,
                               sample_steps)
        return imagine_terms(agent, roll, cfg)

    return loss_fn


def _check_data(run_dir: Path, data_dir, cfg: Config, info: dict) -> Dataset:
    ds = Dataset.open(data_dir, env_name=cfg.env.name)
    if list(ds.frame_shape) != list(info["frame_shape"]) or ds.num_actions != info["num_actions"]:
        raise DatasetError(f"dataset {data_dir} (frames {tuple(ds.frame_shape)}, {ds.num_actions} actions) does not "
                           f"match the world model in {run_dir / 'dynamics'} (frames {tuple(info['frame_shape'])}, "
                           f"{info['num_actions']} actions)")
    return ds


def _write_model_json(stage_dir: Path, info: dict, data_dir) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (stage_dir / "model.json").write_text(json.dumps({**info, "data": str(data_dir)}, indent=1))


def train_bc(cfg: Config, data_dir, run_dir) -> Agent:
    run_dir = Path(run_dir)
    agent, wcfg, info = build_agent(cfg, run_dir)
    _check_data(run_dir, data_dir, cfg, info)
    tc = cfg.agent.bc
    stage_dir = run_dir / STAGE_BC
    _write_model_json(stage_dir, info, data_dir)

    def prepare(batch, step):
        return {k: batch[k] for k in ("frames", "actions", "action_mask", "rewards")}

    stage = Stage(name=STAGE_BC, stage_dir=stage_dir, cfg=cfg, train=tc, model=agent,
                  loss_fn=make_bc_loss(cfg, wcfg.dynamics.k_max),
                  make_iterator=lambda: iter(make_loader(data_dir, cfg, "train", batch_size=tc.batch_size,
                                                         seq_len=tc.seq_len, batch_key="agent.bc.batch_size",
                                                         seq_len_key="agent.bc.seq_len")),
                  prepare=prepare, trainable=TRAINABLE_BC, meta={"phase": "bc", **info})
    return train(stage)


def train_imagine(cfg: Config, data_dir, run_dir) -> Agent:
    run_dir = Path(run_dir)
    agent, wcfg, info = load_agent(run_dir, STAGE_BC)
    # The run's agent config keeps the network shape of the BC stage; training keys come from cfg.
    _check_data(run_dir, data_dir, cfg, info)
    freeze_prior(agent)
    tc = cfg.agent.imagine
    stage_dir = run_dir / STAGE_IMAGINE
    _write_model_json(stage_dir, info, data_dir)
    C = cfg.agent.context_len

    def prepare(batch, step):
        return {k: batch[k][:, :C] for k in ("frames", "actions", "action_mask")}

    stage = Stage(name=STAGE_IMAGINE, stage_dir=stage_dir, cfg=cfg, train=tc, model=agent,
                  loss_fn=make_imagine_loss(cfg, wcfg.dynamics.sample_steps),
                  make_iterator=lambda: iter(make_loader(data_dir, cfg, "train", batch_size=tc.batch_size,
                                                         seq_len=C, batch_key="agent.imagine.batch_size",
                                                         seq_len_key="agent.context_len")),
                  prepare=prepare, trainable=TRAINABLE_IMAGINE, meta={"phase": "imagine", **info})
    return train(stage)


def load_agent(run_dir, stage: str = STAGE_IMAGINE) -> tuple[Agent, Config, dict]:
    """The agent of RUN_DIR/<stage> (agent_bc or agent) with its weights; returns (agent, world cfg, info)."""
    run_dir = Path(run_dir)
    stage_dir = run_dir / stage
    if not (stage_dir / "checkpoints").is_dir():
        raise DatasetError(f"{stage_dir} holds no trained agent (run `dreamer4 train-agent` first)")
    cfg = load_config(stage_dir / "config.yaml")
    agent, wcfg, info = build_agent(cfg, run_dir)
    agent, _ = load_trained(stage_dir, agent, trainable=TRAINABLE[stage])
    return agent, wcfg, info


def agent_complete(cfg: Config, run_dir, phase: str = "all") -> bool:
    run_dir = Path(run_dir)
    bc = stage_complete(run_dir / STAGE_BC, cfg.agent.bc.steps)
    im = stage_complete(run_dir / STAGE_IMAGINE, cfg.agent.imagine.steps)
    return {"bc": bc, "imagine": im, "all": bc and im}[phase]


def train_agent(cfg: Config, data_dir, run_dir, phase: str = "all") -> dict:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    run_dir = Path(run_dir)
    if phase in ("bc", "all"):
        if stage_complete(run_dir / STAGE_BC, cfg.agent.bc.steps):
            print(f"[{STAGE_BC}] complete, skipped")
        else:
            train_bc(cfg, data_dir, run_dir)
    if phase in ("imagine", "all"):
        train_imagine(cfg, data_dir, run_dir)
    return {}

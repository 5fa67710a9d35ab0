"""Training of the agent: behaviour cloning + reward model, then RL in imagination (sec. 3.3).

    dreamer4 train-agent --config CFG --data DATASET_DIR --run RUN_DIR [--phase bc|imagine|all]

Phase bc  (RUN_DIR/agent_bc/): the world model of RUN_DIR/dynamics gets agent tokens and heads.
  Trained: dynamics transformer + task embedding + policy and reward heads (the tokenizer stays
  frozen). Loss = video_weight * shortcut forcing (the video loss continues, on every episode)
  + bc_weight * BC with MTP (labeled actions only: unlabeled episodes deliver none)
  + reward_weight * (reward two-hot with MTP + the state heads' reward and continuation losses,
  every episode), each term divided by a running
  estimate of its RMS (agent.loss_norm, nn/loss_norm.py) so that the video loss keeps its weight.
  The policy and reward heads read a second pass whose frames are all at dynamics.context_tau, the
  level the agent acts at (agent.head_signal = "context"; "train" reads the shortcut-forcing pass
  at random noise levels as the paper does). With dynamics.latent_cache it trains on the cached
  latents of RUN_DIR/latents (the dynamics stage's cache when the windows are the same).
Phase imagine  (RUN_DIR/agent/): starts from the BC weights; the policy head is copied into a
  frozen prior; only the policy and value heads train. Each batch element is one dataset
  context of agent.context_len steps, from which ONE rollout of agent.horizon steps is imagined
  with the policy's own actions (policy/imagine.py); rewards come from the reward head, values
  from the value head, then lambda-returns, value TD loss and PMPO with the reverse KL to the
  prior (policy/losses.py). Rewards and continuation come from the state heads on consecutive
  imagined latents (no action token: agent.reward_source), imagined deaths end the returns and
  down-weight later states (agent.continuation), the first agent.critic_warmup updates train only
  the value head, and advantages are centred per batch before PMPO takes their sign.
Both phases run through the shared runtime (runtime/train_loop.py), so each is resumable.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamer4.config import Config, DynamicsConfig, DynamicsSampling
from dreamer4.data.loader import window_source
from dreamer4.data.store import DatasetError
from dreamer4.dynamics.latent_cache import build_latent_cache
from dreamer4.dynamics.model import batch_latents, observed
from dreamer4.dynamics.sampler import context_inputs
from dreamer4.dynamics.shortcut import shortcut_forcing_loss
from dreamer4.policy.heads import Agent, freeze_prior
from dreamer4.policy.imagine import imagine_rollout, imagined_reward_cont
from dreamer4.policy.losses import (
    advantages,
    alive_weights,
    bc_mtp_loss,
    lambda_returns,
    pmpo_loss,
    reverse_kl,
    reward_mtp_loss,
    state_heads_loss,
    value_loss,
)
from dreamer4.runtime.distributed import log0
from dreamer4.runtime.loading import TRAINABLE, fresh_agent, load_agent
from dreamer4.runtime.lock import stage_lock
from dreamer4.runtime.stage import StageDir, open_dataset
from dreamer4.runtime.train_loop import Stage, loader_factory, train

STAGE_BC, STAGE_IMAGINE = "agent_bc", "agent"
PHASES = ("bc", "imagine", "all")


def make_bc_loss(cfg: Config, world_dc: DynamicsConfig):
    """BC-phase loss; the video term uses the world model's own shortcut-forcing recipe (world_dc)."""
    ac = cfg.agent
    k_max = world_dc.k_max

    def loss_fn(agent: Agent, batch: dict, key):
        # cached latents (dynamics.latent_cache: the dynamics stage's cache of the same windows)
        z1 = batch_latents(agent.world, batch)
        a, m = batch["actions"], batch["action_mask"]
        task = jnp.zeros(a.shape, jnp.int32)
        main = {}

        def predict(z, tau, d):
            z1_hat, h = agent(z, tau, d, a, m, task)
            main.setdefault("h", h)  # shortcut forcing calls the main (graded) pass first
            return z1_hat

        video, vm = shortcut_forcing_loss(
            predict,
            z1,
            key,
            k_max,
            flow_share=world_dc.flow_share,
            context_prob=world_dc.context_prob,
            context_tau=world_dc.context_tau,
            ramp=world_dc.ramp_weight,
        )
        if ac.head_signal == "context":
            # A second pass with every frame at the context level the agent acts at.
            k_ctx = jax.random.fold_in(key, 1)
            _, h = agent(*context_inputs(z1, k_ctx, world_dc.context_tau, k_max), a, m, task)
        else:
            h = main["h"]
        pol = agent.policy(h)
        bc, bc_per = bc_mtp_loss(pol, a, m)
        rew, rew_per = reward_mtp_loss(agent.reward(h), batch["rewards"], agent.bins)
        # State heads on consecutive clean latents; row 0 of a window has no previous frame here.
        valid = jnp.asarray(~batch["is_first"], bool).at[:, 0].set(False)
        s_rew, s_cont, acc_dead, acc_alive = state_heads_loss(
            *agent.state_heads(z1[:, :-1], z1[:, 1:]),
            batch["rewards"][:, 1:],
            batch["is_terminal"][:, 1:],
            valid[:, 1:],
            agent.bins,
        )
        terms = {"video": video, "bc": bc, "reward": rew + s_rew + ac.cont_weight * s_cont}
        weights = {"video": ac.video_weight, "bc": ac.bc_weight, "reward": ac.reward_weight}
        raw = sum(weights[k] * x for k, x in terms.items())
        if ac.loss_norm:
            loss, rms = agent.loss_norm(terms, weights)
        else:
            loss, rms = raw, {}
        # next-action accuracy on labeled targets (distance 1)
        nxt_m = m[:, 1:].astype(jnp.float32)
        acc = jnp.sum((jnp.argmax(pol[:, :-1, 0], -1) == a[:, 1:]) * nxt_m) / jnp.maximum(nxt_m.sum(), 1.0)
        metrics = {
            "video": video,
            "bc": bc,
            "bc_next": bc_per[0],
            "bc_next_acc": acc,
            "reward": rew,
            "reward_now": rew_per[0],
            "state_reward": s_rew,
            "state_cont": s_cont,
            "cont_acc_terminal": acc_dead,
            "cont_acc_alive": acc_alive,
            "action_label_frac": m.mean(),
            "raw_loss": raw,
            **{f"rms_{k}": v for k, v in rms.items()},
            **vm,
        }
        return loss, metrics

    return loss_fn


def imagine_terms(agent: Agent, roll: dict, r, c, policy_on, cfg: Config):
    """Losses on one batch of imagined rollouts; the heads are the only thing with gradients.

    r, c: (B, H + 1) rewards and continuation probabilities (imagined_reward_cont); policy_on: 0 during
    the critic warm-up (only the value head learns), else 1.
    """
    ac = cfg.agent
    h = roll["h"]  # B H+1 D
    v_logits = agent.value_logits(h)
    v = jax.lax.stop_gradient(agent.value_now(h))
    R = lambda_returns(r, v, c, ac.gamma, ac.lam)  # B H
    w = alive_weights(c)[:, :-1]  # weight of state i = P(alive at i)
    v_loss = value_loss(v_logits[:, :-1], R, agent.bins, w)
    logits = agent.policy_logits(h[:, :-1])
    logp_all = jax.nn.log_softmax(logits, -1)
    logp = jnp.take_along_axis(logp_all, roll["actions"][..., None], -1)[..., 0]
    kl = reverse_kl(logits, agent.policy_logits(h[:, :-1], prior=True))
    raw_adv = R - v[:, :-1]
    adv = advantages(R, v[:, :-1], w, center=ac.center_advantages)
    p_loss, pm = pmpo_loss(
        logp.reshape(-1), adv.reshape(-1), kl.reshape(-1), ac.pmpo_alpha, ac.pmpo_beta, w.reshape(-1)
    )
    metrics = {
        "policy": p_loss,
        "value": v_loss,
        "imagined_reward_sum": r[:, 1:].sum(1).mean(),
        "imagined_alive_end": w[:, -1].mean(),
        "return_mean": R.mean(),
        "value_mean": v.mean(),
        "entropy": -jnp.sum(jnp.exp(logp_all) * logp_all, -1).mean(),
        # share of states whose uncentered advantage R - v is >= 0 (critic lag shows as ~1)
        "raw_adv_pos_frac": jnp.mean((raw_adv >= 0).astype(jnp.float32)),
        "policy_on": policy_on,
        **pm,
    }
    return policy_on * p_loss + v_loss, metrics


def make_imagine_loss(cfg: Config, sampling: DynamicsSampling):
    ac = cfg.agent

    def loss_fn(agent: Agent, batch: dict, key):
        # The rollout reads a gradient-free copy of the agent: nothing is differentiated through it.
        graphdef, state = nnx.split(agent)
        frozen = nnx.merge(graphdef, jax.lax.stop_gradient(state))
        z_ctx = frozen.world.latents(batch["frames"])
        task = jnp.zeros((z_ctx.shape[0],), jnp.int32)
        roll = imagine_rollout(frozen, z_ctx, batch["actions"], batch["action_mask"], task, key, ac.horizon, sampling)
        r, c = imagined_reward_cont(frozen, roll, z_ctx[:, -1], cfg)
        return imagine_terms(agent, roll, r, c, jnp.mean(batch["policy_on"]), cfg)

    return loss_fn


def _checked_dataset(stage: StageDir, data_dir, cfg: Config, facts: dict):
    """The dataset, checked against the world model the agent is built on."""
    ds = open_dataset(data_dir, cfg)
    StageDir(stage.run_dir, "dynamics").check_dataset(ds, facts, data_dir)
    return ds


def train_bc(cfg: Config, data_dir, run_dir) -> dict:
    stage = StageDir(run_dir, STAGE_BC)
    with stage_lock(stage.lock_path, STAGE_BC, log=log0):  # one writer per stage (runtime/lock.py)
        stage.check_network(cfg)
        agent, wcfg, facts = fresh_agent(cfg, run_dir)
        _checked_dataset(stage, data_dir, cfg, facts)
        tc = cfg.agent.bc
        source = window_source(data_dir, cfg, "train", tc.seq_len, seq_len_key="agent.bc.seq_len")
        if not any(source.episodes[i].labeled for i in source.base_windows[:, 0]):  # BC loss 0 at every step
            raise DatasetError(
                f"dataset {data_dir} has no labeled 'train' episode of at least agent.bc.seq_len={tc.seq_len} "
                f"steps (collect.labeled_fraction was {source.ds.manifest.get('labeled_fraction')}): the BC "
                f"phase learns the policy from labeled actions"
            )
        if cfg.dynamics.latent_cache:  # with dynamics' seq_len and stride: the cache it built, reused
            source = build_latent_cache(agent.world.tokenizer, source, Path(run_dir) / "latents", tc.batch_size, log0)

        def prepare(batch, step):
            return {
                **observed(batch),
                **{k: batch[k] for k in ("actions", "action_mask", "rewards", "is_first", "is_terminal")},
            }

        train(
            Stage(
                name=STAGE_BC,
                stage_dir=stage.dir,
                cfg=cfg,
                train=tc,
                model=agent,
                loss_fn=make_bc_loss(cfg, wcfg.dynamics),
                make_iterator=loader_factory(source, cfg, tc.batch_size, batch_key="agent.bc.batch_size"),
                prepare=prepare,
                trainable=TRAINABLE[STAGE_BC],
                meta={"phase": "bc", **facts, "data": str(data_dir)},
            )
        )
        return stage.results()


def train_imagine(cfg: Config, data_dir, run_dir) -> dict:
    stage = StageDir(run_dir, STAGE_IMAGINE)
    with stage_lock(stage.lock_path, STAGE_IMAGINE, log=log0):  # one writer per stage (runtime/lock.py)
        stage.check_network(cfg)
        # The agent network is the BC stage's (its saved config); training keys come from cfg.
        agent, wcfg, facts = load_agent(run_dir, STAGE_BC)
        _checked_dataset(stage, data_dir, cfg, facts)
        freeze_prior(agent)
        tc = cfg.agent.imagine
        C = cfg.agent.context_len

        def prepare(batch, step):
            out = {k: batch[k][:, :C] for k in ("frames", "actions", "action_mask")}
            # step = updates done so far: the first critic_warmup updates train the value head only
            out["policy_on"] = np.full((len(out["frames"]),), float(step >= cfg.agent.critic_warmup), np.float32)
            return out

        train(
            Stage(
                name=STAGE_IMAGINE,
                stage_dir=stage.dir,
                cfg=cfg,
                train=tc,
                model=agent,
                loss_fn=make_imagine_loss(cfg, wcfg.dynamics.sampling),
                make_iterator=loader_factory(
                    window_source(data_dir, cfg, "train", C, seq_len_key="agent.context_len"),
                    cfg,
                    tc.batch_size,
                    batch_key="agent.imagine.batch_size",
                ),
                prepare=prepare,
                trainable=TRAINABLE[STAGE_IMAGINE],
                meta={"phase": "imagine", **facts, "data": str(data_dir)},
            )
        )
        return stage.results()


def train_agent(cfg: Config, data_dir, run_dir, phase: str = "all") -> dict:
    """Train the agent's phases; returns each phase's results (its last logged training metrics)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    bc, imagine = StageDir(run_dir, STAGE_BC), StageDir(run_dir, STAGE_IMAGINE)
    if phase in ("bc", "all"):
        if bc.is_complete(cfg):
            print(f"[{STAGE_BC}] complete, skipped")
        else:
            train_bc(cfg, data_dir, run_dir)
    if phase in ("imagine", "all"):
        train_imagine(cfg, data_dir, run_dir)
    return {name: StageDir(run_dir, name).results() for name in (bc.name, imagine.name)}

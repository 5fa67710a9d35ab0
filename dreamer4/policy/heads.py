"""Agent tokens inside the world-model transformer, and the policy / reward / value heads.

Shape key: B batch, T time steps, S dynamics tokens per step, D width, L tokenizer latents,
N latent width, J MTP distances, A actions, K two-hot bins.

Tokens of step t (S + 1 of them): the dynamics' own S tokens [action, signal, registers, spatial]
followed by ONE agent token, which is the embedding of the step's task (task 0 = maximise the
game's reward). Space layers use `agent_visibility`: the agent token reads every token of its
step, the S world-model tokens read only each other. Time layers attend position s to position
s of earlier steps, so the agent token also reads the agent tokens of past steps while no world
model token ever reads an agent token. Hence the world model's predictions are exactly those of
the dynamics alone (tests/test_policy.py checks it), and the task cannot leak into the future
frames except through the actions (no causal confusion, paper sec. 3.3).

Heads read the agent token's output h_BTD. Policy and reward use multi-token prediction: a small
MLP trunk, then J output layers, one per distance (stored as one Linear whose J blocks of outputs
have disjoint weights: the same function as J separate layers). The value head is one output.
Distances and targets: see dreamer4/policy/losses.py.

The state heads (`StateHeads`) are the exception: they read the tokenizer latents of two
consecutive frames, (z_{t-1}, z_t), and predict the reward of that transition and whether frame t
continues the episode (not a death). They never see an action token, so in imagination reward
and continuation can only follow from what the world model generates; the agent-token reward
head above, which also reads the same-step action, stays as the paper's auxiliary MTP target.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from dreamer4.config import AgentNet
from dreamer4.dynamics.model import Dynamics, WorldModel
from dreamer4.nn import RMSNorm, symlog_bins, two_hot_mean
from dreamer4.nn.loss_norm import LossNormalizer


def agent_visibility(S: int) -> np.ndarray:
    """(S+1, S+1) space visibility: vis[q, k] = q may read k. The agent token (last) reads all;
    the S world-model tokens read only the world-model tokens."""
    vis = np.ones((S + 1, S + 1), bool)
    vis[:S, S] = False
    return vis


class MTPHead(nnx.Module):
    """h_BTD -> out_BTJO: RMSNorm, Linear, SiLU, then one output layer per distance j < J."""

    def __init__(self, width: int, hidden: int, out_dim: int, num_out: int, *, rngs: nnx.Rngs, zero_init: bool = False):
        self.J, self.O = num_out, out_dim
        self.norm = RMSNorm(width)
        self.hidden = nnx.Linear(width, hidden, rngs=rngs)
        # Zero-initialised reward/value outputs start at a prediction of exactly 0 (DreamerV3).
        kinit = nnx.initializers.zeros_init() if zero_init else nnx.initializers.lecun_normal()
        self.out = nnx.Linear(hidden, num_out * out_dim, kernel_init=kinit, rngs=rngs)

    def __call__(self, h_BTD):
        y = self.out(jax.nn.silu(self.hidden(self.norm(h_BTD.astype(jnp.float32)))))
        return rearrange(y, "... (j o) -> ... j o", j=self.J)


class StateHeads(nnx.Module):
    """(z_prev_BTLN, z_BTLN) -> (reward logits B T K, continuation logit B T): an MLP on both frames'
    latents and their difference (a reward in Craftax is mostly an inventory change)."""

    def __init__(self, latent_size: int, hidden: int, num_bins: int, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(3 * latent_size)
        self.hidden = nnx.Linear(3 * latent_size, hidden, rngs=rngs)
        self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.reward = nnx.Linear(hidden, num_bins, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
        # Bias 5: an episode continues at almost every step (sigmoid(5) = 0.993) before training.
        self.cont = nnx.Linear(hidden, 1, bias_init=nnx.initializers.constant(5.0), rngs=rngs)

    def __call__(self, z_prev_BTLN, z_BTLN):
        a = rearrange(z_prev_BTLN.astype(jnp.float32), "b t l n -> b t (l n)")
        b = rearrange(z_BTLN.astype(jnp.float32), "b t l n -> b t (l n)")
        x = jax.nn.silu(self.hidden(self.norm(jnp.concatenate([a, b, b - a], -1))))
        x = jax.nn.silu(self.hidden2(x))
        return self.reward(x), self.cont(x)[..., 0]


class Agent(nnx.Module):
    """The world model (frozen tokenizer + dynamics) with agent tokens and heads.

    `prior` is the frozen behavioural prior of imagination training: a copy of the BC policy
    head taken when that phase starts (`freeze_prior`); it is never trained.
    """

    def __init__(self, world: WorldModel, cfg: AgentNet, num_actions: int, *, rngs: nnx.Rngs):
        self.world = world
        dyn = world.dynamics
        D = dyn.cfg.width
        self.cfg, self.A, self.S = cfg, num_actions, dyn.num_tokens
        self.task_embed = nnx.Embed(cfg.num_tasks, D, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.policy = MTPHead(D, cfg.head_hidden, num_actions, cfg.mtp, rngs=rngs)
        self.reward = MTPHead(D, cfg.head_hidden, cfg.num_bins, cfg.mtp, rngs=rngs, zero_init=True)
        self.value = MTPHead(D, cfg.head_hidden, cfg.num_bins, 1, rngs=rngs, zero_init=True)
        self.prior = MTPHead(D, cfg.head_hidden, num_actions, cfg.mtp, rngs=rngs)
        self.state_heads = StateHeads(dyn.L * dyn.N, cfg.head_hidden, cfg.num_bins, rngs=rngs)
        # running RMS of the BC phase's loss terms (not a parameter; checkpointed with the agent)
        self.loss_norm = LossNormalizer(("video", "bc", "reward"))

    @property
    def dynamics(self) -> Dynamics:
        return self.world.dynamics

    @property
    def bins(self):
        return symlog_bins(self.cfg.num_bins)

    def visibility(self):
        return agent_visibility(self.S)

    def tokens(self, z_BTLN, tau_BT, d_BT, actions_BT, action_mask_BT, task_BT):
        """The dynamics' S tokens of each step, then the agent token (the task embedding): B T S+1 D."""
        x = self.dynamics.tokens(z_BTLN, tau_BT, d_BT, actions_BT, action_mask_BT)
        agent = self.task_embed(task_BT).astype(jnp.float32)[:, :, None, :]
        return jnp.concatenate([x, agent], axis=2)

    def split(self, y_BTSD):
        """Transformer output -> (x-prediction z1_hat_BTLN, agent output h_BTD)."""
        return self.dynamics.readout(y_BTSD[:, :, : self.S]), y_BTSD[:, :, self.S]

    def __call__(self, z_BTLN, tau_BT, d_BT, actions_BT, action_mask_BT, task_BT):
        """Full block-causal pass: (z1_hat_BTLN, h_BTD)."""
        x = self.tokens(z_BTLN, tau_BT, d_BT, actions_BT, action_mask_BT, task_BT)
        return self.split(self.dynamics.transformer(x, visibility=self.visibility()))

    # -- generation with a KV cache ---------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int):
        return self.dynamics.transformer.init_cache(batch, max_len, num_tokens=self.S + 1)

    def prefill(self, z_BTLN, tau_BT, d_BT, actions_BT, action_mask_BT, task_BT, max_len: int):
        x = self.tokens(z_BTLN, tau_BT, d_BT, actions_BT, action_mask_BT, task_BT)
        y, cache = self.dynamics.transformer.prefill(x, max_len, visibility=self.visibility())
        return self.split(y), cache

    def step(self, z_B1LN, tau_B1, d_B1, action_B1, mask_B1, task_B1, cache, t):
        """One step t against the cache of steps < t: ((z1_hat_B1LN, h_B1D), cache)."""
        x = self.tokens(z_B1LN, tau_B1, d_B1, action_B1, mask_B1, task_B1)
        y, cache = self.dynamics.transformer.step(x, cache, t, visibility=self.visibility())
        return self.split(y), cache

    # -- head read-outs ---------------------------------------------------------------------------
    def policy_logits(self, h_BTD, prior: bool = False):
        """Logits of the next action (MTP distance 1), B T A."""
        return (self.prior if prior else self.policy)(h_BTD)[..., 0, :]

    def reward_now(self, h_BTD):
        """Predicted reward of the transition into the current step (distance 0), B T."""
        return two_hot_mean(self.reward(h_BTD)[..., 0, :], self.bins)

    def state_reward_cont(self, z_prev_BTLN, z_BTLN):
        """State heads' predictions for the transitions z_prev -> z: (reward B T, P(continue) B T)."""
        r_logits, c_logit = self.state_heads(z_prev_BTLN, z_BTLN)
        return two_hot_mean(r_logits, self.bins), jax.nn.sigmoid(c_logit)

    def value_logits(self, h_BTD):
        return self.value(h_BTD)[..., 0, :]

    def value_now(self, h_BTD):
        return two_hot_mean(self.value_logits(h_BTD), self.bins)


def freeze_prior(agent: Agent) -> None:
    """Copy the (behaviour-cloned) policy head into the prior head."""
    nnx.update(agent.prior, jax.tree.map(jnp.array, nnx.state(agent.policy)))

"""Behaviour policies for collection, behind one small interface.

A policy is two pure functions, traced inside the collector's jitted `lax.scan`:

    state = init(num_envs)
    actions_N, state = act(state, key, frames_NHWC, is_first_N)

`frames_NHWC` are the uint8 frames the envs show now; `is_first_N` marks envs whose episode just
began (a recurrent or sticky policy resets there). Policies are chosen by a spec string:
"random", "sticky", or "KIND:CHECKPOINT" for a learned policy; the one registry of policy kinds
is `data/policies.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from dreamer4.config import ConfigError


@dataclass(frozen=True)
class BehaviorPolicy:
    name: str
    init: Callable[[int], Any]
    act: Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def random_policy(num_actions: int) -> BehaviorPolicy:
    """Uniform over the action set at every step."""

    def init(num_envs: int):
        return ()

    def act(state, key, frames_NHWC, is_first_N):
        n = frames_NHWC.shape[0]
        return jax.random.randint(key, (n,), 0, num_actions, dtype=jnp.int32), state

    return BehaviorPolicy("random", init, act)


# Craftax (Classic and full) action ids of the four moves: left, right, up, down.
MOVE_ACTIONS = (1, 2, 3, 4)


def walk_policy(num_actions: int, move_prob: float = 0.5) -> BehaviorPolicy:
    """Uniform random, except that with probability `move_prob` the action is one of the four moves
    (uniform among them): about 60% of steps are moves instead of 4/17, so a dataset holds ~3x as
    many view shifts, the transitions from which a world model learns what the moves do."""

    def init(num_envs: int):
        return ()

    def act(state, key, frames_NHWC, is_first_N):
        n = frames_NHWC.shape[0]
        k_any, k_move, k_pick = jax.random.split(key, 3)
        any_N = jax.random.randint(k_any, (n,), 0, num_actions, dtype=jnp.int32)
        move_N = jnp.asarray(MOVE_ACTIONS, jnp.int32)[jax.random.randint(k_move, (n,), 0, len(MOVE_ACTIONS))]
        return jnp.where(jax.random.uniform(k_pick, (n,)) < move_prob, move_N, any_N), state

    return BehaviorPolicy("walk", init, act)


def sticky_policy(num_actions: int, repeat_prob: float) -> BehaviorPolicy:
    """Uniform random with action repeat: keep the previous action with probability `repeat_prob`.

    Repeats make the agent walk in straight lines and act on what it faces, which gives longer and
    more varied episodes than uniform noise. A new episode always draws a fresh action.
    """

    def init(num_envs: int):
        return jnp.zeros((num_envs,), jnp.int32)

    def act(prev_N, key, frames_NHWC, is_first_N):
        k_new, k_keep = jax.random.split(key)
        fresh = jax.random.randint(k_new, prev_N.shape, 0, num_actions, dtype=jnp.int32)
        keep = jax.random.uniform(k_keep, prev_N.shape) < repeat_prob
        actions = jnp.where(keep & ~is_first_N, prev_N, fresh)
        return actions, actions

    return BehaviorPolicy("sticky", init, act)


# ---------------------------------------------------------------------------------------------
# Mixtures and epsilon-random actions (`collect.mix`, `collect.epsilon`)


def parse_mix(mix: str) -> list[tuple[str, float]]:
    """ "SPEC=W,SPEC=W" -> [(spec, weight)], weights normalised to sum 1.

    A spec may itself contain "=" (a path): the weight is what follows the last "=".
    """
    members = []
    for part in (p.strip() for p in mix.split(",")):
        spec, sep, w = part.rpartition("=")
        try:
            weight = float(w)
        except ValueError:
            weight = -1.0
        if not sep or not spec or weight < 0:
            raise ConfigError(
                f"config key 'collect.mix': {part!r} must look like SPEC=WEIGHT with a "
                f"weight >= 0 (e.g. 'ppo:runs/a=0.5,random=0.5')"
            )
        members.append((spec.strip(), weight))
    total = sum(w for _, w in members)
    if total <= 0:
        raise ConfigError(f"config key 'collect.mix': the weights of {mix!r} must not all be 0")
    if len({s for s, _ in members}) != len(members):
        raise ConfigError(f"config key 'collect.mix': {mix!r} names a policy twice")
    return [(s, w / total) for s, w in members]


def assign_envs(weights: list[float], num_envs: int, seed: int, writer: int) -> list[int]:
    """Policy index of each env: env counts proportional to the weights, placement seeded.

    Slot j of num_envs gets the member i with cum_{i-1} <= (j + u) / N < cum_i (stratified, so
    the counts are within one of weight * N); a seeded permutation maps slots to envs.
    """
    import numpy as np

    rng = np.random.default_rng([seed, writer, 0x313C])
    u = float(rng.random())
    cum = np.cumsum(weights)
    slots = [
        min(int(np.searchsorted(cum, (j + u) / num_envs, side="right")), len(weights) - 1) for j in range(num_envs)
    ]
    perm = rng.permutation(num_envs)
    out = [0] * num_envs
    for j, n in enumerate(perm):
        out[int(n)] = slots[j]
    return out


def mixture_policy(members: list[BehaviorPolicy], env_member_N, epsilon: float, num_actions: int) -> BehaviorPolicy:
    """Each env acts with its assigned member; then any action is replaced by a uniform random
    one with probability `epsilon`. Every member runs on every env (their states stay in step) and
    the assigned member's action is kept: simple, and the cost is one more network pass per member.
    """
    env_member_N = jnp.asarray(env_member_N, jnp.int32)

    def init(num_envs: int):
        return tuple(m.init(num_envs) for m in members)

    def act(states, key, frames_NHWC, is_first_N):
        keys = jax.random.split(key, len(members) + 2)
        actions = []
        new_states = []
        for m, s, k in zip(members, states, keys[:-2]):
            a, s = m.act(s, k, frames_NHWC, is_first_N)
            actions.append(a.astype(jnp.int32))
            new_states.append(s)
        actions_N = jnp.take_along_axis(jnp.stack(actions, axis=1), env_member_N[:, None], axis=1)[:, 0]
        if epsilon > 0:
            n = frames_NHWC.shape[0]
            explore = jax.random.uniform(keys[-2], (n,)) < epsilon
            actions_N = jnp.where(explore, jax.random.randint(keys[-1], (n,), 0, num_actions, jnp.int32), actions_N)
        return actions_N, tuple(new_states)

    return BehaviorPolicy("mixture", init, act)

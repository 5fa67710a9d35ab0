"""Behaviour policies for collection, behind one small interface.

A policy is two pure functions, traced inside the collector's jitted `lax.scan`:

    state = init(num_envs)
    actions_N, state = act(state, key, frames_NHWC, is_first_N)

`frames_NHWC` are the uint8 frames the envs show now; `is_first_N` marks envs whose episode just
began (a recurrent or sticky policy resets there). Policies are chosen by a spec string:
"random", "sticky", or "KIND:CHECKPOINT" for a learned policy registered with `register_policy`
(the PPO policy of a later stage registers itself as "ppo").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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


# KIND -> factory(checkpoint_path, env_spec, collect_cfg) -> BehaviorPolicy
_LEARNED: dict[str, Callable[..., BehaviorPolicy]] = {}


def register_policy(kind: str, factory: Callable[..., BehaviorPolicy]) -> None:
    """Make "KIND:CHECKPOINT" specs resolvable; used by stages that train a behaviour policy."""
    _LEARNED[kind] = factory


def make_policy(spec: str, env_spec, collect_cfg) -> BehaviorPolicy:
    if spec == "random":
        return random_policy(env_spec.num_actions)
    if spec == "sticky":
        return sticky_policy(env_spec.num_actions, collect_cfg.sticky_repeat_prob)
    kind, sep, path = spec.partition(":")
    if sep and kind in _LEARNED:
        return _LEARNED[kind](path, env_spec, collect_cfg)
    known = ["random", "sticky"] + [f"{k}:CHECKPOINT" for k in sorted(_LEARNED)]
    raise ConfigError(
        f"config key 'collect.policy': unknown behaviour policy {spec!r}; expected one of {known}"
    )

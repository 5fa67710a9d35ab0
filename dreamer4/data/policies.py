"""The one registry of collection policies: spec string -> `BehaviorPolicy`.

    make_policy("random" | "sticky" | "walk" | "ppo:CHECKPOINT", env_spec, collect_cfg)

Every kind is listed here, explicitly: "random", "sticky" and "walk" (data/behavior.py) and "ppo", a
trained PPO checkpoint (behavior/policy.py). `register_policy` adds a kind to the same table
(tests use it for a frame-hash policy).
"""

from __future__ import annotations

from collections.abc import Callable

from dreamer4.behavior.policy import ppo_policy
from dreamer4.config import ConfigError
from dreamer4.data.behavior import BehaviorPolicy, random_policy, sticky_policy, walk_policy

# KIND -> factory(argument after "KIND:", env_spec, collect_cfg) -> BehaviorPolicy
Factory = Callable[..., BehaviorPolicy]
POLICIES: dict[str, Factory] = {
    "random": lambda arg, env_spec, c: random_policy(env_spec.num_actions),
    "sticky": lambda arg, env_spec, c: sticky_policy(env_spec.num_actions, c.sticky_repeat_prob),
    "walk": lambda arg, env_spec, c: walk_policy(env_spec.num_actions),
    "ppo": ppo_policy,
}
# kinds that name a checkpoint ("KIND:CHECKPOINT"); the others take no argument
NEEDS_CHECKPOINT = {"ppo"}


def register_policy(kind: str, factory: Factory) -> None:
    """Add a learned policy kind, resolvable as "KIND:CHECKPOINT"."""
    POLICIES[kind] = factory
    NEEDS_CHECKPOINT.add(kind)


def make_policy(spec: str, env_spec, collect_cfg) -> BehaviorPolicy:
    kind, sep, arg = spec.partition(":")
    if kind in POLICIES and bool(sep) == (kind in NEEDS_CHECKPOINT):
        return POLICIES[kind](arg, env_spec, collect_cfg)
    known = [k + (":CHECKPOINT" if k in NEEDS_CHECKPOINT else "") for k in POLICIES]
    raise ConfigError(f"config key 'collect.policy': unknown behaviour policy {spec!r}; expected one of {known}")

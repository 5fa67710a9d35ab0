"""A deterministic test policy: action = (sum of the frame's bytes) mod num_actions.

Because the action depends only on the frame shown, a test can check the step convention
independently of the collector: for every stored row t > 0, action_t == policy(frame_{t-1}).
Run as a script it registers itself and runs the `dreamer4` CLI (used by subprocess tests).
"""

import sys

import jax.numpy as jnp

from dreamer4.data.behavior import BehaviorPolicy
from dreamer4.data.policies import register_policy


def framehash_action(frames_NHWC, num_actions):
    return (frames_NHWC.astype(jnp.int32).sum(axis=(1, 2, 3)) % num_actions).astype(jnp.int32)


def _factory(path, env_spec, collect_cfg):
    def init(num_envs):
        return ()

    def act(state, key, frames_NHWC, is_first_N):
        return framehash_action(frames_NHWC, env_spec.num_actions), state

    return BehaviorPolicy("framehash", init, act)


register_policy("framehash", _factory)

if __name__ == "__main__":
    from dreamer4.cli import main

    sys.exit(main(sys.argv[1:]))

"""The PPO actor-critic: a small CNN over the last K frames, stacked on channels.

Shape key:
    N   envs (batch)
    H W frame height and width
    C   channels of one frame (3)
    K   stacked frames (behavior.frame_stack)
    A   actions
    D   hidden width

Frame stacking gives the policy motion and the last few steps without a recurrent state; the
stack lives in uint8 so a rollout buffer stays small.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamer4.config import BehaviorConfig

# Kernel and stride of the 1st, 2nd and 3rd convolution (the Nature-DQN pattern).
_CONV_SHAPES = ((8, 4), (4, 2), (3, 1))


def conv_output_hw(h: int, w: int, num_convs: int) -> tuple[int, int]:
    for k, s in _CONV_SHAPES[:num_convs]:
        h, w = (h - k) // s + 1, (w - k) // s + 1
    return h, w


class ActorCritic(nnx.Module):
    def __init__(self, frame_shape, num_actions: int, cfg: BehaviorConfig, *, rngs: nnx.Rngs):
        H, W, C = frame_shape
        self.frame_stack = cfg.frame_stack
        relu_gain = nnx.initializers.orthogonal(np.sqrt(2.0))
        chans = (C * cfg.frame_stack,) + tuple(cfg.conv_channels)
        self.convs = nnx.List(
            [
                nnx.Conv(
                    chans[i],
                    chans[i + 1],
                    kernel_size=(k, k),
                    strides=(s, s),
                    padding="VALID",
                    kernel_init=relu_gain,
                    rngs=rngs,
                )
                for i, (k, s) in enumerate(_CONV_SHAPES[: len(cfg.conv_channels)])
            ]
        )
        h, w = conv_output_hw(H, W, len(cfg.conv_channels))
        if h < 1 or w < 1:
            raise ValueError(f"frames of {H}x{W} are too small for {len(cfg.conv_channels)} convolutions")
        self.trunk = nnx.Linear(h * w * chans[-1], cfg.hidden, kernel_init=relu_gain, rngs=rngs)
        # A near-zero policy head starts uniform over actions; the value head starts unscaled.
        self.pi = nnx.Linear(cfg.hidden, num_actions, kernel_init=nnx.initializers.orthogonal(0.01), rngs=rngs)
        self.v = nnx.Linear(cfg.hidden, 1, kernel_init=nnx.initializers.orthogonal(1.0), rngs=rngs)

    def __call__(self, stack_NHWCK):
        """uint8 frame stack (N, H, W, C*K) -> (logits_NA, value_N)."""
        x = stack_NHWCK.astype(jnp.float32) / 255.0
        for conv in self.convs:
            x = nnx.relu(conv(x))
        h_ND = nnx.relu(self.trunk(x.reshape(x.shape[0], -1)))
        return self.pi(h_ND), self.v(h_ND)[:, 0]


def push_frame(stack_NHWCK, frame_NHWC, is_first_N):
    """Append the newest frame to the stack (oldest first); a new episode fills it with its frame."""
    K = stack_NHWCK.shape[-1] // frame_NHWC.shape[-1]
    shifted = jnp.concatenate([stack_NHWCK[..., frame_NHWC.shape[-1] :], frame_NHWC], axis=-1)
    fresh = jnp.tile(frame_NHWC, (1, 1, 1, K))
    return jnp.where(is_first_N[:, None, None, None], fresh, shifted)

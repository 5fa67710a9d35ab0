"""`dreamer4 train-behavior`: train the PPO behaviour policy of RUN_DIR (resumes RUN_DIR/behavior)."""

from __future__ import annotations

from dreamer4.behavior.train import train_behavior
from dreamer4.config import Config


def run_train_behavior(cfg: Config, run: str) -> dict:
    r = train_behavior(cfg, run)
    print(f"behavior: {r['env_steps']} env steps; over the first {r['eval_steps']} steps of {r['eval_envs']} "
          f"episodes: return {r['eval_policy_return']:.2f} (uniform random {r['eval_random_return']:.2f}), "
          f"achievements {r['eval_policy_achievements']:.2f} (random {r['eval_random_achievements']:.2f}); "
          f"collect with `dreamer4 collect --policy ppo:{run}`")
    return r

"""The stage commands: run a stage, print its summary, return its results.

Each function is what one `dreamer4` command does (cli.py's command table calls it, run.py chains
them); the work itself lives in the stage's own package.
"""

from __future__ import annotations

from dreamer4.behavior.train import train_behavior
from dreamer4.config import Config
from dreamer4.data.collect import collect
from dreamer4.dynamics.evaluate import dream
from dreamer4.dynamics.train import train_dynamics
from dreamer4.policy.evaluate import evaluate
from dreamer4.policy.train import train_agent
from dreamer4.runtime.distributed import log0, require_single_process
from dreamer4.runtime.stage import StageDir
from dreamer4.tokenizer.train import train_tokenizer


def run_collect(cfg: Config, out: str, writer_id: int | None = None, num_writers: int | None = None) -> dict:
    summary = collect(cfg, out, writer_id=writer_id, num_writers=num_writers)
    log0(f"dataset: {out} (inspect with `dreamer4 dataset info {out}`)")
    return summary


def run_train_behavior(cfg: Config, run: str) -> dict:
    r = train_behavior(cfg, run)
    print(
        f"behavior: {r['env_steps']} env steps; over the first {r['eval_steps']} steps of {r['eval_envs']} "
        f"episodes: return {r['eval_policy_return']:.2f} (uniform random {r['eval_random_return']:.2f}), "
        f"achievements {r['eval_policy_achievements']:.2f} (random {r['eval_random_achievements']:.2f}); "
        f"collect with `dreamer4 collect --policy ppo:{run}`"
    )
    return r


def run_train_tokenizer(cfg: Config, data: str, run: str) -> dict:
    results = train_tokenizer(cfg, data, run)
    log0(
        f"tokenizer: held-out PSNR {results['eval_psnr']:.2f} dB (mean-frame baseline "
        f"{results['eval_psnr_mean_frame_baseline']:.2f} dB), SSIM {results['eval_ssim']:.3f}; "
        f"grid in {StageDir(run, 'tokenizer').path('images')}/"
    )
    return results


def run_train_dynamics(cfg: Config, data: str, run: str) -> dict:
    results = train_dynamics(cfg, data, run)
    if results:
        K = cfg.dynamics.sample_steps
        log0(
            f"dynamics: open-loop PSNR K={K} {results.get(f'eval_psnr_K{K}', float('nan')):.2f} dB, "
            f"action gap {results.get('eval_action_gap_db', float('nan')):.2f} dB"
        )
    return results


def run_dream(run: str, seed: int = 0) -> dict:
    require_single_process("dream")
    metrics = dream(run, seed=seed)
    out = StageDir(run, "dream")
    print(out.path("table.md").read_text())
    print(f"written to {out.dir}/ (results.json, table.md, psnr_vs_horizon.png, real_vs_imagined_*.gif)")
    return metrics


def run_train_agent(cfg: Config, data: str, run: str, phase: str = "all") -> dict:
    results = train_agent(cfg, data, run, phase)
    for name, r in results.items():
        if r:
            log0(f"{name}: step {r.get('step')}, loss {r.get('loss', float('nan')):.4f}")
    return results


def run_evaluate(run: str, episodes: int | None = None, seed: int = 0) -> dict:
    require_single_process("evaluate")
    results = evaluate(run, episodes=episodes, seed=seed)
    out = StageDir(run, "evaluate")
    print(out.path("table.md").read_text())
    print(f"written to {out.dir}/ (results.json, table.md, achievements.png, real_*.gif, imagined_*.gif)")
    return results

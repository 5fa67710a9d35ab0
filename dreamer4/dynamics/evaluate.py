"""Open-loop evaluation of the world model on held-out episodes (`dreamer4 dream`).

Given C true context frames and actions, the model generates H frames; we decode them with the
tokenizer and compare with the real frames: PSNR / SSIM per horizon step, for every K in
{1, 2, 4, ..., K_max}. Action grounding: the same prediction (K = sample_steps) with the true
actions, with actions shuffled across episodes, and with no actions (all masked as unlabeled);
the PSNR gap true - shuffled measures how much the model uses the actions.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dreamer4.config import Config
from dreamer4.data.store import Dataset, DatasetError
from dreamer4.dynamics.model import WorldModel
from dreamer4.dynamics.sampler import rollout
from dreamer4.runtime.faults import disk_guard
from dreamer4.runtime.images import psnr, ssim
from dreamer4.runtime.loading import load_world_model
from dreamer4.runtime.stage import StageDir, open_dataset, write_json


def eval_clips(ds: Dataset, cfg: Config) -> dict:
    """C + H consecutive steps from the start of E eval episodes, with their true actions."""
    dc = cfg.dynamics
    n = dc.eval_context + dc.eval_horizon
    eps = [e for e in ds.split("eval") if e.length >= n + 1][: dc.eval_episodes]
    if len(eps) < 2:
        raise DatasetError(
            f"dataset {ds.root} needs >= 2 eval episodes of > {n} steps for the open-loop "
            f"evaluation (dynamics.eval_context + eval_horizon); it has {len(eps)}"
        )
    rows = [ds.read(e, 1, n + 1, ("frame", "action")) for e in eps]  # from row 1: action_1 is real
    return {"frames": np.stack([r["frame"] for r in rows]), "actions": np.stack([r["action"] for r in rows])}


def k_values(k_max: int) -> list[int]:
    out, k = [], 1
    while k <= k_max:
        out.append(k)
        k *= 2
    return out


def open_loop(world: WorldModel, clips: dict, cfg: Config, key, ks=None, with_conditioning: bool = True):
    """Returns (metrics dict, per-K PSNR curves, frames for videos)."""
    dc = cfg.dynamics
    C, H = dc.eval_context, dc.eval_horizon
    frames = jnp.asarray(clips["frames"])
    x = frames.astype(jnp.float32) / 255.0
    z_true = world.latents(frames)
    actions = jnp.asarray(clips["actions"], jnp.int32)
    mask = actions >= 0  # imported videos carry no actions (-1)
    decode = jax.jit(lambda w, z: w.decode(z))

    def predict(acts, msk, K, k):
        z_gen = rollout(world.dynamics, z_true[:, :C], acts, msk, k, K, H, dc.context_tau)
        return decode(world, jnp.concatenate([z_true[:, :C], z_gen], axis=1))[:, C:]

    target = x[:, C:]
    recon_ceiling = float(psnr(decode(world, z_true)[:, C:], target).mean())
    metrics, curves, videos = {"eval_psnr_tokenizer_ceiling": recon_ceiling}, {}, {}
    for K in ks or k_values(dc.k_max):
        gen = predict(actions, mask, K, key)
        p = np.asarray(psnr(gen, target).mean(0))  # per horizon step
        s = np.asarray(ssim(gen, target).mean(0))
        curves[K] = {"psnr": p.tolist(), "ssim": s.tolist()}
        metrics[f"eval_psnr_K{K}"] = float(p.mean())
        metrics[f"eval_ssim_K{K}"] = float(s.mean())
        if K == dc.sample_steps:
            videos["true_actions"] = np.asarray(gen)
    if with_conditioning:
        K = dc.sample_steps
        shuffled = jnp.roll(actions, 1, axis=0)  # another episode's actions, same marginals
        for name, (a, m) in {
            "true": (actions, mask),
            "shuffled": (shuffled, mask),
            "none": (actions, jnp.zeros_like(mask)),
        }.items():
            gen = videos["true_actions"] if name == "true" and "true_actions" in videos else predict(a, m, K, key)
            metrics[f"eval_psnr_{name}_actions"] = float(psnr(gen, target).mean())
        metrics["eval_action_gap_db"] = metrics["eval_psnr_true_actions"] - metrics["eval_psnr_shuffled_actions"]
    videos["real"] = np.asarray(target)
    return metrics, curves, videos


def side_by_side_frames(real_BHWC, imagined_BHWC, scale: int = 4) -> np.ndarray:
    """(T, H', W', 3) uint8 frames: real on the left, imagined on the right, upscaled."""
    both = np.concatenate([real_BHWC, np.ones_like(real_BHWC[:, :, :2]), imagined_BHWC], axis=2)
    both = (np.clip(both, 0, 1) * 255).round().astype(np.uint8)
    return both.repeat(scale, axis=1).repeat(scale, axis=2)


def write_video(path: Path, frames_THWC: np.ndarray, fps: int = 4) -> Path:
    import imageio.v3 as iio

    with disk_guard(Path(path).parent, np.asarray(frames_THWC).nbytes, f"video {Path(path).name}", cleanup=[path]):
        iio.imwrite(path, frames_THWC, duration=int(1000 / fps), loop=0)
    return path


def open_loop_eval_hook(cfg: Config, ds: Dataset):
    """Evaluation hook for the train loop: fast version (K = sample_steps and 1) + a video."""
    clips = eval_clips(ds, cfg)

    def hook(world, step, logger):
        ks = sorted({1, cfg.dynamics.sample_steps})
        metrics, _, videos = open_loop(world, clips, cfg, jax.random.PRNGKey(step), ks=ks)
        if logger.enabled:
            (logger.dir / "videos").mkdir(exist_ok=True)
            path = write_video(
                logger.dir / "videos" / f"dream_{step:07d}.gif",
                side_by_side_frames(videos["real"][0], videos["true_actions"][0]),
            )
            logger.log_video(step, "real_vs_imagined", path)
        return metrics

    return hook


def dream(run_dir: str | Path, out_name: str = "dream", seed: int = 0) -> dict:
    """Full open-loop evaluation of RUN_DIR's world model; writes RUN_DIR/dream/ (results.json last)."""
    world, cfg, facts = load_world_model(run_dir)
    clips = eval_clips(open_dataset(facts["data"], cfg), cfg)
    metrics, curves, videos = open_loop(world, clips, cfg, jax.random.PRNGKey(seed))
    stage = StageDir(run_dir, out_name)
    out = stage.dir
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "| K | " + " | ".join(f"h{h + 1}" for h in range(cfg.dynamics.eval_horizon)) + " | mean PSNR | mean SSIM |",
        "|---|" + "---|" * (cfg.dynamics.eval_horizon + 2),
    ]
    for K, c in curves.items():
        lines.append(
            f"| {K} | "
            + " | ".join(f"{v:.2f}" for v in c["psnr"])
            + f" | {np.mean(c['psnr']):.2f} | {np.mean(c['ssim']):.3f} |"
        )
    lines += [
        "",
        f"tokenizer reconstruction ceiling: {metrics['eval_psnr_tokenizer_ceiling']:.2f} dB",
        f"true actions {metrics['eval_psnr_true_actions']:.2f} dB, shuffled {metrics['eval_psnr_shuffled_actions']:.2f} dB, "
        f"no actions {metrics['eval_psnr_none_actions']:.2f} dB, gap {metrics['eval_action_gap_db']:.2f} dB",
    ]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _plot(curves, out / "psnr_vs_horizon.png")
    for i in range(min(4, videos["real"].shape[0])):
        write_video(
            out / f"real_vs_imagined_{i}.gif", side_by_side_frames(videos["real"][i], videos["true_actions"][i])
        )
    write_json(
        stage.results_path,
        {
            "metrics": metrics,
            "curves": curves,
            "context": cfg.dynamics.eval_context,
            "horizon": cfg.dynamics.eval_horizon,
        },
    )
    return metrics


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for K, c in curves.items():
        ax.plot(range(1, len(c["psnr"]) + 1), c["psnr"], marker="o", label=f"K={K}")
    ax.set_xlabel("horizon step")
    ax.set_ylabel("PSNR (dB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

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
from dreamer4.dynamics.grounding import bootstrap_ci, eval_transitions, probe, summary_lines
from dreamer4.dynamics.model import WorldModel
from dreamer4.dynamics.sampler import rollout
from dreamer4.runtime.faults import disk_guard
from dreamer4.runtime.images import psnr, ssim
from dreamer4.runtime.loading import load_world_model
from dreamer4.runtime.stage import StageDir, open_dataset, write_json


def eval_clips(ds: Dataset, cfg: Config, windows: int | None = None) -> dict:
    """Windows of C + H consecutive steps from the eval episodes, with their true actions.

    The first window of each episode starts at row 1 (action_1 is real); further windows follow
    without overlap. Windows are taken round-robin over the episodes (every episode's first, then
    every episode's second, ...) up to `windows` (default dynamics.eval_episodes).
    """
    dc = cfg.dynamics
    n = dc.eval_context + dc.eval_horizon
    windows = dc.eval_episodes if windows is None else windows
    eps = [e for e in ds.split("eval") if e.length >= n + 1]
    if len(eps) < 2:
        raise DatasetError(
            f"dataset {ds.root} needs >= 2 eval episodes of > {n} steps for the open-loop "
            f"evaluation (dynamics.eval_context + eval_horizon); it has {len(eps)}"
        )
    starts = [(j, e) for j in range(max(e.length for e in eps)) for e in eps if 1 + (j + 1) * n <= e.length]
    rows = [ds.read(e, 1 + j * n, 1 + (j + 1) * n, ("frame", "action")) for j, e in starts[:windows]]
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
    recon = decode(world, z_true)
    recon_ceiling = float(psnr(recon[:, C:], target).mean())
    metrics, curves, videos = {"eval_psnr_tokenizer_ceiling": recon_ceiling, "eval_windows": int(x.shape[0])}, {}, {}
    # Baselines: the last context frame held for the whole horizon, as stored and as the tokenizer
    # reconstructs it (the generated frames cannot beat the tokenizer's own reconstruction).
    copy_BH = {
        "copy_last": np.asarray(psnr(jnp.broadcast_to(x[:, C - 1 : C], target.shape), target)),
        "copy_last_tokenized": np.asarray(psnr(jnp.broadcast_to(recon[:, C - 1 : C], target.shape), target)),
    }
    for name, p_BH in copy_BH.items():
        curves[name] = {"psnr": p_BH.mean(0).tolist()}
        m, lo, hi = bootstrap_ci(p_BH.mean(1))
        metrics.update({f"eval_psnr_{name}": m, f"eval_psnr_{name}_lo": lo, f"eval_psnr_{name}_hi": hi})
    for K in ks or k_values(dc.k_max):
        gen = predict(actions, mask, K, key)
        p_BH = np.asarray(psnr(gen, target))
        s = np.asarray(ssim(gen, target).mean(0))
        curves[K] = {"psnr": p_BH.mean(0).tolist(), "ssim": s.tolist()}  # per horizon step
        m, lo, hi = bootstrap_ci(p_BH.mean(1))  # over windows
        metrics.update({f"eval_psnr_K{K}": m, f"eval_psnr_K{K}_lo": lo, f"eval_psnr_K{K}_hi": hi})
        metrics[f"eval_ssim_K{K}"] = float(s.mean())
        if K == dc.sample_steps:
            videos["true_actions"] = np.asarray(gen)
            for name, c_BH in copy_BH.items():  # paired over windows
                m, lo, hi = bootstrap_ci(p_BH.mean(1) - c_BH.mean(1))
                diff = f"eval_psnr_K{K}_minus_{name}"
                metrics.update({diff: m, f"{diff}_lo": lo, f"{diff}_hi": hi})
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
    """Full open-loop evaluation of RUN_DIR's world model; writes RUN_DIR/dream/ (results.json last).

    Open loop: PSNR/SSIM per horizon step for every K over dynamics.eval_windows held-out windows,
    beside the copy-the-last-frame baselines, with 95% CIs over windows. Grounding: the paired
    action probe of dynamics/grounding.py on dynamics.eval_transitions held-out transitions.
    """
    world, cfg, facts = load_world_model(run_dir)
    dc = cfg.dynamics
    ds = open_dataset(facts["data"], cfg)
    clips = eval_clips(ds, cfg, windows=dc.eval_windows)
    metrics, curves, videos = open_loop(world, clips, cfg, jax.random.PRNGKey(seed))
    trans = eval_transitions(ds, dc.eval_context, dc.eval_transitions, seed=seed)
    grounding = probe(world, trans, dc.sample_steps, jax.random.PRNGKey(seed + 1), context_tau=dc.context_tau)
    im = grounding["identification_movement"]
    metrics["grounding_identification_chance"] = im["chance"]
    for key, (m, (lo, hi)) in {
        "grounding_identification_movement": (im["accuracy"], im["ci95"]),
        "grounding_psnr_gap_db": tuple(grounding["psnr_gap_true_minus_other_db"][k] for k in ("mean", "ci95")),
        "grounding_latent_mse_minus_copy": tuple(
            grounding["latent_mse_generated_minus_copy"][k] for k in ("mean", "ci95")
        ),
        "grounding_pixel_mse_minus_copy": tuple(
            grounding["pixel_mse_generated_minus_copy"][k] for k in ("mean", "ci95")
        ),
    }.items():
        metrics.update({key: m, f"{key}_lo": lo, f"{key}_hi": hi})
    stage = StageDir(run_dir, out_name)
    out = stage.dir
    out.mkdir(parents=True, exist_ok=True)
    H = dc.eval_horizon

    def ci(key):
        return f"{metrics[key]:.2f} [{metrics[key + '_lo']:.2f}, {metrics[key + '_hi']:.2f}]"

    lines = [
        f"Open loop: {dc.eval_context} context frames, {H} generated, {metrics['eval_windows']} held-out "
        f"windows; mean PSNR with its 95% CI over windows.",
        "",
        "| K | " + " | ".join(f"h{h + 1}" for h in range(H)) + " | mean PSNR [95% CI] | mean SSIM |",
        "|---|" + "---|" * (H + 2),
    ]
    for K, c in curves.items():
        if isinstance(K, int):
            lines.append(
                f"| {K} | "
                + " | ".join(f"{v:.2f}" for v in c["psnr"])
                + f" | {ci(f'eval_psnr_K{K}')} | {np.mean(c['ssim']):.3f} |"
            )
    for name, label in (("copy_last", "copy last frame"), ("copy_last_tokenized", "copy last (tokenized)")):
        lines.append(
            f"| {label} | " + " | ".join(f"{v:.2f}" for v in curves[name]["psnr"]) + f" | {ci(f'eval_psnr_{name}')} | |"
        )
    K = dc.sample_steps
    lines += [
        "",
        f"tokenizer reconstruction ceiling: {metrics['eval_psnr_tokenizer_ceiling']:.2f} dB",
        f"K={K} minus copy-last (tokenized), paired over windows: {ci(f'eval_psnr_K{K}_minus_copy_last_tokenized')} dB",
        f"true actions {metrics['eval_psnr_true_actions']:.2f} dB, shuffled {metrics['eval_psnr_shuffled_actions']:.2f} dB, "
        f"no actions {metrics['eval_psnr_none_actions']:.2f} dB, gap {metrics['eval_action_gap_db']:.2f} dB",
        "",
        "Action grounding (paired one-step probe, same noise per candidate action):",
    ]
    lines += [f"- {line}" for line in summary_lines(grounding)]
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
            "curves": {str(k): v for k, v in curves.items()},
            "grounding": grounding,
            "context": dc.eval_context,
            "horizon": H,
        },
    )
    return metrics


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for K, c in curves.items():
        style = (
            dict(marker="o", label=f"K={K}") if isinstance(K, int) else dict(linestyle="--", label=K.replace("_", " "))
        )
        ax.plot(range(1, len(c["psnr"]) + 1), c["psnr"], **style)
    ax.set_xlabel("horizon step")
    ax.set_ylabel("PSNR (dB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

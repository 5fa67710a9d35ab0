"""The one-page HTML report of a run directory (written at the end of `dreamer4 run`).

Images and GIFs are linked by relative path, so the page works where the run directory is
copied as a whole. Sections missing from the run (a stage not run yet) are left out.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from dreamer4.runtime.stage import REPORT, STAGE_TIMES, StageDir


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _table(rows: list[tuple[str, str]]) -> str:
    return (
        "<table>"
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _md_table(md: str) -> str:
    """A markdown pipe table (plus plain lines) -> HTML."""
    out, rows = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-"):
                rows.append(cells)
            continue
        if rows:
            out.append(
                "<table>"
                + "".join(
                    "<tr>"
                    + "".join(
                        f"<{'th' if i == 0 or j == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 or j == 0 else 'td'}>"
                        for j, c in enumerate(r)
                    )
                    + "</tr>"
                    for i, r in enumerate(rows)
                )
                + "</table>"
            )
            rows = []
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if rows:
        out.append(
            "<table>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
            + "</table>"
        )
    return "\n".join(out)


def _pct(lo_hi) -> str:
    return f"{lo_hi[0]:.0%}-{lo_hi[1]:.0%}"


def _error_verdict(ci95) -> str:
    """How an error difference (model - copy) with this 95% CI reads: lower error is better."""
    return "better" if ci95[1] < 0 else ("worse" if ci95[0] > 0 else "not distinguishable from")


def summary_lines(dream: dict, ev: dict) -> list[str]:
    """Plain-words verdicts at the top of the report: is the world model grounded in actions, does
    it predict the next frame better than copying the last one, and how the policies compare; then
    what their intervals cover (one training run)."""
    out = []
    g = dream.get("grounding")
    if g:
        im = g["identification_movement"]
        lo, hi = im["ci95"]
        if lo > im["chance"]:
            verdict = "identifies movement actions above chance"
        elif hi < im["chance"]:
            verdict = "identifies movement actions below chance"
        else:
            verdict = "is NOT shown to respond to movement actions (identification not distinguishable from chance)"
        out.append(
            f"World model {verdict}: the true movement's generated frame was the nearest of the five movement "
            f"candidates in {im['accuracy']:.0%} of {im['n']} held-out movement transitions (95% CI {_pct(im['ci95'])}; "
            f"chance {im['chance']:.0%})."
        )
        d = g["latent_mse_generated_minus_copy"]
        out.append(
            f"One-step prediction is {_error_verdict(d['ci95'])} than copying the last frame: generated-latent MSE "
            f"{g['latent_mse_generated']['mean']:.4f} vs copy {g['latent_mse_copy_last']['mean']:.4f} "
            f"(difference 95% CI {d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f})."
        )
        d = g.get("pixel_mse_generated_minus_copy")
        if d:  # absent in results written before the probe measured decoded pixels
            out.append(
                f"Decoded, it is {_error_verdict(d['ci95'])} than copying the last frame in pixel MSE: "
                f"{g['pixel_mse_generated']['mean']:.5f} vs {g['pixel_mse_copy_last_frame']['mean']:.5f} "
                f"(difference 95% CI {d['ci95'][0]:+.5f} to {d['ci95'][1]:+.5f}; mean per-frame PSNR "
                f"{g['psnr_generated']['mean']:.2f} vs {g['psnr_copy_last_frame']['mean']:.2f} dB, which favours "
                f"copying on frames where little changed)."
            )
    pols = ev.get("policies", {})
    if {"bc", "imagine"} <= set(pols):
        a, b = pols["imagine"], pols["bc"]
        paired = ev.get("comparisons", {}).get("imagine_minus_bc")
        if paired:  # per-episode differences over the same starting worlds
            diff, (lo, hi), how = paired["mean"], paired["ci95"], "paired over the same starting worlds"
        else:  # older results: two independent samples, normal approximation
            diff = a["return_mean"] - b["return_mean"]
            se = (a["return_std"] ** 2 / a["episodes"] + b["return_std"] ** 2 / b["episodes"]) ** 0.5
            lo, hi, how = diff - 1.96 * se, diff + 1.96 * se, "unpaired"
        verdict = "beat" if lo > 0 else ("was worse than" if hi < 0 else "did not beat")
        line = (
            f"Agent: imagination training {verdict} behaviour cloning in the real game: return "
            f"{a['return_mean']:.2f} vs {b['return_mean']:.2f}, difference {diff:+.2f} "
            f"(95% CI {lo:+.2f} to {hi:+.2f}, {how}, {a['episodes']} episodes each, "
            f"cut at {ev.get('max_steps', '?')} steps)"
        )
        if "random" in pols:
            line += f"; random {pols['random']['return_mean']:.2f}"
        out.append(line + ".")
    im = ev.get("imagination")
    if im and "imagined_minus_real" in im:
        d = im["imagined_minus_real"]
        out.append(
            f"Imagined return {im['imagined_return_mean']:.2f} vs real {im['real_return_mean']:.2f} over "
            f"{im['horizon']} steps from the same {im['rollouts']} real starts (difference {d['mean']:+.2f}, "
            f"95% CI {d['ci95'][0]:+.2f} to {d['ci95'][1]:+.2f}; correlation across starts {im['correlation']:.2f})."
        )
    if out:  # on the tiny preset the seeds' spread was wider than one run's intervals (BENCHMARKS.md)
        out.append(
            "These intervals cover this run's evaluation sample (its transitions and episodes), not the spread "
            "between training seeds: `python benchmarks/tiny_seeds.py --seeds 0,1,2,3,4` repeats the whole run "
            "per seed and pools the figures."
        )
    return out


# Training curves of the agent stage drawn in the report: (metrics.jsonl key, title).
AGENT_CURVES = (
    ("loss", "loss"),
    ("imagined_reward_sum", "imagined return (reward sum over the horizon)"),
    ("value_mean", "value"),
    ("entropy", "policy entropy"),
    ("raw_adv_pos_frac", "share of advantages R - v >= 0 (before centring)"),
    ("pmpo_kl", "KL to the BC prior"),
)


def training_curves(metrics_path: Path, out_png: Path, curves=AGENT_CURVES) -> bool:
    """Plot the logged `curves` of a stage's metrics.jsonl into one PNG; False when nothing to plot."""
    if not metrics_path.exists():
        return False
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    curves = [(k, t) for k, t in curves if any(k in r for r in rows)]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    fig, axes = plt.subplots(
        (len(curves) + cols - 1) // cols, cols, figsize=(11, 3 * ((len(curves) + cols - 1) // cols))
    )
    for ax, (key, title) in zip(np.ravel(axes), curves):
        pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in np.ravel(axes)[len(curves) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return True


def write_report(run_dir) -> Path:
    root = Path(run_dir)
    parts = [f"<h1>dreamer4 run: {html.escape(str(root.resolve()))}</h1>"]
    summary = summary_lines(_json(StageDir(root, "dream").results_path), _json(StageDir(root, "evaluate").results_path))
    if summary:
        parts.append("<h2>Summary</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in summary) + "</ul>")
    times = _json(root / STAGE_TIMES)
    if times:
        parts.append("<h2>Wall time per stage</h2>" + _table([(k, f"{v:.0f} s") for k, v in times.items()]))
    tokenizer, dynamics, dream, ev = (StageDir(root, n) for n in ("tokenizer", "dynamics", "dream", "evaluate"))
    tok = _json(tokenizer.results_path)
    if tok:
        parts.append("<h2>Tokenizer (held-out)</h2>" + _table([(k, _fmt(v)) for k, v in tok.items()]))
        grids = sorted(tokenizer.path("images").glob("*.png"))
        if grids:
            rel = grids[-1].relative_to(root)
            parts.append(f"<p>Reconstructions (originals over reconstructions):</p><img src='{rel}' width='640'>")
    dyn = _json(dynamics.results_path)
    if dyn:
        parts.append("<h2>World model (open loop)</h2>" + _table([(k, _fmt(v)) for k, v in dyn.items()]))
    if dream.path("table.md").exists():
        parts.append(_md_table(dream.path("table.md").read_text()))
        gifs = sorted(dream.dir.glob("real_vs_imagined_*.gif"))
        if gifs:
            parts.append(
                "<p>Real (left) vs imagined (right), dataset actions:</p>"
                + "".join(f"<img src='{g.relative_to(root)}' style='margin:4px'>" for g in gifs)
            )
    agent = StageDir(root, "agent")
    if training_curves(agent.path("metrics.jsonl"), agent.path("curves.png")):
        parts.append(
            f"<h2>Imagination training</h2><img src='{agent.path('curves.png').relative_to(root)}' width='900'>"
        )
    if ev.path("table.md").exists():
        parts.append("<h2>Agent in the real game</h2>" + _md_table(ev.path("table.md").read_text()))
        if ev.path("achievements.png").exists():
            parts.append(f"<img src='{ev.path('achievements.png').relative_to(root)}' width='900'>")
        gifs = sorted(ev.dir.glob("real_*.gif")) + sorted(ev.dir.glob("imagined_*.gif"))
        if gifs:
            parts.append(
                "<p>Real episodes (per policy) and imagined rollouts of the imagination-trained policy:</p>"
                + "".join(
                    f"<figure style='display:inline-block'><img src='{g.relative_to(root)}'>"
                    f"<figcaption>{g.stem}</figcaption></figure>"
                    for g in gifs
                )
            )
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:left}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>dreamer4 report</title><style>{style}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )
    path = root / REPORT
    path.write_text(page)
    return path

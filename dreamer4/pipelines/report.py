"""The one-page HTML report of a run directory (written at the end of `dreamer4 run`).

Images and GIFs are linked by relative path, so the page works where the run directory is
copied as a whole. Sections missing from the run (a stage not run yet) are left out.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

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


def write_report(run_dir) -> Path:
    root = Path(run_dir)
    parts = [f"<h1>dreamer4 run: {html.escape(str(root.resolve()))}</h1>"]
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

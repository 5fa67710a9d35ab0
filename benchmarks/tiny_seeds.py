"""Does a preset's end-to-end result hold across seeds? `dreamer4 run` once per seed, then pooled.

    python benchmarks/tiny_seeds.py --seeds 0,1,2,3,4 [--config configs/tiny.yaml] [--root runs/seeds]
        [--run DIR ...] [--set KEY=VALUE ...] [--out OUT.json]

For each seed s, `dreamer4 run --config C --run ROOT/seed{s} --set seed=s` runs in a subprocess, one
at a time. The seed changes the collected data and every stage's initialisation and sampling.
`evaluate` plays the same starting worlds in every run (its own seed, 0), so each run's policy
differences are paired per episode. A run whose report exists is not run again: rerunning the
command only pools, and an interrupted run continues where it stopped (`dreamer4 run` is
resumable). `--run DIR` adds runs made elsewhere, e.g. the README main job's runs/tiny (seed 0).

Reported per run: each figure with that run's own 95% CI (dream/results.json,
evaluate/results.json, tokenizer/eval.json). Pooled over runs: the mean, the runs' standard
deviation and range, the Student-t interval over the per-run values (n = runs: the seeds as a
sample of training runs), and how many runs' own intervals lie above / below the reference (0 for
a difference, chance for identification). A single run's CI covers its evaluation noise only, not
seed-to-seed variation; a claim about the preset rests on the pooled line.

Prints a markdown table and writes the JSON (default ROOT/seeds.json).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dreamer4.policy.evaluate import mean_ci

# (label, file in the run dir, key path to the value, key paths to its CI [lo, hi] or None, reference)
# The reference is what "no effect" is: 0 for a difference, chance for identification, None: no test.
FIGURES = [
    ("tokenizer held-out PSNR, dB", "tokenizer/eval.json", ("eval_psnr",), None, None),
    (
        "open loop K=4 PSNR, dB",
        "dream/results.json",
        ("metrics", "eval_psnr_K4"),
        (("metrics", "eval_psnr_K4_lo"), ("metrics", "eval_psnr_K4_hi")),
        None,
    ),
    (
        "K=4 - copy-last (tokenized), dB",
        "dream/results.json",
        ("metrics", "eval_psnr_K4_minus_copy_last_tokenized"),
        (
            ("metrics", "eval_psnr_K4_minus_copy_last_tokenized_lo"),
            ("metrics", "eval_psnr_K4_minus_copy_last_tokenized_hi"),
        ),
        0.0,
    ),
    (
        "movement identification (chance 0.2)",
        "dream/results.json",
        ("metrics", "grounding_identification_movement"),
        (("metrics", "grounding_identification_movement_lo"), ("metrics", "grounding_identification_movement_hi")),
        0.2,
    ),
    (
        "next-frame latent MSE, generated - copy-last",
        "dream/results.json",
        ("metrics", "grounding_latent_mse_minus_copy"),
        (("metrics", "grounding_latent_mse_minus_copy_lo"), ("metrics", "grounding_latent_mse_minus_copy_hi")),
        0.0,
    ),
    ("real return, random", "evaluate/results.json", ("policies", "random", "return_mean"), None, None),
    ("real return, BC", "evaluate/results.json", ("policies", "bc", "return_mean"), None, None),
    ("real return, imagination", "evaluate/results.json", ("policies", "imagine", "return_mean"), None, None),
    *[
        (
            f"{a} - {b}, real return (paired)",
            "evaluate/results.json",
            ("comparisons", key, "mean"),
            (("comparisons", key, "ci95", 0), ("comparisons", key, "ci95", 1)),
            0.0,
        )
        for a, b, key in (
            ("BC", "random", "bc_minus_random"),
            ("imagination", "BC", "imagine_minus_bc"),
            ("imagination", "random", "imagine_minus_random"),
        )
    ],
    (
        "imagined - real return, 16 steps",
        "evaluate/results.json",
        ("imagination", "imagined_minus_real", "mean"),
        (("imagination", "imagined_minus_real", "ci95", 0), ("imagination", "imagined_minus_real", "ci95", 1)),
        0.0,
    ),
    ("imagined vs real return, correlation", "evaluate/results.json", ("imagination", "correlation"), None, None),
]

DONE = "report.html"  # `dreamer4 run` writes it after its last stage


def _get(d, path):
    for k in path:
        d = d[k]
    return float(d)


def read_run(run: Path) -> dict:
    """{label: {"value", "ci95" (or None)}} of one finished run. A missing file names the run and file."""
    out, cache = {}, {}
    for label, rel, key, ci, _ in FIGURES:
        p = run / rel
        if rel not in cache:
            if not p.exists():
                raise FileNotFoundError(f"{p} is missing: is {run} a finished `dreamer4 run` directory?")
            cache[rel] = json.loads(p.read_text())
        d = cache[rel]
        try:
            out[label] = {"value": _get(d, key), "ci95": [_get(d, c) for c in ci] if ci else None}
        except (KeyError, IndexError, TypeError) as e:
            raise KeyError(f"{p} has no {'/'.join(map(str, key))} ({e!r}); written by an older version?") from e
    return out


def pool(runs: dict[str, dict]) -> dict:
    """Per figure over runs: mean, sd (ddof 1), min, max, the t-interval over the per-run values, and
    how many runs' own CIs lie wholly above / below the reference."""
    pooled = {}
    for label, _, _, _, ref in FIGURES:
        vals = np.array([r[label]["value"] for r in runs.values()], np.float64)
        finite = vals[np.isfinite(vals)]
        p = {
            **mean_ci(finite),
            "sd": float(finite.std(ddof=1)) if finite.size > 1 else math.nan,
            "min": float(finite.min()) if finite.size else math.nan,
            "max": float(finite.max()) if finite.size else math.nan,
            "reference": ref,
        }
        if ref is not None:
            cis = [r[label]["ci95"] for r in runs.values() if r[label]["ci95"]]
            p["runs_above"] = sum(lo > ref for lo, _ in cis)
            p["runs_below"] = sum(hi < ref for _, hi in cis)
        pooled[label] = p
    return pooled


def run_seed(config: str, run: Path, seed: int, overrides: list[str], log) -> float:
    """`dreamer4 run` for one seed in a subprocess (its output to RUN.log); wall seconds."""
    run.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dreamer4.cli", "run", "--config", config, "--run", str(run), "--set", f"seed={seed}"]
    for o in overrides:
        cmd += ["--set", o]
    log(f"seed {seed}: {' '.join(cmd[2:])} (output in {run}.log)")
    t0 = time.time()
    with open(f"{run}.log", "a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"seed {seed}: `dreamer4 run` exited {rc}; see {run}.log (rerun to continue it)")
    return time.time() - t0


def _f(x: float, signed: bool = True) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def markdown(res: dict) -> str:
    names = list(res["runs"])
    lines = [
        "| figure | " + " | ".join(names) + " | mean [95% CI over runs] | sd | runs' own CI above / below ref |",
        "|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for label, _, _, _, ref in FIGURES:
        cells, signed = [], ref == 0.0  # a difference: printed with its sign
        for n in names:
            v = res["runs"][n]["figures"][label]
            ci = f" [{_f(v['ci95'][0], signed)}, {_f(v['ci95'][1], signed)}]" if v["ci95"] else ""
            cells.append(_f(v["value"], signed) + ci)
        p = res["pooled"][label]
        side = f"{p['runs_above']} / {p['runs_below']} (ref {ref:g})" if ref is not None else ""
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {_f(p['mean'], signed)} [{_f(p['ci95'][0], signed)}, "
            f"{_f(p['ci95'][1], signed)}] | {_f(p['sd'], False)} | {side} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--seeds", default="", help="comma-separated seeds to run (or reuse) under --root")
    ap.add_argument("--root", default="runs/seeds", help="seed s runs in ROOT/seed{s}")
    ap.add_argument("--run", action="append", default=[], help="a finished run made elsewhere (repeatable)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="JSON path (default ROOT/seeds.json)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds and not args.run:
        ap.error("give --seeds and/or --run")
    if any(o.split("=", 1)[0] == "seed" for o in args.overrides):
        ap.error("--set seed=... is what --seeds sets")

    def log(msg):
        print(f"[tiny_seeds] {msg}", flush=True)

    runs, walls = {}, {}
    for s in seeds:
        run = Path(args.root) / f"seed{s}"
        if not (run / DONE).exists():
            walls[f"seed {s}"] = run_seed(args.config, run, s, args.overrides, log)
        runs[f"seed {s}"] = run
    for r in args.run:
        runs[str(r)] = Path(r)
    res = {
        "config": args.config,
        "overrides": args.overrides,
        "runs": {
            name: {"dir": str(run), "figures": read_run(run), "wall_s": walls.get(name)} for name, run in runs.items()
        },
    }
    res["pooled"] = pool({n: r["figures"] for n, r in res["runs"].items()})
    table = markdown(res)
    print(table)
    out = Path(args.out) if args.out else Path(args.root) / "seeds.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    log(f"written to {out}")
    return res


if __name__ == "__main__":
    main()

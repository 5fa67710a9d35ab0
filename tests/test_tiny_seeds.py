"""benchmarks/tiny_seeds.py: reading finished runs and pooling their figures over seeds."""

import json
import math
from pathlib import Path

import pytest
from conftest import bench_module

ts = bench_module("tiny_seeds")


def _fake_run(root: Path, k: float) -> Path:
    """A run dir whose results files hold every figure tiny_seeds reads, scaled by k."""
    root.mkdir(parents=True)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "eval.json").write_text(json.dumps({"eval_psnr": 16.0 + k}))
    m = {}
    for key in (
        "eval_psnr_K4",
        "eval_psnr_K4_minus_copy_last_tokenized",
        "grounding_identification_movement",
        "grounding_latent_mse_minus_copy",
    ):
        m[key], m[key + "_lo"], m[key + "_hi"] = k, k - 0.5, k + 0.5
    (root / "dream").mkdir()
    (root / "dream" / "results.json").write_text(json.dumps({"metrics": m}))
    comp = {
        c: {"mean": k, "ci95": [k - 0.5, k + 0.5], "n": 256}
        for c in ("bc_minus_random", "imagine_minus_bc", "imagine_minus_random")
    }
    ev = {
        "policies": {p: {"return_mean": k} for p in ("random", "bc", "imagine")},
        "comparisons": comp,
        "imagination": {"imagined_minus_real": {"mean": k, "ci95": [k - 0.5, k + 0.5]}, "correlation": k},
    }
    (root / "evaluate").mkdir()
    (root / "evaluate" / "results.json").write_text(json.dumps(ev))
    return root


def test_pooled_figures_are_the_t_interval_over_runs_and_count_each_runs_ci(tmp_path):
    runs = {f"r{k}": ts.read_run(_fake_run(tmp_path / f"r{k}", k)) for k in (1.0, 2.0, 3.0)}
    assert runs["r2.0"]["real return, BC"] == {"value": 2.0, "ci95": None}
    p = ts.pool(runs)["imagination - BC, real return (paired)"]
    # values 1, 2, 3: mean 2, sd 1, t_{0.975, 2} = 4.302653 -> half-width 4.302653 / sqrt(3) = 2.484138
    assert p["mean"] == pytest.approx(2.0)
    assert p["sd"] == pytest.approx(1.0)
    assert p["ci95"] == pytest.approx([2.0 - 2.484138, 2.0 + 2.484138], abs=1e-5)
    assert (p["min"], p["max"], p["n"]) == (1.0, 3.0, 3)
    # own CIs [0.5, 1.5], [1.5, 2.5], [2.5, 3.5]: all above 0, none below
    assert (p["runs_above"], p["runs_below"]) == (3, 0)
    # identification against chance 0.2: every run's lower bound (0.5, 1.5, 2.5) is above it
    ident = ts.pool(runs)["movement identification (chance 0.2)"]
    assert ident["reference"] == 0.2 and ident["runs_above"] == 3
    # own CIs [-1.5, -0.5] (below 0), [-0.25, 0.75] (includes 0), [2.5, 3.5] (above)
    mixed = {f"m{k}": ts.read_run(_fake_run(tmp_path / f"m{k}", k)) for k in (-1.0, 0.25, 3.0)}
    m = ts.pool(mixed)["BC - random, real return (paired)"]
    assert (m["runs_above"], m["runs_below"]) == (1, 1)
    # a figure without a reference has no counts
    assert "runs_above" not in ts.pool(runs)["real return, BC"]
    assert math.isnan(ts.pool({"one": runs["r1.0"]})["real return, BC"]["sd"])


def test_a_run_that_is_not_finished_is_named(tmp_path):
    run = _fake_run(tmp_path / "r", 1.0)
    (run / "evaluate" / "results.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"r/evaluate/results.json is missing"):
        ts.read_run(run)
    (run / "evaluate" / "results.json").write_text(json.dumps({"policies": {}}))
    with pytest.raises(KeyError, match=r"has no policies/random/return_mean"):
        ts.read_run(run)


def test_seed_comes_from_seeds_not_set(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        ts.main(["--seeds", "1", "--root", str(tmp_path), "--set", "seed=3"])
    assert exit_.value.code == 2 and "--set seed=... is what --seeds sets" in capsys.readouterr().err

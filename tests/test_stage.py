"""The stage contract (runtime/stage.py) on a hand-made run directory: no training needed."""

import json
from pathlib import Path

import pytest

from dreamer4.config import ConfigError, load_config, save_config
from dreamer4.data.store import DatasetError
from dreamer4.runtime.stage import STAGES, StageDir

REPO = Path(__file__).parent.parent


def _cfg(*overrides):
    return load_config(REPO / "configs" / "tiny.yaml", list(overrides))


def _fake_checkpoint(stage: StageDir, step: int, meta: dict) -> None:
    d = stage.checkpoints / str(step) / "meta"
    d.mkdir(parents=True)
    (d / "metadata").write_text(json.dumps({"step": step, **meta}))


def test_resume_compares_only_the_network_part(tmp_path):
    stage = StageDir(tmp_path, "dynamics")
    save_config(_cfg(), stage.dir)
    # training, sampling and evaluation keys may change on resume
    stage.check_network(
        _cfg(
            "dynamics.train.steps=5",
            "dynamics.eval_horizon=3",
            "dynamics.sample_steps=2",
            "dynamics.context_tau=0.5",
            "dynamics.single_image_share=0.1",
        )
    )
    with pytest.raises(ConfigError, match="another dynamics network config"):
        stage.check_network(_cfg("dynamics.width=32"))
    with pytest.raises(ConfigError, match="another dynamics network config"):
        stage.check_network(_cfg("dynamics.k_max=8"))


def test_facts_completeness_and_results(tmp_path):
    cfg = _cfg()
    tok = StageDir(tmp_path, "tokenizer")
    with pytest.raises(DatasetError, match="holds no trained tokenizer.*train-tokenizer"):
        tok.facts()
    assert not tok.is_complete(cfg) and tok.results() == {}
    save_config(cfg, tok.dir)
    _fake_checkpoint(tok, 250, {"frame_shape": [63, 63, 3], "data": "d"})
    assert tok.facts() == {"frame_shape": [63, 63, 3], "data": "d"} and not tok.is_complete(cfg)
    _fake_checkpoint(tok, cfg.tokenizer.train.steps, {"frame_shape": [63, 63, 3], "data": "d"})
    assert tok.is_complete(cfg) and tok.latest_step() == cfg.tokenizer.train.steps
    tok.write_results({"eval_psnr": 20.0})
    assert tok.results() == {"eval_psnr": 20.0}
    # an evaluation stage is complete once its results file exists, however it was run
    dream = StageDir(tmp_path, "dream")
    assert not dream.is_complete(cfg)
    dream.write_results({"metrics": {}})
    assert dream.is_complete(cfg) and dream.results_path.name == "results.json"
    # a training stage without evaluation returns its last logged training metrics
    bc = StageDir(tmp_path, "agent_bc")
    bc.dir.mkdir()
    (bc.dir / "metrics.jsonl").write_text('{"step": 2, "loss": 3.0}\n{"step": 4, "loss": 2.0}\n')
    assert bc.results() == {"step": 4, "loss": 2.0}


def test_every_stage_has_a_command_and_a_results_file():
    for name, spec in STAGES.items():
        assert spec.name == name and spec.command and spec.results.endswith(".json")
    with pytest.raises(ValueError, match="unknown stage"):
        StageDir("r", "nope")


def test_report_summary_states_grounding_and_agent_verdicts_with_their_intervals():
    from dreamer4.pipelines.report import summary_lines

    ci = {"mean": 0.0, "ci95": [0.0, 0.0]}
    dream = {
        "grounding": {
            "identification_movement": {"accuracy": 0.21, "ci95": [0.15, 0.28], "n": 100, "chance": 0.2},
            "latent_mse_generated": {**ci, "mean": 0.05},
            "latent_mse_copy_last": {**ci, "mean": 0.03},
            "latent_mse_generated_minus_copy": {"mean": 0.02, "ci95": [0.01, 0.03]},
            "pixel_mse_generated": {**ci, "mean": 0.004},
            "pixel_mse_copy_last_frame": {**ci, "mean": 0.006},
            "pixel_mse_generated_minus_copy": {"mean": -0.002, "ci95": [-0.003, -0.001]},
            "psnr_generated": {**ci, "mean": 24.0},
            "psnr_copy_last_frame": {**ci, "mean": 31.0},
        }
    }

    def pol(m, sd, n=64):
        return {"return_mean": m, "return_std": sd, "episodes": n}

    # difference 1.0, se = sqrt(2 * 1/64) = 0.1768, CI 1.0 +- 0.3465 excludes 0
    ev = {"max_steps": 200, "policies": {"bc": pol(1.0, 1.0), "imagine": pol(2.0, 1.0), "random": pol(0.5, 1.0)}}
    lines = summary_lines(dream, ev)
    assert "NOT shown" in lines[0] and "21% of 100" in lines[0] and "chance 20%" in lines[0]
    assert lines[1].startswith("One-step prediction is worse than copying")
    # decoded pixels can disagree with latents: each verdict follows its own interval
    assert lines[2].startswith("Decoded, it is better than copying") and "-0.00300 to -0.00100" in lines[2]
    assert "beat behaviour cloning" in lines[3] and "+0.65 to +1.35" in lines[3]
    ev["policies"]["imagine"] = pol(1.2, 1.0)
    assert "did not beat" in summary_lines(dream, ev)[3]
    # results written before the probe measured pixels: no pixel line
    del dream["grounding"]["pixel_mse_generated_minus_copy"]
    lines = summary_lines(dream, ev)
    assert len(lines) == 4 and "not the spread between training seeds" in lines[-1]
    assert summary_lines({}, {}) == []

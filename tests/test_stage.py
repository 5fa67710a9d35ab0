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

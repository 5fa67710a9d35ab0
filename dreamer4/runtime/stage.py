"""The stage contract: what a stage's directory in a run holds, and how every command reads it.

RUN_DIR/
  config.yaml       the resolved config of `dreamer4 run`
  dataset/          collect (a dataset directory, data/store.py)
  behavior/         train-behavior (PPO)
  tokenizer/        train-tokenizer
  dynamics/         train-dynamics
  dream/            dream (open-loop evaluation of the world model)
  agent_bc/         train-agent, phase bc
  agent/            train-agent, phase imagine
  evaluate/         evaluate (the agents in the real game and in imagination)
  report.html       report

A training stage directory holds config.yaml (the resolved config it was trained with),
checkpoints/<step>/ (state + JSON meta: step, loader position, config and the stage's model facts
such as frame shape, action count and dataset), metrics.jsonl, images/, its results file
(eval.json) and `lock` (held by the job training it: one writer per stage, runtime/lock.py). An evaluation stage holds results.json, written last (its commit marker).

`StageDir` is the one place that knows these paths and reads them: the saved config, the model
facts from the latest checkpoint's meta, the network-compatibility check on resume (only the
network part of the stage's config must match), the dataset check against the model facts,
completeness (the final checkpoint exists / the results file exists) and the results. Nothing
else builds a stage path by hand.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamer4.config import Config, ConfigError, load_config
from dreamer4.data.store import Dataset, DatasetError
from dreamer4.runtime.checkpoint import checkpoint_steps, read_meta
from dreamer4.runtime.distributed import is_main_process
from dreamer4.runtime.logging import read_metrics

RUN_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"  # STAGE_DIR/checkpoints/<step>/
LOCK = "lock"  # STAGE_DIR/lock: held by the job training the stage (runtime/lock.py)
TRAIN_RESULTS = "eval.json"  # a training stage's evaluation at its final step
# what a model was made for, saved in every checkpoint's meta by the stage that trains it
MODEL_FACTS = ("frame_shape", "num_actions", "data")
DATASET = "dataset"
REPORT = "report.html"
STAGE_TIMES = "stage_times.json"


@dataclass(frozen=True)
class StageSpec:
    name: str  # directory under RUN_DIR and the stage's name in logs
    command: str  # the `dreamer4` command that writes it
    section: str = ""  # the config section whose network part must match on resume ("" = none)
    # final step of a training stage (complete once a checkpoint of that step exists);
    # None: an evaluation stage, complete once its results file exists
    steps: Callable[[Config], int] | None = None
    results: str = TRAIN_RESULTS  # file of the results the stage returns


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("behavior", "train-behavior", "behavior", lambda c: c.behavior.num_updates),
        StageSpec("tokenizer", "train-tokenizer", "tokenizer", lambda c: c.tokenizer.train.steps),
        StageSpec("dynamics", "train-dynamics", "dynamics", lambda c: c.dynamics.train.steps),
        StageSpec("dream", "dream", results="results.json"),
        StageSpec("agent_bc", "train-agent --phase bc", "agent", lambda c: c.agent.bc.steps),
        StageSpec("agent", "train-agent", "agent", lambda c: c.agent.imagine.steps),
        StageSpec("evaluate", "evaluate", results="results.json"),
    )
}


def open_dataset(data_dir: str | Path, cfg: Config | None = None) -> Dataset:
    """The dataset a stage trains or evaluates on, checked to be of the config's env."""
    return Dataset.open(data_dir, env_name=None if cfg is None else cfg.env.name)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically, on process 0 only."""
    if not is_main_process():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


class StageDir:
    """RUN_DIR/<stage>: its paths, saved config, model facts, checks, completeness and results."""

    def __init__(self, run_dir: str | Path, name: str):
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        self.spec = STAGES[name]
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / name

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def config_path(self) -> Path:
        return self.dir / RUN_CONFIG

    @property
    def checkpoints(self) -> Path:
        return self.dir / CHECKPOINTS

    @property
    def lock_path(self) -> Path:
        return self.dir / LOCK

    @property
    def results_path(self) -> Path:
        return self.dir / self.spec.results

    def path(self, *parts: str) -> Path:
        """A file or folder of this stage (images/, videos/, table.md, ...)."""
        return self.dir.joinpath(*parts)

    def __repr__(self) -> str:
        return f"StageDir({str(self.dir)!r})"

    # -- what an earlier run left ----------------------------------------------------------------
    def saved_config(self) -> Config | None:
        return load_config(self.config_path) if self.config_path.exists() else None

    def network(self, cfg: Config):
        return getattr(cfg, self.spec.section).net

    def check_network(self, cfg: Config) -> None:
        """On resume, only the network part of the stage's config must be the same as the saved one;
        training, sampling and evaluation keys may change (e.g. more steps, another eval size)."""
        prev = self.saved_config()
        if prev is not None and self.spec.section and self.network(prev) != self.network(cfg):
            s = self.spec.section
            raise ConfigError(
                f"{self.config_path} was written with another {s} network config than this run's; "
                f"resume with the same {s}.* network keys, or use a new --run directory"
            )

    def latest_step(self) -> int | None:
        steps = checkpoint_steps(self.checkpoints)
        return steps[-1] if steps else None

    def has_model(self) -> bool:
        return self.latest_step() is not None and self.config_path.exists()

    def facts(self) -> dict:
        """The model facts saved with the latest checkpoint: frame_shape, num_actions (where the model
        acts), data (the dataset it was trained on)."""
        if not self.has_model():
            raise DatasetError(f"{self.dir} holds no trained {self.name} (run `dreamer4 {self.spec.command}` first)")
        meta = read_meta(self.checkpoints, self.latest_step())
        return {k: meta[k] for k in MODEL_FACTS if k in meta}

    def trained_config(self) -> Config:
        """The config the stage's model was trained with (a trained model is required)."""
        self.facts()
        return load_config(self.config_path)

    def check_dataset(self, ds: Dataset, facts: dict, data_dir) -> None:
        """The dataset must have the frames (and actions) the stage's model was made for."""
        shape = tuple(facts["frame_shape"])
        if tuple(ds.frame_shape) != shape:
            raise DatasetError(
                f"dataset {data_dir} has frames of shape {tuple(ds.frame_shape)} but the {self.name} "
                f"in {self.dir} is configured for {shape}; use a dataset of the same env/frame size"
            )
        if "num_actions" in facts and ds.num_actions != facts["num_actions"]:
            raise DatasetError(
                f"dataset {data_dir} has {ds.num_actions} actions but the {self.name} in {self.dir} "
                f"was made for {facts['num_actions']}"
            )

    # -- completeness and results ------------------------------------------------------------------
    def is_complete(self, cfg: Config) -> bool:
        """A training stage: its final checkpoint exists. An evaluation stage: its results file exists."""
        if self.spec.steps is None:
            return self.results_path.exists()
        last = self.latest_step()
        return last is not None and last >= self.spec.steps(cfg)

    def results(self) -> dict:
        """What the stage returns: its results file, or (a training stage without evaluation) its
        last logged training metrics; {} when there is nothing yet."""
        if self.results_path.exists():
            return json.loads(self.results_path.read_text())
        rows = [r for r in read_metrics(self.dir) if "loss" in r]
        return rows[-1] if rows else {}

    def write_results(self, results: dict) -> None:
        write_json(self.results_path, results)

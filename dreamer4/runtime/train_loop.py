"""The one training loop every stage shares: mesh, sharded state, compiled step, checkpoints,
resume, logging, NaN guard, evaluation hooks.

A stage supplies a `Stage`: its model (freshly initialised), a loss function, a factory for its
data iterator (a grain iterator with get_state/set_state), a function turning a loader batch into
model inputs, and an optional evaluation hook. `train(stage)` then

* builds the ("data", "fsdp") mesh and places model + optimizer state FSDP-sharded on it;
* compiles one train step (donated state buffers) with the optimiser
  clip_by_global_norm -> AdamW with linear warm-up and cosine decay;
* restores the newest checkpoint of STAGE_DIR/checkpoints that restores, if there is one (model,
  optimizer, step, data-iterator state), onto the current mesh, whatever mesh saved it; a damaged
  newer step is moved aside (runtime/checkpoint.py), and metrics.jsonl is cut back to the step;
* hands every step's metrics to the host-loop core shared with PPO (runtime/host_loop.py), which
  logs every `log_every` steps (process 0: metrics.jsonl, wandb, progress bar) and checks that
  every loss since the last check was finite: a NaN/inf stops the run with a message naming the
  step, saves the offending batch and metrics under STAGE_DIR/nan_debug/, and never overwrites a
  good checkpoint (checkpoints are only written right after such a check passed);
* checkpoints every `ckpt_every` steps and at the end, then runs the evaluation hook;
* holds STAGE_DIR/lock while it runs (runtime/lock.py: a second job on the same stage stops with
  one sentence) and stops with a checkpoint at the next step boundary after a SIGTERM, SIGUSR1 or
  SIGINT (runtime/preempt.py, through the host loop).

Multi-process (one JAX multi-controller job, see runtime/distributed.py): every process runs this
same loop on its own rows of each global batch. Every decision about when to stop is taken on
values all processes share: the step count, and the metrics of the compiled step, which are
computed over the global batch and replicated, so a non-finite loss stops every process at the
same step. Checkpoint saves and restores are collective (every process writes its shards).
Evaluation runs on process 0 alone, on a host-local copy of the weights, while the others wait at
a barrier; only process 0 logs, prints and writes files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from dreamer4.config import Config, ConfigError, TrainConfig, save_config, to_dict
from dreamer4.data.loader import WindowSource, saved_process_count, source_loader
from dreamer4.runtime.checkpoint import Checkpointer, abstract_like
from dreamer4.runtime.distributed import barrier, is_main_process, log0
from dreamer4.runtime.host_loop import HostLoop, mean_metrics
from dreamer4.runtime.lock import stage_lock
from dreamer4.runtime.logging import MetricLogger
from dreamer4.runtime.mesh import batch_sharding, global_batch, make_mesh, state_shardings
from dreamer4.runtime.optim import make_optimizer
from dreamer4.runtime.stage import CHECKPOINTS, LOCK, TRAIN_RESULTS


@dataclass
class Stage:
    name: str
    stage_dir: Path
    cfg: Config
    train: TrainConfig
    model: nnx.Module
    # loss_fn(model, batch, key) -> (scalar loss, dict of scalar metrics)
    loss_fn: Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]
    # make_iterator() -> a fresh grain iterator over process-local batches
    make_iterator: Callable[[], Iterator]
    # prepare(local numpy batch, step) -> dict of numpy arrays the loss reads (leading dim = batch)
    prepare: Callable[[dict, int], dict]
    # evaluate(model, step, logger) -> dict of metrics (also saved to STAGE_DIR/eval.json at the end)
    evaluate: Callable[[nnx.Module, int, MetricLogger], dict] | None = None
    # extra JSON facts saved with every checkpoint (e.g. the model's shape config)
    meta: dict | None = None
    # which variables the optimizer trains (e.g. only the dynamics inside a world model that
    # also holds a frozen tokenizer); everything else is carried, checkpointed, never updated
    trainable: Any = nnx.Param


class NonFiniteLoss(FloatingPointError):
    pass


def loader_factory(
    source: WindowSource, cfg: Config, batch_size: int, *, batch_key: str = "loader.batch_size"
) -> Callable[[], Iterator]:
    """A Stage's `make_iterator`: a fresh iterator over this process's rows of `source`'s batches
    (`batch_key`: the config key the batch size comes from, for error messages)."""
    return lambda: iter(source_loader(source, cfg, batch_size=batch_size, batch_key=batch_key))


def train_state(model: nnx.Module, tc: TrainConfig, mesh, trainable=nnx.Param):
    """(graphdef, state, shardings) of model + optimizer: the state where it was built, and the
    FSDP shardings it takes on `mesh` (`place_train_state` puts it there)."""
    optimizer = nnx.Optimizer(model, make_optimizer(tc), wrt=trainable)
    graphdef, state = nnx.split((model, optimizer))
    return graphdef, state, state_shardings(mesh, state)


def place_train_state(model: nnx.Module, tc: TrainConfig, mesh, trainable=nnx.Param):
    """(graphdef, state, shardings) of model + optimizer, the state FSDP-sharded on `mesh`."""
    graphdef, state, shardings = train_state(model, tc, mesh, trainable)
    return graphdef, jax.device_put(state, shardings), shardings


def compile_train_step(graphdef, loss_fn, shardings, mesh, trainable=nnx.Param):
    """jit(step(state, batch, key) -> (state, metrics)) with the state donated and kept sharded."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step_fn(state, batch, key):
        model, opt = nnx.merge(graphdef, state)
        (loss, metrics), grads = nnx.value_and_grad(
            lambda m: loss_fn(m, batch, key), argnums=nnx.DiffState(0, trainable), has_aux=True
        )(model)
        with jax.named_scope("optimizer"):  # names the update's kernels in profiles
            opt.update(model, grads)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return nnx.state((model, opt)), metrics

    return jax.jit(
        step_fn,
        donate_argnums=(0,),
        in_shardings=(shardings, batch_sharding(mesh), replicated),
        out_shardings=(shardings, replicated),
    )


def local_copy(graphdef, state, mesh):
    """The model (and optimizer) with every weight fully on this process, for process-local work.

    Gathering is a collective: every process must call this, whatever it does with the result."""
    if jax.process_count() == 1:
        return nnx.merge(graphdef, state)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    full = jax.jit(lambda s: s, out_shardings=replicated)(state)
    local = jax.device_put(jax.device_get(full), jax.local_devices()[0])
    return nnx.merge(graphdef, local)


def agree(value: int, what: str) -> None:
    """Fail loudly (rather than hang later) if the processes disagree on an integer."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        barrier(f"agree {what}")  # line up first: the comparison itself is a device collective
        multihost_utils.assert_equal(np.asarray(value, np.int64), f"processes disagree on {what}")


# The config section holding each stage's TrainConfig (for error messages naming the user's key).
TRAIN_KEYS = {
    "tokenizer": "tokenizer.train",
    "dynamics": "dynamics.train",
    "agent_bc": "agent.bc",
    "agent": "agent.imagine",
}


def _check_batch(stage_name: str, tc: TrainConfig, mesh) -> None:
    n = mesh.devices.size
    if tc.batch_size % n:
        key = f"{TRAIN_KEYS.get(stage_name, 'train')}.batch_size"
        raise ConfigError(f"config key '{key}' ({tc.batch_size}) must be divisible by the number of devices ({n})")


def train(stage: Stage) -> nnx.Module:
    stage_dir = Path(stage.stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    # One writer per stage directory: refuse (StageLockedError) while another live job trains it.
    with stage_lock(stage_dir / LOCK, stage.name, log=log0):
        return _train(stage, stage_dir)


def _train(stage: Stage, stage_dir: Path) -> nnx.Module:
    tc, cfg = stage.train, stage.cfg
    if is_main_process():
        save_config(cfg, stage_dir)
    mesh = make_mesh(cfg.runtime.fsdp)
    _check_batch(stage.name, tc, mesh)

    graphdef, state, shardings = place_train_state(stage.model, tc, mesh, stage.trainable)
    leaves = jax.tree.leaves(shardings)
    split = sum(any(a is not None for a in sh.spec) for sh in leaves)
    log0(
        f"[{stage.name}] mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} over "
        f"{jax.process_count()} process(es); {split}/{len(leaves)} state arrays sharded over 'fsdp'"
    )
    ckpt = Checkpointer(stage_dir / CHECKPOINTS, keep=tc.keep_checkpoints)
    logger = MetricLogger(
        stage_dir, stage.name, to_dict(cfg), mode=cfg.runtime.wandb, project=cfg.runtime.wandb_project
    )
    it = stage.make_iterator()
    loader = getattr(it, "loader", None)
    if hasattr(loader, "describe"):
        log0(f"[{stage.name}] data: {loader.describe()}")
    step = 0
    found = ckpt.restore_latest_good(abstract_like(state, shardings), log=lambda m: log0(f"[{stage.name}] {m}"))
    if found is not None:
        _, state, meta = found
        step = int(meta["step"])
        saved = meta["data_state"].encode()
        before, now = meta.get("process_count", saved_process_count(saved)), jax.process_count()
        try:
            it.set_state(saved)
            if before is not None and before != now:
                # The loader's global stream does not depend on the process count (data/loader.py).
                log0(
                    f"[{stage.name}] process count changed ({before} -> {now}): the data stream continues "
                    f"at the same global batch, each process now reading 1/{now} of it"
                )
        except Exception as e:  # another dataset, batch size or seed: restart the stream deterministically
            it = stage.make_iterator()
            log0(
                f"[{stage.name}] data iterator restarted from its beginning: the saved position does not fit "
                f"this run ({e.__class__.__name__}: {e})"
            )
        log0(
            f"[{stage.name}] resumed from checkpoint step {step} in {ckpt.directory} "
            f"(saved by {before or '?'} processes, now {now})"
        )
    agree(step, "the step to start from")
    # Lines logged after the checkpoint we resume from would repeat steps: drop them.
    logger.truncate_after(step)

    train_step = compile_train_step(graphdef, stage.loss_fn, shardings, mesh, stage.trainable)
    compiled: dict = {}  # batch shapes -> the step compiled for them
    base_key = jax.random.PRNGKey(cfg.seed)
    last_batch: dict | None = None

    def on_nonfinite(s: int, m: dict) -> None:
        debug = stage_dir / "nan_debug"
        debug.mkdir(exist_ok=True)
        if is_main_process():
            (debug / "metrics.json").write_text(
                json.dumps({"step": s, "metrics": {k: float(v) for k, v in m.items()}}, indent=1)
            )
        if last_batch is not None:  # each process saves its own rows of the batch
            suffix = "" if is_main_process() else f"_p{jax.process_index()}"
            np.savez_compressed(debug / f"last_batch{suffix}.npz", **last_batch)
        raise NonFiniteLoss(
            f"[{stage.name}] loss or gradient became non-finite at step {s} "
            f"({ {k: float(v) for k, v in m.items()} }); the last good checkpoint is step {ckpt.latest_step()} in "
            f"{ckpt.directory} (not overwritten); the batch and metrics are in {debug}"
        )

    def summarize(host: list[dict], steps: int, seconds: float) -> dict:
        return dict(mean_metrics(host), steps_per_s=steps / seconds)

    def save_state(s: int) -> tuple:
        return state, {
            "step": s,
            "data_state": it.get_state().decode(),
            "stage": stage.name,
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
            "config": to_dict(cfg),
            **(stage.meta or {}),
        }

    # m holds the replicated metrics of the global batch: every process sees the same values in a
    # flush and stops at the same step.
    loop = HostLoop(
        stage.name,
        total=tc.steps,
        initial=step,
        unit="step",
        log_every=tc.log_every,
        ckpt_every=tc.ckpt_every,
        ckpt=ckpt,
        logger=logger,
        save_state=save_state,
        summarize=summarize,
        progress=lambda m: {"loss": m["loss"], "steps_per_s": m["steps_per_s"]},
        on_nonfinite=on_nonfinite,
    )

    def run_eval(s: int) -> dict | None:
        """Evaluate on process 0 (a local copy of the weights); the others wait."""
        model, _ = local_copy(graphdef, state, mesh)
        results = None
        if is_main_process():
            results = stage.evaluate(model, s, logger)
            logger.log(s, results)
        barrier(f"{stage.name}-eval-{s}")
        return results

    try:
        while step < tc.steps:
            local = stage.prepare(next(it), step)
            last_batch = local
            batch = global_batch(mesh, local)
            key = jax.random.fold_in(base_key, step)
            shape = tuple(sorted((k, v.shape) for k, v in batch.items()))
            if shape not in compiled:
                # Compile each batch shape ahead and meet before its first run: the step's first
                # cross-process collective must not wait out gloo's 30 s connect window while
                # another process is still compiling (a real-Slurm CI run under load did).
                compiled[shape] = train_step.lower(state, batch, key).compile()
                barrier(f"{stage.name}-compiled-{len(compiled)}")
            state, metrics = compiled[shape](state, batch, key)
            step += 1
            loop.record(step, metrics)
            if stage.evaluate is not None and tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                run_eval(step)
        loop.finish(step)
        if stage.evaluate is not None:
            results = run_eval(step)
            if is_main_process():
                (stage_dir / TRAIN_RESULTS).write_text(json.dumps({"step": step, **results}, indent=1))
            barrier(f"{stage.name}-eval-written")
        model, _ = nnx.merge(graphdef, state)
        return model
    finally:
        loop.close()

"""`dreamer4 <command>`: one command table (arguments + what to call), nothing else."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dreamer4.config import ConfigError, load_config
from dreamer4.data.store import DatasetError
from dreamer4.pipelines.dataset import print_info, run_import_video, run_rebuild_manifest, run_verify
from dreamer4.pipelines.report import write_report
from dreamer4.pipelines.run import run_all
from dreamer4.pipelines.stages import (
    run_collect,
    run_dream,
    run_evaluate,
    run_train_agent,
    run_train_behavior,
    run_train_dynamics,
    run_train_tokenizer,
)
from dreamer4.play.server import run_play
from dreamer4.runtime.distributed import add_distributed_args, initialize_from_args, is_main_process
from dreamer4.runtime.faults import CheckpointError, DiskFullError, StageLockedError
from dreamer4.runtime.jax_setup import enable_compilation_cache
from dreamer4.runtime.preempt import EXIT_PREEMPTED, Preempted, handling


def config_args(p: argparse.ArgumentParser, default: str | None = "configs/tiny.yaml") -> None:
    p.add_argument(
        "--config", default=default, help="YAML preset (configs/tiny.yaml, grounded.yaml, classic.yaml, full.yaml)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set collect.num_envs=32 (repeatable)",
    )


def config_of(args: argparse.Namespace, extra: list[str] = ()):
    return load_config(args.config, list(args.overrides) + list(extra))


def data_run_args(p: argparse.ArgumentParser, run_help: str) -> None:
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--run", required=True, help=run_help)


# ----------------------------------------------------------------------------- argument sets
def _run_args(p):
    config_args(p)
    p.add_argument("--run", default="runs/tiny", help="run directory (default runs/tiny)")


def _collect_args(p):
    config_args(p)
    p.add_argument("--out", required=True, help="dataset directory (created, or continued)")
    p.add_argument("--writer-id", type=int, default=None, help="this writer's index (default: the JAX process index)")
    p.add_argument(
        "--num-writers",
        type=int,
        default=None,
        help="writers filling the dataset together (default: the JAX process count)",
    )
    p.add_argument(
        "--policy",
        default=None,
        help="behaviour policy: random, sticky, walk or ppo:CHECKPOINT (collect.policy; replaces the preset's collect.mix)",
    )
    p.add_argument("--epsilon", type=float, default=None, help="probability of a random action (collect.epsilon)")
    p.add_argument(
        "--mix",
        default=None,
        metavar="SPEC=W,...",
        help="mixture of policies, e.g. ppo:runs/a=0.5,random=0.5 (collect.mix)",
    )


def _collect(args):
    # the flags are shorthands for collect.* keys (JSON-quoted for YAML)
    mix = args.mix
    if args.policy is not None and mix is None:
        mix = ""  # an explicit --policy replaces the preset's behaviour mix
    extra = [
        f"collect.{k}={json.dumps(v)}"
        for k, v in (("policy", args.policy), ("epsilon", args.epsilon), ("mix", mix))
        if v is not None
    ]
    run_collect(config_of(args, extra), args.out, writer_id=args.writer_id, num_writers=args.num_writers)


def _behavior_args(p):
    config_args(p)
    p.add_argument("--run", required=True, help="run directory (the stage writes RUN_DIR/behavior)")


def _tokenizer_args(p):
    config_args(p)
    data_run_args(p, "run directory (the stage writes RUN_DIR/tokenizer)")


def _dynamics_args(p):
    config_args(p)
    data_run_args(p, "run directory holding a trained tokenizer")


def _dream_args(p):
    p.add_argument("--run", required=True)
    p.add_argument("--seed", type=int, default=0)


def _agent_args(p):
    config_args(p)
    data_run_args(p, "run directory holding a trained world model")
    p.add_argument(
        "--phase",
        choices=["bc", "imagine", "all"],
        default="all",
        help="bc: behaviour cloning + reward model; imagine: RL in imagination; all: both (default)",
    )


def _evaluate_args(p):
    p.add_argument("--run", required=True)
    p.add_argument("--episodes", type=int, default=None, help="episodes per policy (default agent.eval_episodes)")
    p.add_argument("--seed", type=int, default=0)


def _evaluate(args):
    if args.episodes is not None and args.episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {args.episodes}")
    run_evaluate(args.run, args.episodes, args.seed)


def _report_args(p):
    p.add_argument("--run", required=True)


def _report(args):
    if not Path(args.run).is_dir():
        raise ConfigError(f"--run {args.run}: no such run directory")
    print(f"wrote {write_report(args.run)}")


def _play_args(p):
    p.add_argument(
        "--run", required=True, help="run directory with a trained tokenizer and dynamics (an agent is optional)"
    )
    p.add_argument("--port", type=int, default=8000, help="port to serve the page on (default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument(
        "--record",
        default=None,
        metavar="DATASET_DIR",
        help="append every real-game session to this dataset as a labeled episode (policy human)",
    )
    p.add_argument(
        "--context", type=int, default=None, help="context frames (default: the run's dynamics.eval_context)"
    )
    p.add_argument(
        "--cache-len",
        type=int,
        default=None,
        help="steps the KV cache holds before it slides (default: the dynamics' training seq_len)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first world (the page can change it)")


def _play(args):
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port {args.port}: expected 0..65535")
    return run_play(args.run, args.port, args.host, args.record, args.context, args.cache_len, args.seed)


def _dataset_args(p):
    dsub = p.add_subparsers(dest="dataset_command", required=True)
    q = dsub.add_parser("info", help="episodes, steps, label fraction, return and achievement statistics")
    q.add_argument("dir")
    q = dsub.add_parser("verify", help="re-read every committed shard and check it against the manifest")
    q.add_argument("dir")
    q = dsub.add_parser(
        "rebuild-manifest",
        help="restore a lost manifest.json from the shards' metadata "
        "(--move-aside: move the shards aside instead; nothing is deleted)",
    )
    q.add_argument("dir")
    q.add_argument("--move-aside", action="store_true")
    q = dsub.add_parser("import-video", help="add MP4/GIF/WebM files or PNG folders as unlabeled episodes")
    config_args(q)
    q.add_argument("--out", required=True, help="dataset directory (created, or added to)")
    q.add_argument(
        "--frame-shape", default=None, metavar="H,W,C", help="frame shape of a new dataset (default: the config's env)"
    )
    q.add_argument(
        "--fit",
        choices=("resize", "pad", "letterbox"),
        default="resize",
        help="how frames of another size are fitted (default resize)",
    )
    q.add_argument("--fps", type=float, default=None, help="frame rate to record where a file has none")
    q.add_argument("files", nargs="+", help="video files or folders of PNG frames")


def _dataset(args):
    if args.dataset_command == "import-video":
        run_import_video(
            config_of(args), args.out, args.files, frame_shape=args.frame_shape, fit=args.fit, fps=args.fps
        )
        return 0
    if args.dataset_command == "rebuild-manifest":
        return run_rebuild_manifest(args.dir, args.move_aside)
    if args.dataset_command == "info":
        print_info(args.dir)
        return 0
    return run_verify(args.dir)


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], object]  # an int it returns is the exit code (anything else: 0)
    distributed: bool = False  # takes --coordinator/--num-processes/--process-id/--process-per
    # SIGTERM / SIGUSR1 / SIGINT stop it at the next step boundary with a checkpoint (exit code 75)
    preemptible: bool = False


COMMANDS = (
    Command(
        "run",
        "run every stage into one run directory (resumable)",
        _run_args,
        lambda a: run_all(config_of(a), a.run),
        distributed=True,
        preemptible=True,
    ),
    Command(
        "collect",
        "collect Craftax episodes into a sharded TensorStore dataset",
        _collect_args,
        _collect,
        distributed=True,
        preemptible=True,
    ),
    Command(
        "train-behavior",
        "train a PPO behaviour policy online in Craftax (resumes RUN_DIR/behavior)",
        _behavior_args,
        lambda a: run_train_behavior(config_of(a), a.run),
        preemptible=True,
    ),
    Command(
        "train-tokenizer",
        "train the causal tokenizer (resumes RUN_DIR/tokenizer)",
        _tokenizer_args,
        lambda a: run_train_tokenizer(config_of(a), a.data, a.run),
        distributed=True,
        preemptible=True,
    ),
    Command(
        "train-dynamics",
        "train the dynamics with shortcut forcing (resumes RUN_DIR/dynamics)",
        _dynamics_args,
        lambda a: run_train_dynamics(config_of(a), a.data, a.run),
        distributed=True,
        preemptible=True,
    ),
    Command(
        "dream",
        "open-loop evaluation of RUN_DIR's world model: PSNR/SSIM, videos",
        _dream_args,
        lambda a: run_dream(a.run, a.seed),
    ),
    Command(
        "train-agent",
        "train the agent: BC + reward model, then RL in imagination (resumes RUN_DIR/agent_bc and RUN_DIR/agent)",
        _agent_args,
        lambda a: run_train_agent(config_of(a), a.data, a.run, a.phase),
        distributed=True,
        preemptible=True,
    ),
    Command("evaluate", "evaluate RUN_DIR's agents in the real game and in imagination", _evaluate_args, _evaluate),
    Command("report", "(re)write RUN_DIR/report.html from what the run holds", _report_args, _report),
    Command("dataset", "inspect a dataset", _dataset_args, _dataset),
    Command(
        "play",
        "play Craftax inside RUN_DIR's world model from a browser, beside the real game (--record: as data)",
        _play_args,
        _play,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dreamer4", description="Dreamer 4 on Craftax, offline-first, in JAX")
    sub = ap.add_subparsers(dest="command", required=True)
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help)
        c.arguments(p)
        if c.distributed:
            add_distributed_args(p)
    return ap


# Exit codes (README "Running on a cluster"; runtime/preempt.py)
EXIT_OK, EXIT_REFUSED, EXIT_NONFINITE = 0, 2, 3


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code: 0 done, 1 unexpected error, 2 refused (one sentence: config,
    dataset, checkpoint, full disk, stage locked by another job), 3 non-finite loss, 75 stopped by
    SIGTERM/SIGUSR1/SIGINT with everything saved (run the same command again to continue)."""
    args = build_parser().parse_args(argv)
    command = {c.name: c for c in COMMANDS}[args.command]
    enable_compilation_cache()
    try:
        if command.distributed:  # before anything touches a JAX backend
            initialize_from_args(args)
        # the handlers go in after jax.distributed (which would otherwise own SIGTERM)
        with handling() if command.preemptible else contextlib.nullcontext():
            rc = command.run(args)
        return rc if isinstance(rc, int) else EXIT_OK
    except (ConfigError, DatasetError, DiskFullError, CheckpointError, StageLockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except FloatingPointError as e:  # the train loop's NaN guard; its message says what was kept
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except Preempted as e:  # every process of a training job stops at the same step: one says so
        if is_main_process() or e.what.startswith("collect"):
            print(str(e), file=sys.stderr, flush=True)
        _mark_preempted(os.environ.get("DREAMER4_PREEMPT_MARK"), e)
        return EXIT_PREEMPTED


def _mark_preempted(path: str | None, e: Preempted) -> None:
    """Tell slurm/launch.sh that this task stopped with everything saved (it sets the path). srun
    kills a job step's other tasks once one exits 75, so their exit codes cannot say it."""
    if not path:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(f"{e}\n")
    except OSError as err:  # the exit code still says 75; only a multi-task requeue may be missed
        print(f"warning: could not write the preemption mark {path}: {err}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

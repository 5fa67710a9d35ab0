"""`dreamer4 <stage>`: argument parsing and dispatch, nothing else."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dreamer4.config import ConfigError, load_config
from dreamer4.data.store import DatasetError
from dreamer4.runtime.faults import CheckpointError, DiskFullError


def _add_config_args(p: argparse.ArgumentParser, default: str | None = "configs/tiny.yaml") -> None:
    p.add_argument("--config", default=default, help="YAML preset (configs/tiny.yaml, classic.yaml, full.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set collect.num_envs=32 (repeatable)")


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    """--coordinator/--num-processes/--process-id/--process-per (runtime/distributed.py)."""
    from dreamer4.runtime.distributed import add_distributed_args

    add_distributed_args(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dreamer4", description="Dreamer 4 on Craftax, offline-first, in JAX")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run every stage into one run directory (resumable)")
    _add_config_args(p)
    p.add_argument("--run", default="runs/tiny", help="run directory (default runs/tiny)")
    _add_distributed_args(p)

    p = sub.add_parser("collect", help="collect Craftax episodes into a sharded TensorStore dataset")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="dataset directory (created, or continued)")
    p.add_argument("--writer-id", type=int, default=None,
                   help="this writer's index (default: the JAX process index)")
    p.add_argument("--num-writers", type=int, default=None,
                   help="writers filling the dataset together (default: the JAX process count)")
    p.add_argument("--policy", default=None, help="behaviour policy: random, sticky or ppo:CHECKPOINT (collect.policy)")
    p.add_argument("--epsilon", type=float, default=None, help="probability of a random action (collect.epsilon)")
    p.add_argument("--mix", default=None, metavar="SPEC=W,...",
                   help="mixture of policies, e.g. ppo:runs/a=0.5,random=0.5 (collect.mix)")
    _add_distributed_args(p)

    p = sub.add_parser("train-behavior", help="train a PPO behaviour policy online in Craftax (resumes RUN_DIR/behavior)")
    _add_config_args(p)
    p.add_argument("--run", required=True, help="run directory (the stage writes RUN_DIR/behavior)")

    p = sub.add_parser("train-tokenizer", help="train the causal tokenizer (resumes RUN_DIR/tokenizer)")
    _add_config_args(p)
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--run", required=True, help="run directory (the stage writes RUN_DIR/tokenizer)")
    _add_distributed_args(p)

    p = sub.add_parser("train-dynamics", help="train the dynamics with shortcut forcing (resumes RUN_DIR/dynamics)")
    _add_config_args(p)
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--run", required=True, help="run directory holding a trained tokenizer")
    _add_distributed_args(p)

    p = sub.add_parser("dream", help="open-loop evaluation of RUN_DIR's world model: PSNR/SSIM, videos")
    p.add_argument("--run", required=True)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("train-agent", help="train the agent: BC + reward model, then RL in imagination "
                                          "(resumes RUN_DIR/agent_bc and RUN_DIR/agent)")
    _add_config_args(p)
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--run", required=True, help="run directory holding a trained world model")
    p.add_argument("--phase", choices=["bc", "imagine", "all"], default="all",
                   help="bc: behaviour cloning + reward model; imagine: RL in imagination; all: both (default)")
    _add_distributed_args(p)

    p = sub.add_parser("evaluate", help="evaluate RUN_DIR's agents in the real game and in imagination")
    p.add_argument("--run", required=True)
    p.add_argument("--episodes", type=int, default=None, help="episodes per policy (default agent.eval_episodes)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("report", help="(re)write RUN_DIR/report.html from what the run holds")
    p.add_argument("--run", required=True)

    p = sub.add_parser("dataset", help="inspect a dataset")
    dsub = p.add_subparsers(dest="dataset_command", required=True)
    q = dsub.add_parser("info", help="episodes, steps, label fraction, return and achievement statistics")
    q.add_argument("dir")
    q = dsub.add_parser("verify", help="re-read every committed shard and check it against the manifest")
    q.add_argument("dir")
    q = dsub.add_parser("rebuild-manifest", help="restore a lost manifest.json from the shards' metadata "
                                                 "(--move-aside: move the shards aside instead; nothing is deleted)")
    q.add_argument("dir")
    q.add_argument("--move-aside", action="store_true")
    q = dsub.add_parser("import-video", help="add MP4/GIF/WebM files or PNG folders as unlabeled episodes")
    _add_config_args(q)
    q.add_argument("--out", required=True, help="dataset directory (created, or added to)")
    q.add_argument("--frame-shape", default=None, metavar="H,W,C",
                   help="frame shape of a new dataset (default: the config's env)")
    q.add_argument("--fit", choices=("resize", "pad", "letterbox"), default="resize",
                   help="how frames of another size are fitted (default resize)")
    q.add_argument("--fps", type=float, default=None, help="frame rate to record where a file has none")
    q.add_argument("files", nargs="+", help="video files or folders of PNG frames")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dreamer4.runtime.jax_setup import enable_compilation_cache

    enable_compilation_cache()
    try:
        if hasattr(args, "coordinator"):  # before anything touches a JAX backend
            from dreamer4.runtime.distributed import initialize_from_args

            initialize_from_args(args)
        if args.command == "dataset":
            from dreamer4.pipelines.dataset import print_info, run_verify

            if args.dataset_command == "import-video":
                from dreamer4.pipelines.dataset import run_import_video

                run_import_video(load_config(args.config, args.overrides), args.out, args.files,
                                 frame_shape=args.frame_shape, fit=args.fit, fps=args.fps)
                return 0
            if args.dataset_command == "rebuild-manifest":
                from dreamer4.pipelines.dataset import run_rebuild_manifest

                return run_rebuild_manifest(args.dir, args.move_aside)
            if args.dataset_command == "info":
                print_info(args.dir)
                return 0
            return run_verify(args.dir)
        if args.command == "dream":
            from dreamer4.pipelines.dynamics import run_dream

            run_dream(args.run, args.seed)
            return 0
        if args.command == "evaluate":
            from dreamer4.pipelines.agent import run_evaluate

            if args.episodes is not None and args.episodes < 1:
                raise ConfigError(f"--episodes must be >= 1, got {args.episodes}")
            run_evaluate(args.run, args.episodes, args.seed)
            return 0
        if args.command == "report":
            from dreamer4.pipelines.report import write_report

            if not Path(args.run).is_dir():
                raise ConfigError(f"--run {args.run}: no such run directory")
            print(f"wrote {write_report(args.run)}")
            return 0
        overrides = list(args.overrides)
        if args.command == "collect":  # flags are shorthands for collect.* keys (JSON-quoted for YAML)
            for key, value in (("policy", args.policy), ("epsilon", args.epsilon), ("mix", args.mix)):
                if value is not None:
                    overrides.append(f"collect.{key}={json.dumps(value)}")
        cfg = load_config(args.config, overrides)
        if args.command == "train-behavior":
            from dreamer4.pipelines.behavior import run_train_behavior

            run_train_behavior(cfg, args.run)
        elif args.command == "collect":
            from dreamer4.pipelines.collect import run_collect

            run_collect(cfg, args.out, writer_id=args.writer_id, num_writers=args.num_writers)
        elif args.command == "train-tokenizer":
            from dreamer4.pipelines.tokenizer import run_train_tokenizer

            run_train_tokenizer(cfg, args.data, args.run)
        elif args.command == "train-dynamics":
            from dreamer4.pipelines.dynamics import run_train_dynamics

            run_train_dynamics(cfg, args.data, args.run)
        elif args.command == "train-agent":
            from dreamer4.pipelines.agent import run_train_agent

            run_train_agent(cfg, args.data, args.run, args.phase)
        elif args.command == "run":
            from dreamer4.pipelines.run import run_all

            run_all(cfg, args.run)
        return 0
    except (ConfigError, DatasetError, DiskFullError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the train loop's NaN guard; its message says what was kept
        print(f"error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

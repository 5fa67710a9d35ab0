"""`dreamer4 play` speed, end to end: frames/s from a key's request to its frames received.

    python benchmarks/play.py --run runs/tiny                         # a trained run (read only)
    python benchmarks/play.py --random-run configs/classic.yaml       # random weights, preset sizes

Starts the real command (`dreamer4 play --run RUN --port P`, a subprocess, as a person would) and
plays it from this process over HTTP with one keep-alive connection, like the page: each step is
POST /api/step {action, K} -> the server steps the world model (K shortcut steps + context pass +
tokenizer decoder, one jitted call) and, in lockstep, the real game, computes PSNR, base64-encodes
both frames and replies; the client parses the JSON and decodes both frames back to bytes. The
clock runs from the request to the decoded frames, one step at a time (a person waits for the
frame), after warm-up steps that compile each K. Modes: "lockstep" (world model + real Craftax,
the default page), "world" (a dataset episode start: world model only; with --random-run there is
no dataset, so a new world without lockstep), "agent" (the agent chooses; runs with an agent).

`--random-run` writes a run directory (tokenizer + dynamics checkpoints of the preset's sizes,
random weights: speed does not depend on training) into a temporary folder. Prints a table and
writes JSON. Goals (issue 16): tiny preset on the 2-core CPU, K=4: >= 15 frames/s; classic preset
on one H100, K=4, single stream: >= 60 frames/s.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MOVES = (2, 2, 4, 4, 1, 1, 3, 3, 0, 5)  # right, right, down, down, left, left, up, up, noop, do


def random_run(preset: str, root: Path) -> Path:
    """A run directory whose tokenizer and dynamics stages hold random weights of `preset`'s sizes."""
    from flax import nnx

    from dreamer4.config import TrainConfig, load_config, save_config
    from dreamer4.data.env import make_env
    from dreamer4.dynamics.model import WorldModel
    from dreamer4.runtime.checkpoint import Checkpointer
    from dreamer4.runtime.loading import TRAINABLE, build_dynamics, build_tokenizer
    from dreamer4.runtime.optim import make_optimizer
    from dreamer4.runtime.stage import StageDir

    cfg = load_config(preset)
    _, _, spec = make_env(cfg.env.name)

    def save(name, model, facts):
        stage = StageDir(root, name)
        save_config(cfg, stage.dir)
        state = nnx.state((model, nnx.Optimizer(model, make_optimizer(TrainConfig()), wrt=TRAINABLE[name])))
        ckpt = Checkpointer(stage.checkpoints, async_save=False)
        ckpt.save(1, state, {"step": 1, **facts})
        ckpt.close()

    facts = {"frame_shape": list(spec.frame_shape), "data": None}
    tok = build_tokenizer(cfg, spec.frame_shape)
    save("tokenizer", tok, facts)
    save(
        "dynamics",
        WorldModel(tok, build_dynamics(cfg, cfg, spec.num_actions, latent_grid=tok.latent_grid)),
        {**facts, "num_actions": spec.num_actions},
    )
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, log_path: Path, timeout: float = 900.0) -> subprocess.Popen:
    """`dreamer4 play` in a subprocess; returns once it prints its URL (models loaded, default K compiled)."""
    env = dict(
        os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dreamer4.cli", "play", "--run", str(run), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"dreamer4 play exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        if "dreamer4 play: open" in log_path.read_text():
            return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"dreamer4 play did not start within {timeout:.0f} s")


class Client:
    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        self.conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = self.conn.getresponse()
        return r.status, json.loads(r.read())


def decoded(reply: dict) -> int:
    """Decode the frames of a reply back to bytes (as the page does); their total size."""
    return sum(len(base64.b64decode(reply[k])) for k in ("imagined", "real") if reply.get(k))


def measure(client: Client, reset: dict, K: int, actor: str, steps: int, warmup: int) -> dict:
    """Frames/s of `steps` sequential steps after `warmup` ones (compilation); resets on game over."""
    client.call("POST", "/api/reset", reset)
    lat, server_ms, resets, i = [], [], 0, 0
    while len(lat) < steps:
        body = {"actor": "agent", "K": K} if actor == "agent" else {"action": MOVES[i % len(MOVES)], "K": K}
        i += 1
        t0 = time.perf_counter()
        status, reply = client.call("POST", "/api/step", body)
        if status == 200:
            decoded(reply)
        dt = time.perf_counter() - t0
        if status != 200:  # the real episode ended: start again (not timed)
            if "episode is over" not in reply.get("error", ""):
                raise RuntimeError(f"step {body} failed: {status} {reply}")
            client.call("POST", "/api/reset", {**reset, "seed": reset.get("seed", 0) + 1 + resets})
            resets += 1
            continue
        if i > warmup:
            lat.append(dt)
            server_ms.append(reply["latency_ms"])
    lat_ms = 1000.0 * np.array(lat)
    return {
        "K": K,
        "actor": actor,
        "steps": steps,
        "frames_per_s": float(steps / (lat_ms.sum() / 1000.0)),
        "latency_ms_median": float(np.median(lat_ms)),
        "latency_ms_p90": float(np.percentile(lat_ms, 90)),
        "latency_ms_max": float(lat_ms.max()),
        "server_step_ms_median": float(np.median(server_ms)),
        "resets": resets,
        "latency_ms": [round(float(x), 2) for x in lat_ms],  # every step: outliers (a slide, a compile) show
        "server_ms": [round(float(x), 2) for x in server_ms],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run directory with a tokenizer and a dynamics stage (read only)")
    src.add_argument("--random-run", metavar="PRESET", help="random weights of this preset's sizes")
    ap.add_argument("--ks", default="1,4")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--modes", default="lockstep,world,agent")
    ap.add_argument("--json", default="bench_out/play.json")
    ap.add_argument("--make-random-run", nargs=2, metavar=("PRESET", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_random_run:
        random_run(args.make_random_run[0], Path(args.make_random_run[1]))
        return

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        run = Path(args.run) if args.run else Path(tmp) / "run"
        if args.random_run:  # in a CPU-only subprocess: this process must hold no accelerator memory
            env = dict(
                os.environ,
                JAX_PLATFORMS="cpu",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            )
            cmd = [
                sys.executable,
                __file__,
                "--random-run",
                args.random_run,
                "--make-random-run",
                args.random_run,
                str(run),
            ]
            subprocess.run(cmd, env=env, check=True)
        port = free_port()
        log = Path(args.json).with_suffix(".server.log")  # kept: what the server printed
        log.parent.mkdir(parents=True, exist_ok=True)
        server = start_server(run, port, log)
        startup = time.time() - t0
        try:
            client = Client(port)
            _, info = client.call("GET", "/api/info")
            resets = {
                "lockstep": {"start": "world", "seed": 0, "lockstep": True},
                "world": (
                    {"start": "episode", "episode": 0}
                    if info["episodes"]
                    else {"start": "world", "seed": 0, "lockstep": False}
                ),
                "agent": {"start": "world", "seed": 0, "lockstep": True},
            }
            rows = []
            for mode in args.modes.split(","):
                if mode == "agent" and not info["agent"]:
                    continue
                for K in (int(k) for k in args.ks.split(",")):
                    r = measure(
                        client, resets[mode], K, "agent" if mode == "agent" else "human", args.steps, args.warmup
                    )
                    rows.append({"mode": mode, **r})
                    print(
                        f"{mode:9} K={K:<3} {r['frames_per_s']:8.1f} frames/s  latency median {r['latency_ms_median']:6.1f} ms"
                        f"  p90 {r['latency_ms_p90']:6.1f} ms  max {r['latency_ms_max']:7.1f} ms  (server step {r['server_step_ms_median']:.1f} ms)",
                        flush=True,
                    )
        finally:
            server.terminate()
            server.wait(timeout=60)
        res = {
            "run": args.run or f"random weights of {args.random_run}",
            "env": info["env"],
            "agent": info["agent"],
            "context": info["context"],
            "cache_len": info["cache_len"],
            "startup_s": startup,
            "device": info["device"],
            "cpu_count": os.cpu_count(),
            "rows": rows,
        }
    print()
    print(f"`dreamer4 play` end to end on {res['device']} ({res['run']}); startup {startup:.0f} s")
    print("| mode | K | frames/s | latency median (ms) | p90 (ms) | server step (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['K']} | {r['frames_per_s']:.1f} | {r['latency_ms_median']:.1f} | "
            f"{r['latency_ms_p90']:.1f} | {r['server_step_ms_median']:.1f} |"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Size and encoding time of the collector's resume state per committed shard.

    python benchmarks/resume_state.py [--config configs/tiny.yaml] [--json bench_out/resume_state.json]

Collects the preset's dataset into a temporary directory and, after every commit, records the
size of the state file written (`collector/w000/state-K.pkl.zp`, format 4: the carry after the
commit's chunk and the carry to replay the running episodes from, each pickled and zstd-1
compressed; no rows), the time spent encoding it, how many chunks a resume would replay, and the
bytes of the running episodes' rows that the state makes again by replay instead of storing
(format 3 stored them zstd-compressed). Prints a table and writes JSON. Numbers go into
BENCHMARKS.md with the machine and date.
"""

from __future__ import annotations

import argparse
import json
import pickle
import tempfile
import time
from pathlib import Path

import jax

from dreamer4.config import load_config
from dreamer4.data import collect as C


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=["runtime.wandb=disabled"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    rows = []
    encode = C.resume_state.encode

    def timed_encode(plan, log):
        t = time.perf_counter()
        data = encode(plan, log)
        dt = time.perf_counter() - t
        host = jax.device_get(plan.carry)
        carry_bytes = len(pickle.dumps(host, protocol=5))
        row_bytes = host["frame"][0].nbytes * sum(plan.episode_rows)  # one frame per row
        rows.append(
            {
                "stored_bytes": len(data),
                "carry_pickle_bytes": carry_bytes,
                "encode_s": dt,
                "replay_chunks": plan.replay_chunks,
                "running_episode_rows": sum(plan.episode_rows),
                "running_episode_frame_bytes": row_bytes,
            }
        )
        return data

    C.resume_state.encode = timed_encode
    with tempfile.TemporaryDirectory() as d:
        t = time.time()
        summary = C.collect(cfg, Path(d) / "ds", log=lambda *a: None)
        wall = time.time() - t
    print(
        f"{'shard':>5} {'stored MB':>10} {'carry MB':>9} {'encode s':>9} {'replay chunks':>14} {'rows replayed':>14} {'their frames MB':>16}"
    )
    for i, r in enumerate(rows, 1):
        print(
            f"{i:>5} {r['stored_bytes'] / 1e6:>10.2f} {r['carry_pickle_bytes'] / 1e6:>9.2f} {r['encode_s']:>9.3f} "
            f"{r['replay_chunks']:>14} {r['running_episode_rows']:>14} {r['running_episode_frame_bytes'] / 1e6:>16.1f}"
        )
    print(f"collect: {wall:.1f} s wall, {summary['steady_steps_per_s']:.0f} steady steps/s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "config": args.config,
                    "states": rows,
                    "wall_s": wall,
                    "steady_steps_per_s": summary["steady_steps_per_s"],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()

"""Size of the collector's resume state per committed shard: stored (compressed) vs plain pickle.

    python benchmarks/resume_state.py [--config configs/tiny.yaml] [--json bench_out/resume_state.json]

Collects the preset's dataset into a temporary directory and, after every commit, records the
size of the state file written (`collector/w000/state-K.pkl.zp`: each piece of partial rows
zlib-compressed once) and of the plain pickle of the same state (what early versions stored as
`state-K.pkl`), with the time spent encoding and how many pieces it had to compress anew.
Prints a table and writes JSON. Numbers go into BENCHMARKS.md with the machine and date.
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
    encode = C.CollectorState.encode

    def timed_encode(carry, assembler):
        known = set(assembler.encoded)
        t = time.perf_counter()
        data = encode(carry, assembler)
        dt = time.perf_counter() - t
        plain = pickle.dumps({"carry": jax.device_get(carry), "partial": assembler.partial}, protocol=5)
        pieces = [id(p) for ps in assembler.partial for p in ps]
        rows.append(
            {
                "stored_bytes": len(data),
                "pickle_bytes": len(plain),
                "encode_s": dt,
                "pieces": len(pieces),
                "pieces_compressed_now": sum(1 for i in pieces if i not in known),
            }
        )
        return data

    C.CollectorState.encode = staticmethod(timed_encode)
    with tempfile.TemporaryDirectory() as d:
        t = time.time()
        summary = C.collect(cfg, Path(d) / "ds", log=lambda *a: None)
        wall = time.time() - t
    print(f"{'shard':>5} {'pickle MB':>10} {'stored MB':>10} {'ratio':>6} {'encode s':>9} {'new pieces':>12}")
    for i, r in enumerate(rows, 1):
        print(
            f"{i:>5} {r['pickle_bytes'] / 1e6:>10.2f} {r['stored_bytes'] / 1e6:>10.2f} "
            f"{r['pickle_bytes'] / r['stored_bytes']:>6.1f} {r['encode_s']:>9.2f} "
            f"{r['pieces_compressed_now']:>5} / {r['pieces']:<5}"
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

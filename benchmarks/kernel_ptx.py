"""The fused attention kernels as an H100 would run them, without an H100: registers, spills, instructions.

    python benchmarks/kernel_ptx.py [--tilings binary single] [--shape N,Q,M,K,G,H ...] [--out kernel_ptx.json]
    python benchmarks/kernel_ptx.py --root OTHER_CHECKOUT --tilings single   # an older tree's kernels

Needs jax's CUDA plugin (the compile-only client of `benchmarks/gpu_hlo.py`, same environment:
see its docstring) and `ptxas` (from the plugin's nvidia-cuda-nvcc wheel, or on PATH).

For each shape and tiling (`dreamer4.nn.fused_attention._tiles`) it compiles the forward and the
backward of `fused_attention` for an H100 (sm_90a) with XLA's dump on, reads the PTX that Triton
generated for each kernel and assembles it with `ptxas -v`. The kernels have no loops (their
tiles are unrolled), so the PTX instructions of a kernel are the instructions each of its threads
executes; times threads per program times programs, the thread-instructions of one call. With
the registers per thread (which bound how many programs share a multiprocessor) and the bytes
spilled to local memory, these are a static cost model of the kernels: a lease times them
(`gpu_suite.py`, attention part). Default shapes: the classic preset's attention calls (tokenizer
space and time, dynamics space and time), soft-cap 50, bf16.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REGS_PER_SM = 65536  # H100
# the classic preset's attention calls in its train steps (the pallas_call shapes of their
# compiled modules): (label, N, Q, M, K, G, H); N = sequences per call
SHAPES = [
    ("tokenizer space, 80 tokens", 1024, 80, 80, 8, 4, 64),
    ("tokenizer time, 16 steps", 5120, 16, 16, 8, 4, 64),
    ("dynamics space, 14 tokens", 1408, 14, 14, 12, 4, 64),
    ("dynamics time, 64 steps", 308, 64, 64, 12, 4, 64),
]


def ptxas_path() -> str:
    import jax

    site = Path(jax.__file__).resolve().parent.parent
    found = sorted(glob.glob(str(site / "nvidia" / "*" / "bin" / "ptxas"))) + [shutil.which("ptxas") or ""]
    for p in found:
        if p and os.access(p, os.X_OK):
            return p
    raise SystemExit("no ptxas: install jax's CUDA plugin here (see benchmarks/gpu_hlo.py) or put ptxas on PATH")


def count_ptx(ptx: str) -> dict:
    """Threads per program (`.reqntid`), instructions and branches of the first kernel in `ptx`."""
    body = ptx[ptx.index(".entry") :]
    lines = body.splitlines()
    return {
        "threads": int(re.search(r"\.reqntid\s+(\d+)", body).group(1)),
        "instructions": sum(1 for ln in lines if re.match(r"^\s+@?!?%?[a-z]", ln) and ln.rstrip().endswith(";")),
        "branches": sum(1 for ln in lines if re.match(r"^\s+(@!?%\w+\s+)?bra(\.uni)?\s", ln)),
    }


def ptx_stats(ptx: str, ptxas: str) -> dict:
    """`count_ptx`, and ptxas' registers per thread and bytes spilled (sm_90a)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        info = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True, check=True
        ).stderr
    num = lambda pattern: int(re.search(pattern, info).group(1))  # noqa: E731
    return {
        **count_ptx(ptx),
        "registers": num(r"Used (\d+) registers"),
        "spill_store_bytes": num(r"(\d+) bytes spill stores"),
        "spill_load_bytes": num(r"(\d+) bytes spill loads"),
    }


def compile_case(fa, topo, dump: Path, ptxas: str, N, Q, M, K, G, H, cap: float, tiling: str) -> dict:
    """{kernel name: stats} of the forward and backward compiled for the H100 at this shape."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(topo.devices).reshape(1), ("d",))
    sh = NamedSharding(mesh, PartitionSpec())
    q = jax.ShapeDtypeStruct((N, Q, K, H), jnp.bfloat16, sharding=sh)
    kv = jax.ShapeDtypeStruct((N, M, G, H), jnp.bfloat16, sharding=sh)
    mask = np.tril(np.ones((Q, M), bool), M - Q)  # causal (a cached step's shape when Q < M)
    # trees from before the tiles (2026-11-28) have one shape only: "single"
    kw = {"tiling": tiling} if "tiling" in inspect.signature(fa.fused_attention).parameters else {}
    loss = lambda q, k, v: fa.fused_attention(q, k, v, mask, cap, **kw).astype(jnp.float32).sum()  # noqa: E731
    before = set(dump.glob("*.ptx"))
    t0 = time.perf_counter()
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
    secs = time.perf_counter() - t0
    out = {}
    for f in sorted(set(dump.glob("*.ptx")) - before):
        text = f.read_text()
        m = re.search(r"\.entry\s+(capped_attention_\w+)", text)
        if m:
            programs = N * (G if "bwd" in m.group(1) else K)
            s = ptx_stats(text, ptxas)
            s["programs"] = programs
            s["thread_instructions_per_call"] = s["instructions"] * s["threads"] * programs
            s["programs_per_sm_by_registers"] = REGS_PER_SM // (s["registers"] * s["threads"])
            out[m.group(1)] = s
    return {"compile_s": secs, "kernels": out}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tilings", nargs="+", default=["binary", "single"])
    ap.add_argument("--shape", action="append", default=[], metavar="N,Q,M,K,G,H", help="instead of the presets'")
    ap.add_argument("--cap", type=float, default=50.0)
    ap.add_argument("--root", default=str(HERE.parent), help="the checkout whose dreamer4 package to compile")
    ap.add_argument("--out", default="kernel_ptx.json")
    args = ap.parse_args(argv)
    shapes = [(f"N{s}", *map(int, s.split(","))) for s in args.shape] or SHAPES
    dump = Path(tempfile.mkdtemp(prefix="kernel_ptx-"))
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this machine runs nothing on a GPU
    sys.path.insert(0, str(Path(args.root).resolve()))
    from dreamer4.nn import fused_attention as fa

    spec = importlib.util.spec_from_file_location("gpu_hlo", HERE / "gpu_hlo.py")
    gpu_hlo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_hlo)
    ptxas = ptxas_path()
    topo = gpu_hlo.h100_topology()
    rows = []
    for label, N, Q, M, K, G, H in shapes:
        for tiling in args.tilings:
            r = compile_case(fa, topo, dump, ptxas, N, Q, M, K, G, H, args.cap, tiling)
            rows.append({"shape": label, "NQMKGH": [N, Q, M, K, G, H], "tiling": tiling, **r})
            print(f"compiled {label}, {tiling}: {r['compile_s']:.1f} s", flush=True)
    lines = [
        "| shape | tiling | kernel | threads | registers | spills (store / load bytes) | instructions per thread "
        "| thread-instructions per call (M) | programs per SM (registers) | branches |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for name, s in r["kernels"].items():
            lines.append(
                f"| {r['shape']} | {r['tiling']} | {name.replace('capped_attention_', '')} | {s['threads']} | "
                f"{s['registers']} | {s['spill_store_bytes']} / {s['spill_load_bytes']} | {s['instructions']:,} | "
                f"{s['thread_instructions_per_call'] / 1e6:,.1f} | {s['programs_per_sm_by_registers']} | {s['branches']} |"
            )
    print("\n".join(lines))
    if any(s["branches"] for r in rows for s in r["kernels"].values()):
        print(
            "note: a kernel with branches may run some instructions more than once or not at all; its counts are static"
        )
    Path(args.out).write_text(json.dumps({"root": args.root, "ptxas": ptxas, "cap": args.cap, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    shutil.rmtree(dump, ignore_errors=True)


if __name__ == "__main__":
    main()

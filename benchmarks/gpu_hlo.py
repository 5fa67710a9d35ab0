"""What an H100 would run for a classic train step, without an H100: the memory traffic per kernel kind.

    python benchmarks/gpu_hlo.py [--stage tokenizer|dynamics|both] [--batch B --seq-len T] [--set k=v ...]
    python benchmarks/gpu_hlo.py --from-hlo hlo_tokenizer_b64.txt.gz     # a module the GPU suite returned

JAX can compile for a GPU it does not have ("deviceless" ahead-of-time compilation): a compile-only
CUDA client built from a target description of the device (`H100_TARGET` below: an H100 SXM's core
count, memory, bandwidth and compute capability). The optimized module is what XLA:GPU would run,
except for autotuning (no device to time candidates on: GEMM tilings can differ). Needs the CUDA
plugin of the installed jax, in a separate environment (about 5 GB of NVIDIA wheels):

    python3 -m venv /tmp/aot && . /tmp/aot/bin/activate && pip install -e . "jax[cuda13]==$(python -c 'import jax; print(jax.__version__)')"

For each kernel of the step (every instruction XLA emits outside fusion bodies) the script adds
the bytes of its operands and outputs: the traffic a memory-bound kernel must move through HBM at
least once. It prints the totals by kernel kind (`profile_summary.categorize`, the categories of
the suite's traces), the largest named scopes of the layout-changing kernels (copies and
transposes), and writes JSON. It is a static count, not a timing: GEMMs are compute-bound, and
real kernels reach the bandwidth only in part. It answers "which code makes XLA move data" before
a lease, where a trace answers "how long did it take" during one.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("profile_summary", HERE / "profile_summary.py")
profile_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_summary)

# An H100 SXM 80GB as XLA describes one (stream_executor GpuTargetConfigProto, text format).
H100_TARGET = """gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
runtime_version { major: 13 minor: 0 patch: 0 }
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 12 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
HBM_BYTES_PER_S = 3.35e12  # H100 SXM

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
}  # fmt: skip
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*?)\)(.*)$")
# instructions that move no data themselves (views, tuples, control flow: their bodies count)
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
         "after-all", "copy-start", "copy-done", "async-start", "async-done", "async-update",
         "partition-id", "replica-id"}  # fmt: skip


def shape_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape string: 'bf16[64,80]{1,0}' -> 10240 (tuples summed)."""
    total = 0
    for dtype, dims in _SHAPE.findall(shape):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def _kind(label: str, opcode: str) -> str:
    """The trace's kernel kind of an instruction: from its name (fusion names say what they do),
    else from its opcode (a bare `reduce`, `transpose` ...)."""
    kind = profile_summary.categorize(re.sub(r"[.\d]+$", "", label))
    return profile_summary.categorize(opcode) if kind == "other" else kind


def kernels(hlo_text: str) -> list[dict]:
    """The kernels of an optimized module: one dict per instruction that runs as a kernel
    (outside fusion bodies and reducers; views and control flow left out) with its name, HLO opcode, kind
    (`profile_summary.categorize` of its name, or of the custom call's target), op_name and the
    bytes of its operands and outputs."""
    comps: dict[str, list[str]] = {}
    cur = None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            m = _HEADER.match(line)
            cur = m.group(2) if m else None
            if cur:
                comps[cur] = []
        elif cur is not None and _LINE.match(line):
            comps[cur].append(line)
    # fusion bodies and reducers (to_apply=) run inside the kernel that calls them
    inner = {c for lines in comps.values() for ln in lines for c in re.findall(r"to_apply=%?([\w.\-]+)", ln)}
    inner |= {
        c for lines in comps.values() for ln in lines if " fusion(" in ln for c in re.findall(r"calls=%?([\w.\-]+)", ln)
    }
    out = []
    for comp, lines in comps.items():
        if comp in inner:
            continue
        parsed = [_LINE.match(ln).groups() for ln in lines]
        shapes = {name: shape for name, shape, *_ in parsed}
        for name, shape, opcode, args, rest in parsed:
            if opcode in _FREE:
                continue
            nbytes = shape_bytes(shape) + sum(shape_bytes(shapes.get(a, "")) for a in re.findall(r"%([\w.\-]+)", args))
            label = name
            meta = re.search(r'op_name="([^"]*)"', rest)
            if opcode == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', rest)
                label = target.group(1) if target else name
                if "triton" in label and meta:  # a Pallas kernel: its op_name says what it computes
                    label = meta.group(1) + " " + label
            out.append(
                {
                    "name": name,
                    "opcode": opcode,
                    "kind": _kind(label, opcode),
                    "op_name": meta.group(1) if meta else "",
                    "bytes": nbytes,
                }
            )
    return out


def summarize(ks: list[dict], top: int = 12) -> dict:
    """Totals by kind, and the largest (scope, kind) groups of layout-changing ("copy") kernels."""
    by_kind = collections.defaultdict(lambda: {"kernels": 0, "bytes": 0})
    copies = collections.defaultdict(lambda: {"kernels": 0, "bytes": 0})
    for k in ks:
        by_kind[k["kind"]]["kernels"] += 1
        by_kind[k["kind"]]["bytes"] += k["bytes"]
        if k["kind"] == "copy":
            scope = re.sub(r"^jit\([^)]*\)/", "", k["op_name"]) or "(no op_name)"
            copies[scope]["kernels"] += 1
            copies[scope]["bytes"] += k["bytes"]
    total = sum(k["bytes"] for k in ks)
    non_gemm = total - by_kind.get("matmul", {"bytes": 0})["bytes"]
    return {
        "kernels": len(ks),
        "bytes": total,
        "non_matmul_bytes": non_gemm,
        "non_matmul_ms_at_hbm_peak": non_gemm / HBM_BYTES_PER_S * 1e3,
        "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1]["bytes"])),
        "top_copy_scopes": dict(sorted(copies.items(), key=lambda kv: -kv[1]["bytes"])[:top]),
    }


def table(label: str, s: dict) -> list[str]:
    lines = [
        f"### {label}: {s['kernels']} kernels, {s['bytes'] / 1e9:.1f} GB moved; outside matmuls "
        f"{s['non_matmul_bytes'] / 1e9:.1f} GB = {s['non_matmul_ms_at_hbm_peak']:.1f} ms at the HBM peak",
        "",
        "| kind | kernels | GB | ms at HBM peak |",
        "|---|---|---|---|",
    ]
    for kind, v in s["by_kind"].items():
        lines.append(f"| {kind} | {v['kernels']} | {v['bytes'] / 1e9:.2f} | {v['bytes'] / HBM_BYTES_PER_S * 1e3:.2f} |")
    lines += ["", "| largest copy / transpose scopes | kernels | GB |", "|---|---|---|"]
    for scope, v in s["top_copy_scopes"].items():
        lines.append(f"| `{scope[-90:]}` | {v['kernels']} | {v['bytes'] / 1e9:.2f} |")
    return lines


def h100_topology():
    """The compile-only CUDA client's one-device topology for `H100_TARGET` (jax's CUDA plugin in
    this environment; SystemExit saying how to install it otherwise)."""
    import jax
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET, topology="1x1x1")
    except Exception as e:  # noqa: BLE001
        raise SystemExit(
            f"no compile-only CUDA client ({type(e).__name__}: {e}). Install jax's CUDA plugin in this "
            f'environment: pip install "jax[cuda13]=={jax.__version__}" (see benchmarks/gpu_hlo.py\'s docstring)'
        ) from e


def compile_for_h100(
    stage: str, batch: int, seq_len: int, overrides: list[str], config: str
) -> tuple[str, float, dict]:
    """(optimized HLO text, compile seconds, XLA's buffer sizes in bytes) of the real train step,
    compiled for an H100 here. The buffer sizes (`memory_analysis`: arguments, outputs, aliased,
    temporaries) are XLA's own plan for the device; their sum less the aliased bytes approximates
    the step's peak device memory."""
    import jax
    import numpy as np
    import train_step as bench
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from dreamer4.config import load_config
    from dreamer4.runtime.loading import TRAINABLE
    from dreamer4.runtime.mesh import batch_sharding
    from dreamer4.runtime.train_loop import compile_train_step, train_state

    topo = h100_topology()
    cfg = load_config(config, overrides)
    tc = cfg.tokenizer.train if stage == "tokenizer" else cfg.dynamics.train
    case = bench.tokenizer_case if stage == "tokenizer" else bench.dynamics_case
    model, loss_fn, data, *_ = case(cfg, batch, seq_len)
    mesh = Mesh(np.array(topo.devices).reshape(1, 1), ("data", "fsdp"))
    graphdef, state, shardings = train_state(model, tc, mesh, TRAINABLE[stage])  # on the CPU; shapes only
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    bs = batch_sharding(mesh)
    batch_abs = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=bs) for k, v in data.items()}
    key = jax.ShapeDtypeStruct((2,), np.uint32, sharding=NamedSharding(mesh, PartitionSpec()))
    step = compile_train_step(graphdef, loss_fn, shardings, mesh, TRAINABLE[stage])
    t0 = time.perf_counter()
    compiled = step.lower(abstract, batch_abs, key).compile()
    secs = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    fields = ("argument", "output", "alias", "temp")
    mem = {f: int(getattr(ma, f"{f}_size_in_bytes", 0)) for f in fields} if ma is not None else {}
    return compiled.as_text(), secs, mem


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=("tokenizer", "dynamics", "both"), default="both")
    ap.add_argument("--config", default=str(HERE.parent / "configs" / "classic.yaml"))
    ap.add_argument("--batch", type=int, help="default: the preset's train batch")
    ap.add_argument("--seq-len", type=int, help="default: the preset's train seq_len")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--from-hlo", nargs="+", metavar="FILE", help="analyse these module texts (.txt or .txt.gz) instead"
    )
    ap.add_argument("--hlo-dir", help="also write each compiled module's text here")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", default="gpu_hlo.json")
    args = ap.parse_args(argv)
    results = {}
    if args.from_hlo:
        for f in args.from_hlo:
            raw = Path(f).read_bytes()
            text = (gzip.decompress(raw) if f.endswith(".gz") else raw).decode()
            results[f] = {"source": f, **summarize(kernels(text), args.top)}
    else:
        import os

        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this machine runs nothing on a GPU
        sys.path.insert(0, str(HERE))
        from dreamer4.config import load_config

        cfg = load_config(args.config, args.overrides)
        for stage in ("tokenizer", "dynamics") if args.stage == "both" else (args.stage,):
            tc = cfg.tokenizer.train if stage == "tokenizer" else cfg.dynamics.train
            b, t = args.batch or tc.batch_size, args.seq_len or tc.seq_len
            print(f"compiling the {stage} step (batch {b} x {t}) for an H100 ...", flush=True)
            text, secs, mem = compile_for_h100(stage, b, t, args.overrides, args.config)
            if args.hlo_dir:
                Path(args.hlo_dir).mkdir(parents=True, exist_ok=True)
                (Path(args.hlo_dir) / f"hlo_{stage}_b{b}.txt.gz").write_bytes(gzip.compress(text.encode(), 6))
            label = f"{stage} b{b}x{t}"
            results[label] = {
                "stage": stage,
                "batch": b,
                "seq_len": t,
                "compile_s": secs,
                "buffers_bytes": mem,
                **summarize(kernels(text), args.top),
            }
            if mem:
                peak = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
                print(
                    f"XLA's buffers: temporaries {mem['temp'] / 2**30:.2f} GiB, arguments {mem['argument'] / 2**30:.2f} "
                    f"GiB (peak about {peak / 2**30:.2f} GiB)"
                )
    for label, s in results.items():
        print("\n".join(table(label, s)) + "\n")
    Path(args.out).write_text(json.dumps({"overrides": args.overrides, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

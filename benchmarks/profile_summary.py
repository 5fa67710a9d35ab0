"""Where a compiled step's device time goes, read from a JAX profiler trace (issue 17's MFU question).

    python benchmarks/profile_summary.py TRACE.xplane.pb[.gz] [--steps N] [--wall-ms W] [--model-flops F]

A step's MFU says how far it is from the chip's peak, not why. This reads the `.xplane.pb` that
`jax.profiler.trace` writes (parsed with `jax.profiler.ProfileData`, no TensorFlow or xprof
needed) and sums the device's kernel time by kind:

    matmul       cuBLAS/cuBLASLt/CUTLASS GEMMs and XLA's Triton GEMM fusions (names with gemm,
                 xmma, nvjet, cutlass, cublas, dot, ...)
    attention    cuDNN fused attention (sdpa, fmha, flash)
    collective   NCCL and XLA collectives
    reduction    XLA reduce fusions (norms, softmax sums, loss means)
    copy         copies, transposes, concatenations, (dynamic) slices, memcpy/memset
    elementwise  other XLA fusions (casts, SwiGLU, RoPE, residual adds, optimizer update)
    other        everything else (listed by name in the top kernels)

Figures per step: kernels launched, kernel time summed, device-busy time (the union of kernel
intervals, so overlapping streams are not counted twice), the wall time the caller measured and
the idle share 1 - busy / wall (host dispatch, launch gaps, synchronisation), each kind's share of
the kernel time, the top kernels, and, with --model-flops, the TFLOP/s the step's model FLOPs would
mean if all of them ran inside the matmul kernels (an upper bound on the GEMMs' own efficiency).

On a GPU the kernels are the events of the `/device:GPU:*` planes (lines of derived views such as
"XLA Ops" are skipped so nothing counts twice). On a CPU there is no device plane: the XLA
thunks executed on the host's threads (events that carry an `hlo_op` stat) stand in, summed over
threads; that is what the CPU smoke test exercises, not a figure to read for speed.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

# first match wins: attention and collectives before matmul and reduction (cuDNN and NCCL kernel
# names contain "gemm" / "reduce"), matmul before the generic fusion names ("gemm_fusion_dot")
CATEGORIES = (
    ("attention", re.compile(r"sdpa|fmha|flash|cudnn|attention", re.I)),
    (
        "collective",
        re.compile(r"nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]?scatter|all[-_]?to[-_]?all|collective", re.I),
    ),
    (
        "matmul",
        re.compile(
            r"gemm|xmma|nvjet|cutlass|cublas|matmul|wgmma|hmma|s16816|(^|[^a-z])dot([^a-z]|$)|convolution", re.I
        ),
    ),
    ("reduction", re.compile(r"reduce|reduction|softmax", re.I)),
    ("copy", re.compile(r"copy|transpose|memcpy|memset|concatenat|slice|pad(_|$)|gather|scatter", re.I)),
    ("elementwise", re.compile(r"fusion|loop_|elementwise|convert|multiply|add|subtract|divide|exp|tanh|select", re.I)),
)
KINDS = tuple(k for k, _ in CATEGORIES) + ("other",)
# lines of a device plane that are views derived from the kernel lines (counting them would double)
DERIVED_LINES = {
    "XLA Modules",
    "XLA Ops",
    "XLA TraceMe",
    "Steps",
    "Framework Ops",
    "Framework Name Scope",
    "Source code",
    "_counters_",
    "Async XLA Ops",
    "SparseCore XLA Ops",
}


def categorize(name: str) -> str:
    """The kind of a kernel (or XLA op) from its name: one of KINDS."""
    for kind, pattern in CATEGORIES:
        if pattern.search(name):
            return kind
    return "other"


def read_events(path) -> tuple[list[dict], str]:
    """(events, source) of a trace file: each event {name, start_ns, dur_ns, hlo_op, module}.

    source is "device" (kernels on /device:GPU|TPU planes) or "host-xla" (CPU: XLA thunks on the
    host's threads, the events that carry an hlo_op stat)."""
    from jax.profiler import ProfileData

    if str(path).endswith(".gz"):  # as the GPU suite returns its traces
        pd = ProfileData.from_serialized_xspace(gzip.decompress(Path(path).read_bytes()))
    else:
        pd = ProfileData.from_file(str(path))
    device, host = [], []
    for plane in pd.planes:
        on_device = re.match(r"^/device:(GPU|TPU)", plane.name) is not None
        for line in plane.lines:
            if on_device and line.name in DERIVED_LINES:
                continue
            evs = []
            for e in line.events:
                stats = dict(e.stats)
                if not on_device and not (plane.name.startswith("/host:") and "hlo_op" in stats):
                    continue
                evs.append(
                    {
                        "name": e.name,
                        "start_ns": float(e.start_ns),
                        "dur_ns": float(e.duration_ns),
                        "hlo_op": stats.get("hlo_op"),
                        "module": stats.get("hlo_module"),
                        "line": f"{plane.name} {line.name}",
                    }
                )
            # a device line's events are kernels, never containers: on Hopper the next kernel of a
            # stream may start before the last one ends (programmatic dependent launch), and
            # treating that overlap as nesting dropped two thirds of a step's kernels
            (device if on_device else host).extend(evs if on_device else leaves(evs))
    return (device, "device") if device else (host, "host-xla")


def leaves(events: list[dict]) -> list[dict]:
    """The events of one timeline line that contain no other event of it: a CPU thread's `while`
    or `call` thunk encloses the thunks of its body, which would otherwise count twice. An event
    that merely overlaps the next one (starts inside it, ends after it) is not a container."""
    evs = sorted(events, key=lambda e: (e["start_ns"], -e["dur_ns"]))
    out = []
    for i, e in enumerate(evs):
        end = e["start_ns"] + e["dur_ns"]
        j, contains = i + 1, False
        while j < len(evs) and evs[j]["start_ns"] < end:
            if evs[j]["start_ns"] + evs[j]["dur_ns"] <= end:
                contains = True
                break
            j += 1
        if not contains:
            out.append(e)
    return out


_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{[^}]*?op_name="([^"]*)"')
# named scopes set in the code (jax.named_scope): the model part, then the sublayer, innermost last
PARTS = ("frozen_encoder", "encoder", "decoder", "dynamics")
SUBLAYERS = ("space_attention", "time_attention", "mlp")


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """instruction name -> op_name metadata, from a compiled module's text (`compiled.as_text()`):
    the jax path of the op, e.g. 'jit(step_fn)/transpose(jvp(dynamics))/space_attention/...'.

    An executable loaded from JAX's persistent compilation cache carries the metadata of the code
    that compiled it (the cache key leaves metadata out): profile a step compiled by this code."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def scope_of(op_name: str) -> str:
    """'phase: part/sublayer' of an op_name. phase: backward (inside a transpose, i.e. the
    gradient), optimizer (the update), else forward; part and sublayer: the innermost of the
    code's named scopes (PARTS, SUBLAYERS) the path holds, 'other' where none."""
    phase = "optimizer" if "optimizer" in op_name else ("backward" if "transpose(" in op_name else "forward")
    if phase == "optimizer":
        return phase
    part = next((p for p in PARTS if re.search(rf"\b{p}\b", op_name)), "other")
    sub = next((x for x in SUBLAYERS if x in op_name), "other")
    return f"{phase}: {part}/{sub}"


def _union_ns(events: list[dict]) -> float:
    """Length of the union of the events' [start, start + dur) intervals."""
    total, end = 0.0, float("-inf")
    for s, d in sorted((e["start_ns"], e["dur_ns"]) for e in events):
        if s + d <= end:
            continue
        total += (s + d) - max(s, end)
        end = s + d
    return total


def summarize(
    events: list[dict],
    steps: int,
    wall_ms: float | None = None,
    model_flops: float | None = None,
    top: int = 12,
    source: str = "device",
    op_names: dict[str, str] | None = None,
) -> dict:
    """Per-step breakdown of `events` (from `read_events`) covering `steps` calls of one step.

    Only the events of the module with the most kernel time are counted when events name their
    module (the step, not the few tiny programs around it, e.g. fold_in of the key); the others
    are listed under `other_modules_ms`.
        kernel_ms    = sum(dur) / steps          busy_ms = |union of intervals| / steps
        span_ms      = (last end - first start) / steps   (the traced steps' own wall, less the
                       last step's idle tail: compare it with wall_ms, timed in another loop)
        idle_share   = 1 - busy_ms / wall_ms     share[kind] = sum(dur of kind) / sum(dur)
        matmul_tflops_if_all_model_flops = model_flops / (matmul kernel s per step) / 1e12
    With `op_names` (`hlo_op_names` of the step's compiled text) the kernel time is also split by
    `scope_of` each kernel's op (`by_scope`, ms per step; `scope_coverage`: the share of kernel time
    whose op was found, by its hlo_op stat or else its name with '_' for '.';
    `scope_coverage_kernels`: the share of kernels, which timing noise does not move).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    by_module: dict = defaultdict(float)
    for e in events:
        by_module[e["module"]] += e["dur_ns"]
    named = {m: t for m, t in by_module.items() if m is not None}
    module = max(named, key=named.get) if named else None
    if module is not None:
        events = [e for e in events if e["module"] in (module, None)]
    total_ns = sum(e["dur_ns"] for e in events)
    kind_ns = dict.fromkeys(KINDS, 0.0)
    per_name: dict = defaultdict(lambda: [0, 0.0, None])
    for e in events:
        kind_ns[categorize(e["name"])] += e["dur_ns"]
        row = per_name[e["name"]]
        row[0] += 1
        row[1] += e["dur_ns"]
        row[2] = row[2] or e["hlo_op"]
    busy_ns = _union_ns(events)
    out = {
        "source": source,
        "module": module,
        "steps": steps,
        "kernels_per_step": len(events) / steps,
        "kernel_ms_per_step": total_ns / steps / 1e6,
        "busy_ms_per_step": busy_ns / steps / 1e6,
        "span_ms_per_step": (
            (max(e["start_ns"] + e["dur_ns"] for e in events) - min(e["start_ns"] for e in events)) / steps / 1e6
            if events
            else 0.0
        ),
        "mean_kernel_us": (total_ns / len(events) / 1e3) if events else None,
        "share": {k: (v / total_ns if total_ns else 0.0) for k, v in kind_ns.items()},
        "ms_per_step": {k: v / steps / 1e6 for k, v in kind_ns.items()},
        "top": [
            {
                "name": n[:160],
                "kind": categorize(n),
                "hlo_op": op,
                "calls_per_step": c / steps,
                "ms_per_step": t / steps / 1e6,
                "share": (t / total_ns if total_ns else 0.0),
            }
            for n, (c, t, op) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
        ],
        "other_modules_ms_per_step": {str(m): t / steps / 1e6 for m, t in by_module.items() if m != module},
    }
    # kernel time per timeline line (device: one per CUDA stream): shows where kernels ran, and
    # would show a line that repeats another's kernels (then kernel_ms counts them twice)
    by_line: dict = defaultdict(float)
    for e in events:
        by_line[e.get("line", "?")] += e["dur_ns"]
    out["ms_per_step_by_line"] = {k: v / steps / 1e6 for k, v in sorted(by_line.items(), key=lambda kv: -kv[1])[:16]}
    if wall_ms:
        out["wall_ms_per_step"] = wall_ms
        out["idle_share"] = max(0.0, 1.0 - out["busy_ms_per_step"] / wall_ms)
    if op_names:
        normalised = {k.replace(".", "_"): v for k, v in op_names.items()}
        scope_ns: dict = defaultdict(float)
        scope_kind_ns: dict = defaultdict(lambda: defaultdict(float))
        found_ns, found = 0.0, 0
        for e in events:
            op = (
                op_names.get(e["hlo_op"] or "")
                or op_names.get(e["name"])
                or normalised.get(e["name"].replace(".", "_"))
            )
            if op is not None:
                found_ns += e["dur_ns"]
                found += 1
            scope = scope_of(op) if op is not None else "unmatched"
            scope_ns[scope] += e["dur_ns"]
            scope_kind_ns[scope][categorize(e["name"])] += e["dur_ns"]
        out["by_scope"] = {k: v / steps / 1e6 for k, v in sorted(scope_ns.items(), key=lambda kv: -kv[1])}
        out["by_scope_kind"] = {
            k: {kind: v / steps / 1e6 for kind, v in sorted(d.items(), key=lambda kv: -kv[1])}
            for k, d in scope_kind_ns.items()
        }
        out["scope_coverage"] = found_ns / total_ns if total_ns else 0.0
        out["scope_coverage_kernels"] = found / len(events) if events else 0.0
    matmul_s = kind_ns["matmul"] / steps / 1e9
    if model_flops and matmul_s > 0:
        out["matmul_tflops_if_all_model_flops"] = model_flops / matmul_s / 1e12
    return out


def profile_calls(fn, steps: int, workdir) -> Path:
    """Run fn(i) for i < steps under jax.profiler.trace -> the .xplane.pb it wrote.

    The calls are dispatched back to back and blocked on once at the end, as a timed training loop
    runs them (blocking after each would add a host round trip per step to the idle share)."""
    import jax
    import jax.profiler

    workdir = Path(workdir)
    outs = []
    with jax.profiler.trace(str(workdir)):
        for i in range(steps):
            outs.append(fn(i))
        jax.block_until_ready(outs)
    found = sorted(workdir.glob("**/*.xplane.pb"))
    if not found:
        raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {workdir}")
    return found[-1]


def markdown(rows: list[tuple[str, dict]]) -> list[str]:
    """A table of (label, summary) rows: kernels, busy/span/wall, idle and each kind's share."""
    head = (
        "| step | source | kernels/step | kernel ms | busy ms | span ms | wall ms | idle | "
        + " | ".join(KINDS)
        + " | matmul TFLOP/s if all model FLOPs |"
    )
    lines = [head, "|" + "---|" * (8 + len(KINDS) + 1)]
    for label, s in rows:
        wall = s.get("wall_ms_per_step")
        idle = s.get("idle_share")
        mm = s.get("matmul_tflops_if_all_model_flops")
        lines.append(
            f"| {label} | {s['source']} | {s['kernels_per_step']:.0f} | {s['kernel_ms_per_step']:.1f} | "
            f"{s['busy_ms_per_step']:.1f} | {s.get('span_ms_per_step', 0.0):.1f} | {f'{wall:.1f}' if wall else '-'} | "
            f"{f'{idle:.0%}' if idle is not None else '-'} | "
            + " | ".join(f"{s['share'][k]:.0%}" for k in KINDS)
            + f" | {f'{mm:.3g}' if mm else '-'} |"
        )
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "trace", help="a .xplane.pb (or .xplane.pb.gz) file, or a folder holding one, from jax.profiler.trace"
    )
    ap.add_argument("--steps", type=int, default=1, help="how many calls of the step the trace holds")
    ap.add_argument("--wall-ms", type=float, default=None, help="measured wall time per step, for the idle share")
    ap.add_argument("--model-flops", type=float, default=None, help="model FLOPs per step")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument(
        "--hlo",
        default=None,
        help="the step's compiled HLO text (.txt or .txt.gz, as the GPU suite returns it): adds the split by named scope",
    )
    ap.add_argument("--json", default=None, help="also write the summary here")
    a = ap.parse_args(argv)
    path = Path(a.trace)
    if path.is_dir():
        found = sorted(glob.glob(str(path / "**" / "*.xplane.pb*"), recursive=True))
        if not found:
            raise SystemExit(f"{path}: no .xplane.pb file under this folder")
        path = Path(found[-1])
    if not path.exists():
        raise SystemExit(f"{path}: no such trace file (expected a .xplane.pb from jax.profiler.trace)")
    events, source = read_events(path)
    op_names = None
    if a.hlo:
        raw = Path(a.hlo).read_bytes()
        op_names = hlo_op_names((gzip.decompress(raw) if a.hlo.endswith(".gz") else raw).decode())
    s = summarize(events, a.steps, a.wall_ms, a.model_flops, a.top, source, op_names)
    print("\n".join(markdown([(path.name, s)])))
    print()
    print("| kernel | kind | calls/step | ms/step | share |")
    print("|---|---|---|---|---|")
    for t in s["top"]:
        print(
            f"| {t['name'][:90]} | {t['kind']} | {t['calls_per_step']:.1f} | {t['ms_per_step']:.3f} | {t['share']:.1%} |"
        )
    if "by_scope" in s:
        print(f"\nby named scope ({s['scope_coverage']:.0%} of kernel time matched to an op)\n")
        print("| scope | ms/step | by kind (ms/step) |")
        print("|---|---|---|")
        for scope, ms in s["by_scope"].items():
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in s["by_scope_kind"][scope].items() if v >= 0.05)
            print(f"| {scope} | {ms:.2f} | {kinds} |")
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()

"""One prepared benchmark suite for a 15-minute GPU lease (issue 17); `benchmarks/gpu_suite.sh` runs it.

    python benchmarks/gpu_suite.py [--smoke] [--out DIR] [--parts a,b] [--total-s 350]

Parts, each in its own process with its own time budget (benchmarks/gpu_suite_parts.py):
  env              jax version, devices, device kind, dense bf16 peak, package versions; device-to-host
                   copies of a 1,024-env chunk's frames (1.6 GB) three ways: device_get,
                   copy_to_host_async (the collector's), via pinned host memory
  train_tokenizer  classic tokenizer train step (bf16) at the preset batch and 2x: step time,
                   tokens/s, XLA and analytic FLOPs, MFU, peak GPU memory, compiled memory analysis,
                   compile time, a check that a step makes no host transfer, and a profile of
                   3 more steps of the preset batch (benchmarks/profile_summary.py: kernel time by
                   kind and by named scope; the trace comes back gzipped)
  train_dynamics   the same for the dynamics (world model) train step
  imagine          frames/s for K = 4, 64 (then 1), single stream (batch 1) and batched, with and
                   without the tokenizer decoder; K=4 / K=64 ratio; compile time of each
  collect          env steps/s of `dreamer4 collect` (classic, 1024 envs with 1, 2 and 4 commits in
                   flight, then 4096 if time is left) against the collector's own jitted scan
                   alone (the same compiled function)
  loader           grain loader frames/s, in-process and with worker processes, against the frames/s
                   the classic train steps consume (from the train parts)
  attention        the attention kernels alone at the classic steps' shapes, ms per call forward and
                   forward + backward: the fused kernels with power-of-two tiles (the default) and
                   padded to one block (their first form), and the einsum reference
A part that fails, or runs out of its budget, is recorded as such with whatever it measured before
(its process writes results after every measurement); the others go on. A part gets its budget
plus whatever earlier parts left unused (never what later parts have as theirs), and skips a
further case when its budget would not hold one more like the last. --set KEY=VALUE passes a
config override to every part. Writes gpu_suite.json and
gpu_suite.md into --out (default $OUT, else bench_out/) and prints the table.

--smoke runs every part at tiny sizes on whatever device there is (CPU in CI), in about a minute.
This driver imports no JAX (the parts do): it never holds the GPU itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import profile_summary  # noqa: E402  (benchmarks/ is not a package; this module imports no JAX at the top)

ORDER = ["env", "train_tokenizer", "train_dynamics", "imagine", "collect", "loader", "attention"]


def full_plan(work: str, cache: str | None) -> dict:
    """Part -> (budget seconds, params) for one H100/H200 (classic preset, bf16).

    Budgets fit a cold start (no compilation cache) in the default 350 s; the 2026 H100 run's
    compile times: tokenizer step 26 s, dynamics step 69 s, collect's Craftax chunk ~57 s (1024
    envs). Within a part, further cases (a 2x batch, more imagination cases, 4096 envs) run only
    while the part's budget holds another one like the last; a part may also use what earlier
    parts left unused (`budget_now`).
    """
    c = {"config": "configs/classic.yaml", "cache_dir": cache, "work": work}
    return {
        # transfer: device-to-host copies of a 1,024-env chunk's frames, three ways (~5 s)
        "env": (16, {**c, "require_gpu": True, "transfer_mb": 1561, "transfer_reps": 2}),
        # after the preset batch is timed, 3 more steps run under the profiler (where the time goes,
        # for the MFU goal: ~5-10 s), before the 2x batch is tried
        # warmup_seconds: untimed steps first; the third lease's traced steps ran 2-10% faster than
        # its timed loops, which began right after the first step
        "train_tokenizer": (
            55,
            {**c, "batches": [[64, 16], [128, 16]], "seconds": 2, "warmup_seconds": 1, "profile_steps": 3},
        ),
        "train_dynamics": (
            100,
            {**c, "batches": [[32, 64], [64, 64]], "seconds": 2, "warmup_seconds": 1, "profile_steps": 3},
        ),
        "imagine": (
            44,
            {
                **c,
                # [batch, K, decode], most wanted first: the K=4 / K=64 ratio, then decode, then K=1
                "cases": [
                    [1, 4, False],
                    [1, 64, False],
                    [64, 4, False],
                    [64, 64, False],
                    [1, 4, True],
                    [1, 1, False],
                    [64, 1, False],
                    [64, 4, True],
                ],
                "max_len": 64,
                "seconds": 1.5,
            },
        ),
        "collect": (
            90,
            {
                **c,
                # [envs, collect.commits_in_flight, collect.host_copy]: the rows' copy into pageable
                # memory ("async", ~1.7 GB/s on the third lease's H200, slower than the device steps)
                # against pinned host memory (session 41), then 4 commits in flight both ways (with
                # a faster copy the commits may become the bound), all at 1,024 envs sharing one
                # compilation; 4,096 envs (a second compilation) where the budget allows
                "cases": [
                    [1024, 2, "async"],
                    [1024, 2, "pinned"],
                    [1024, 4, "pinned"],
                    [1024, 4, "async"],
                    [4096, 2, "pinned"],
                    [4096, 4, "pinned"],
                ],
                "device_seconds": 3,
                "collect_seconds": 8,
                "overrides": ["collect.shard_frames=32768"],
            },
        ),
        # the loader needs no GPU: on CPU its grain workers cannot grab GPU memory either. 8 workers
        # fed 9.6x the dynamics step on the first H100 lease (goal 10x), reading frames; the dynamics
        # now reads cached latents, its own case (8.0-9.5x with 8 workers on the third lease, before
        # the batched reads; in-process, `loader.read_threads` threads, is its default since session
        # 36). 14 frame workers last, so a part killed at its budget keeps the rows before (each row
        # is flushed as it ends).
        "loader": (
            25,
            {
                **c,
                "cases": [["frames", 0], ["frames", 8], ["latents", 0], ["latents", 8], ["frames", 14]],
                "seconds": 3,
                "_env": {"JAX_PLATFORMS": "cpu"},
            },
        ),
        # last: the kernels alone, paired (session 38 cut the tokenizer's 80-token frames into tiles
        # of 64 + 16 instead of one padded 128-block); most wanted shape first
        "attention": (
            20,
            {
                **c,
                "shapes": [
                    ["tokenizer space", 1024, 80, 80, 8, 4, 64],
                    ["dynamics time", 308, 64, 64, 12, 4, 64],
                    ["tokenizer time", 5120, 16, 16, 8, 4, 64],
                    ["dynamics space", 1408, 14, 14, 12, 4, 64],
                ],
                "seconds": 0.3,
            },
        ),
    }


SMOKE_MODEL = [
    "tokenizer.width=32",
    "tokenizer.num_heads=2",
    "tokenizer.num_kv_heads=1",
    "tokenizer.depth=2",
    "dynamics.width=32",
    "dynamics.depth=2",
    "dynamics.num_heads=2",
    "dynamics.num_kv_heads=1",
    "dynamics.k_max=64",
    "dynamics.short_seq_len=0",
]


def smoke_plan(work: str, cache: str | None) -> dict:
    """Every part at tiny sizes (tiny preset, smaller still): a test that the suite runs, not a figure."""
    c = {
        "config": "configs/tiny.yaml",
        "cache_dir": cache,
        "work": work,
        "overrides": SMOKE_MODEL,
        "min_steps": 2,
        "max_steps": 3,
        "min_frames": 2,
        "max_frames": 3,
    }
    return {
        "env": (60, {**c, "transfer_mb": 4, "transfer_reps": 2}),
        # the fused (Pallas) attention kernels' on-device check, at a small shape (on the CPU the
        # kernels are interpreted; the step itself keeps the default kernel: an interpreted kernel
        # would swamp the CPU profile with the interpreter's thousands of small ops)
        "train_tokenizer": (
            90,
            {
                **c,
                "batches": [[2, 2]],
                "seconds": 0.0,
                "profile_steps": 2,
                "attention_check_shapes": [[2, 5, 4, 2, 16, False]],
            },
        ),
        "train_dynamics": (90, {**c, "batches": [[2, 4]], "seconds": 0.0, "warmup_seconds": 0.01, "profile_steps": 2}),
        "imagine": (90, {**c, "batches": [1], "ks": [1, 4, 64], "decode_ks": [4], "max_len": 4, "seconds": 0.0}),
        "collect": (
            150,
            {
                **c,
                "cases": [[4, 1, "async"], [4, 2, "pinned"]],
                "chunk_steps": 16,
                "device_seconds": 0.2,
                "collect_seconds": 0.5,
            },
        ),
        "loader": (
            90,
            {
                **c,
                "cases": [["frames", 0], ["frames", 1], ["latents", 0]],
                "batch": [2, 4],
                "latent_batch": [2, 4],
                "seconds": 0.0,
                "synthetic": True,
                "synthetic_size": [4, 16],
            },
        ),
        # 40 positions: tiles of 32 + 16 against one padded 64-block (both interpreted on a CPU)
        "attention": (60, {**c, "shapes": [["tiny", 2, 40, 40, 2, 1, 16]], "seconds": 0.0}),
    }


def budget_now(base: float, left: float, reserved: float) -> float:
    """A part's budget: its own, or more when earlier parts left time unused; what later parts
    have as their own budgets (`reserved`) stays theirs, so the suite never runs past --total-s."""
    return max(base, left - reserved)


def _commit() -> str:
    if os.environ.get("DREAMER4_COMMIT"):
        return os.environ["DREAMER4_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], check=False, cwd=REPO, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            check=False,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if sha.returncode == 0:
            return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no .git here; pass DREAMER4_COMMIT=<sha>)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_part(name: str, params: dict, budget: float, work: Path) -> dict:
    out = work / f"part_{name}.json"
    out.unlink(missing_ok=True)
    params = dict(params)
    part_env = params.pop("_env", {})
    params["_t0"] = time.time()  # the part's clock for its own budget (gpu_suite_parts._left)
    cmd = [sys.executable, str(HERE / "gpu_suite_parts.py"), name, "--params", json.dumps(params), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.update(part_env)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    timed_out = False
    try:
        log, _ = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the part and its workers (grain), nothing else
        log, _ = proc.communicate()
    wall = time.perf_counter() - t0
    try:
        res = json.loads(out.read_text())
    except (OSError, ValueError):
        res = {}
    if not res.get("error"):
        res.pop("traceback", None)
    status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed")
    entry = {"status": status, "wall_s": round(wall, 2), "budget_s": budget, "results": res}
    if timed_out:
        entry["reason"] = f"stopped at its budget of {budget:.0f} s; results hold what finished before"
    elif proc.returncode != 0:
        entry["reason"] = res.get("error") or f"exit code {proc.returncode}: {(log or '')[-500:]}"
    entry["log_tail"] = (log or "")[-1500:]
    return entry


# --------------------------------------------------------------------------------------- report
def _f(x, fmt="{:.1f}"):
    return "n/a" if x is None else fmt.format(x)


def _gib(b):
    return None if b is None else b / 2**30


def _envs(row: dict) -> str:
    """A collect row's env count, with its commits in flight (rows before session 37 have none)
    and how its rows reached the host (before session 41: always "async")."""
    k, copy = row.get("commits_in_flight"), row.get("host_copy")
    return f"{row['num_envs']}" + (f" ({k}{', ' + copy if copy else ''})" if k is not None else "")


def markdown(res: dict) -> str:
    m = res["meta"]
    parts = res["parts"]
    env = parts.get("env", {}).get("results", {})
    lines = [
        f"# GPU suite ({'smoke' if m['smoke'] else 'full'})",
        "",
        (
            f"device: {env.get('device_kind', '?')} ({env.get('platform', '?')}), jax {env.get('jax', '?')}; "
            f"host CPU: {m['cpu_model']} x {m['cpu_count']}; date {m['date_utc']}; commit {m['commit']}"
        ),
        (
            f"command: `{m['command']}`; total {m['total_s']:.0f} s; compilation cache entries at start: "
            f"{m['cache_entries_at_start']} (0 = compile times are cold)"
        ),
        "",
        "| part | status | wall s | note |",
        "|---|---|---|---|",
    ]
    for name in ORDER:
        e = parts.get(name)
        if e is None:
            continue
        lines.append(
            f"| {name} | {e['status']} | {e['wall_s']:.0f} / {e['budget_s']:.0f} | "
            f"{(e.get('reason') or '').replace('|', '/')[:160]} |"
        )
    lines += [
        "",
        "## Train steps",
        "",
        (
            "| stage | batch | step ms | frames/s | tokens/s | TFLOP/step (XLA / model) | XLA TFLOP/s | MFU (XLA) "
            "| MFU (model) | peak GiB | temp GiB (compiled) | compile s | host transfers |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("train_tokenizer", "train_dynamics"):
        for r in parts.get(name, {}).get("results", {}).get("batches", []):
            ma = r.get("memory_analysis", {})
            xla = r.get("cost_analysis", {}).get("flops")
            flops = f"{_f(xla and xla / 1e12, '{:.2f}')} / {_f(r.get('model_flops_per_step') and r['model_flops_per_step'] / 1e12, '{:.2f}')}"
            head = f"| {name[6:]} | {r['batch']}x{r['seq_len']} |"
            tail = f" {_f(_gib(ma.get('temp_size_in_bytes')), '{:.2f}')} | {_f(r.get('compile_s'))} |"
            if "step_s" not in r:
                why = r.get("error", "compiled only" if m.get("compile_only") else "did not finish")[:80]
                lines.append(f"{head} {why} | | | {flops} | | | | |{tail} |")
                continue
            lines.append(
                f"{head} {r['step_s'] * 1e3:.1f} | {r['frames_per_s']:.0f} | {r['tokens_per_s']:.0f} | {flops} | "
                f"{_f(r.get('xla_tflops_per_s'), '{:.2f}')} | {_f(r.get('mfu_xla'), '{:.1%}')} | "
                f"{_f(r.get('mfu_model'), '{:.1%}')} | {_f(_gib(r.get('memory', {}).get('peak_bytes_in_use')), '{:.2f}')} |"
                f"{tail} {'none' if str(r.get('host_transfers_in_step', '')).startswith('none') else 'YES'} |"
            )
    for name in ("train_tokenizer", "train_dynamics"):
        for r in parts.get(name, {}).get("results", {}).get("batches", []):
            t = r.get("hlo_traffic")
            if t and "error" not in t:
                kinds = ", ".join(f"{k} {v['bytes'] / 1e9:.1f}" for k, v in t["by_kind"].items())
                lines.append(
                    f"\nstatic traffic of the compiled {name[6:]} {r['batch']}x{r['seq_len']} step "
                    f"(`benchmarks/gpu_hlo.py`): {t['kernels']} kernels, {t['bytes'] / 1e9:.1f} GB ({kinds} GB)"
                )
    cached = parts.get("train_dynamics", {}).get("results", {}).get("latent_cache")
    if cached is not None:
        lines.append(
            "\ndynamics step: "
            + (
                "cached latents (no encoder in the step)"
                if cached
                else "encodes its frames (dynamics.latent_cache=false)"
            )
        )
    kernels = {parts.get(n, {}).get("results", {}).get("attention") for n in ("train_tokenizer", "train_dynamics")}
    lines.append(
        f"\nattention implementation (DREAMER4_ATTENTION): {', '.join(sorted(k for k in kernels if k)) or '?'}"
    )
    for name in ("train_tokenizer", "train_dynamics"):
        check = parts.get(name, {}).get("results", {}).get("fused_attention_check")
        for label, c in (check or {}).items():
            if "error" in c:
                lines.append(f"\nfused attention check ({name[6:]}), {label}: ERROR {c['error'][:200]}")
            else:
                diffs = "; ".join(f"{k} {v['max_abs_diff']:.3g} (of {v['max_abs_ref']:.3g})" for k, v in c.items())
                lines.append(f"\nfused attention vs einsum on this device ({name[6:]}), {label}: max abs diff {diffs}")
    profiled = [
        (f"{name[6:]} {r['batch']}x{r['seq_len']}", r["profile"])
        for name in ("train_tokenizer", "train_dynamics")
        for r in parts.get(name, {}).get("results", {}).get("batches", [])
        if "profile" in r
    ]
    if profiled:
        lines += [
            "",
            "## Where a train step's time goes (`benchmarks/profile_summary.py`; share of kernel time by kind)",
            "",
        ]
        ok = [(label, s) for label, s in profiled if "error" not in s]
        if ok:
            lines += profile_summary.markdown(ok)
        for label, s in profiled:
            if "error" in s:
                lines.append(f"\n{label}: no profile ({s['error'][:160]})")
                continue
            if s.get("warning"):
                lines.append(f"\n{label}: WARNING {s['warning']}")
            top = "; ".join(f"{t['name'][:60]} ({t['kind']}) {t['share']:.0%}" for t in s["top"][:5])
            lines.append(
                f"\n{label}, top kernels: {top}" + (f"; trace: {s['trace_file']}" if s.get("trace_file") else "")
            )
            if s.get("by_scope"):
                k_ms = s["kernel_ms_per_step"] or 1.0
                scopes = "; ".join(f"{k} {v / k_ms:.0%}" for k, v in list(s["by_scope"].items())[:8])
                lines.append(f"\n{label}, by named scope ({s['scope_coverage']:.0%} of kernel time matched): {scopes}")
    im = parts.get("imagine", {}).get("results", {})
    lines += [
        "",
        "## Imagination (frames/s)",
        "",
        "| batch | K | decode | frames/s | ms per frame step | compile s |",
        "|---|---|---|---|---|---|",
    ]
    for r in im.get("rows", []):
        lines.append(
            f"| {r['batch']} | {r['K']} | {'yes' if r['decode'] else 'no'} | "
            f"{_f(r.get('frames_per_s')) if 'error' not in r else r['error'][:80]} | "
            f"{_f(r.get('ms_per_step'), '{:.2f}')} | {_f(r.get('compile_s'))} |"
        )
    for k, v in (im.get("speedup_k4_over_kmax") or {}).items():
        lines.append(f"\n{k}: {_f(v)}x (goal >= 12x)")
    co = parts.get("collect", {}).get("results", {})
    if env.get("transfer"):  # beside collection: is the collector's copy to the host the slow part?
        lines += [
            "",
            "## Device-to-host copy of a chunk's frames (fastest of the reps, fresh device array each)",
            "",
            "| method | MB | s | GB/s | of which the start (device_put / copy_to_host_async) s | np.asarray s |",
            "|---|---|---|---|---|---|",
        ]
        for r in env["transfer"]:
            lines.append(
                f"| {r['method']} | {r['MB']:.0f} | {_f(r.get('s'), '{:.3f}')} | {_f(r.get('GB_per_s'), '{:.2f}')} | "
                f"{_f(r.get('start_s'), '{:.3f}')} | {_f(r.get('asarray_s'), '{:.3f}')} |"
                + (f" {r['error'][:100]}" if "error" in r else "")
            )
    lines += [
        "",
        "## Collection (env steps/s)",
        "",
        (
            "| envs (commits in flight, host copy) | collect steady | collect, 2nd half | device-only scan | collect / device-only "
            "(2nd half) | compile s (init + 2 chunks) | collect 1st chunk s | episodes / shards | Craftax auto-reset loop |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in co.get("rows", []):
        if "skipped" in r:
            lines.append(f"| {_envs(r)} | skipped: {r['skipped'][:100]} | | | | | | | |")
            continue
        late = r.get("second_half") or {}
        lines.append(
            f"| {_envs(r)} | {_f(r.get('collect_steady_steps_per_s'), '{:.0f}')} | "
            f"{_f(late.get('steps_per_s'), '{:.0f}')} | {_f(r.get('device_only_steps_per_s'), '{:.0f}')} | "
            f"{_f(r.get('ratio_collect_over_device_only'), '{:.2f}')} "
            f"({_f(r.get('ratio_second_half_over_device_only'), '{:.2f}')}) | {_f(r.get('compile_s'))} | "
            f"{_f(r.get('collect_first_chunk_s'))} | {r.get('episodes', 'n/a')} / {r.get('shards', 'n/a')} | "
            f"{_f(r.get('craftax_loop_steps_per_s'), '{:.0f}')} |" + (f" {r['error'][:80]}" if "error" in r else "")
        )
    replays = [
        f"{r['num_envs']} envs: {'yes' if r['chunk_replays_exactly'] else 'NO'}"
        for r in co.get("rows", [])
        if "chunk_replays_exactly" in r
    ]
    if replays:  # a resumed collection replays chunks and needs the same bits (data/resume_state.py)
        lines += ["", "Chunk replayed from the same carry gives the same bits: " + "; ".join(replays)]
    host = [r for r in co.get("rows", []) if "host_cpu_s_per_chunk" in r]
    if host:  # is the host CPU-bound (all cores busy) or bound by one thread?
        lines += [
            "",
            "| envs (commits in flight, host copy) | host CPU s per chunk (2nd half) | host cores busy (2nd half) "
            "| kernel's share (2nd half) | page faults per chunk (2nd half) | ms per chunk in each host component |",
        ]
        lines.append("|---|---|---|---|---|---|")
        for r in host:
            parts_ms = "; ".join(f"{k.split(' (')[0]} {v:.0f}" for k, v in r["host_ms_per_chunk"].items())
            late = r.get("second_half") or {}
            lines.append(
                f"| {_envs(r)} | {r['host_cpu_s_per_chunk']:.1f} ({_f(late.get('cpu_s_per_chunk'), '{:.1f}')}) | "
                f"{r['host_cores_busy']:.1f} of {r['host_cpus']} ({_f(late.get('cores_busy'), '{:.1f}')}) | "
                f"{_f(r.get('host_system_cpu_share'), '{:.0%}')} ({_f(late.get('system_cpu_share'), '{:.0%}')}) | "
                f"{_f(r.get('host_minor_faults_per_chunk'), '{:,.0f}')} "
                f"({_f(late.get('minor_faults_per_chunk'), '{:,.0f}')}) | {parts_ms} |"
            )
    lo = parts.get("loader", {}).get("results", {})
    lines += [
        "",
        f"## Loader (train steps consume {lo.get('train_consumes_frames_per_s')} frames/s; frames at batch "
        f"{lo.get('batch')}, latents at {lo.get('latent_batch')})",
        "",
        "| reads | workers | frames/s | MB/s | x train step (which) | start-up s |",
        "|---|---|---|---|---|---|",
    ]
    for r in lo.get("rows", []):
        over = f" ({r['ratio_over'].removeprefix('train_')})" if "ratio_over" in r else ""
        lines.append(
            f"| {r.get('reads', 'frames')} | {r['worker_count']}"
            + (f" ({r['read_threads']} threads)" if "read_threads" in r else "")
            + f" | {_f(r.get('frames_per_s'), '{:.0f}')} | "
            f"{_f(r.get('MB_per_s'))} | {_f(r.get('ratio_over_train_step'), '{:.2f}')}{over} | {_f(r.get('startup_s'))} |"
            + (f" {r['error'][:80]}" if "error" in r else "")
        )
    at = parts.get("attention", {}).get("results", {})
    if at:
        lines += [
            "",
            f"## Attention kernels alone ({at.get('note', '')})",
            "",
            "| shape | N Q M K G H | kernels | forward ms | forward + backward ms | compile s (fwd / fwd + bwd) |",
            "|---|---|---|---|---|---|",
        ]
        for r in at.get("rows", []):
            dims = " ".join(map(str, r["NQMKGH"]))
            if "fwd_bwd_ms" not in r and "fwd_ms" not in r:
                lines.append(f"| {r['shape']} | {dims} | {r['impl']} | {r.get('error', 'did not finish')[:80]} | | |")
                continue
            lines.append(
                f"| {r['shape']} | {dims} | {r['impl']} | {_f(r.get('fwd_ms'), '{:.3f}')} | "
                f"{_f(r.get('fwd_bwd_ms'), '{:.3f}')} | {_f(r.get('fwd_compile_s'))} / {_f(r.get('fwd_bwd_compile_s'))} |"
            )
        by = {(r["shape"], r["impl"]): r.get("fwd_bwd_ms") for r in at.get("rows", [])}
        for shape in dict.fromkeys(r["shape"] for r in at.get("rows", [])):
            b, o, e = by.get((shape, "binary")), by.get((shape, "single")), by.get((shape, "einsum"))
            if b and (o or e):
                vs = "; ".join(f"{name} {x / b:.2f}x" for name, x in (("single", o), ("einsum", e)) if x)
                lines.append(f"\n{shape}, forward + backward, time of each against binary tiles: {vs}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every part at tiny sizes (CPU, CI)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    ap.add_argument("--parts", default=",".join(ORDER))
    ap.add_argument("--total-s", type=float, default=None, help="time for all parts (default 350 s; smoke 300 s)")
    ap.add_argument(
        "--compile-only",
        action="store_true",
        help="train parts: compile the classic steps at the preset batch and report XLA FLOPs and memory "
        "analysis without running them (what a CPU can tell about the GPU step)",
    )
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's budget")
    ap.add_argument(
        "--collect-seconds",
        type=float,
        default=None,
        help="the collect part's seconds of collection per env count (default 8). The running episodes' "
        "rows grow to their steady size over the first chunks, in fresh memory, so longer runs come "
        "closer to the steady rate (BENCHMARKS.md, session 35)",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every part, e.g. --set dynamics.logit_cap=0 (then attention can run cuDNN)",
    )
    args = ap.parse_args()
    t_start = time.perf_counter()
    total = args.total_s or (300.0 if args.smoke else 350.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="d4suite-"))
    # The project's persistent compilation cache: a second try on the same machine compiles nothing
    # again. Whether it held entries at the start is recorded (then compile times are cache loads).
    cache = os.environ.get("DREAMER4_JAX_CACHE") or str(Path.home() / ".cache" / "dreamer4" / "jax")
    cache_entries = len(list(Path(cache).glob("*"))) if Path(cache).is_dir() else 0
    plan = (smoke_plan if args.smoke else full_plan)(str(work), None if cache.lower() == "off" else cache)
    wanted = [p for p in ORDER if p in args.parts.split(",")]
    # the train parts' profiler traces and compiled HLO come back with the results (gzipped; small
    # in smoke mode, where the test reads them back)
    for name in ("train_tokenizer", "train_dynamics"):
        budget, params = plan[name]
        plan[name] = (budget, {**params, "keep_trace_dir": str(out)})
    if args.compile_only:
        for name in ("train_tokenizer", "train_dynamics"):
            budget, params = plan[name]
            plan[name] = (budget, {**params, "compile_only": True, "batches": params["batches"][:1]})
    if args.collect_seconds is not None:
        budget, params = plan["collect"]
        plan["collect"] = (budget, {**params, "collect_seconds": args.collect_seconds})
    res = {
        "meta": {
            "smoke": args.smoke,
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": _commit(),
            "compile_only": args.compile_only,
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "host": platform.node(),
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "compilation_cache": cache,
            "cache_entries_at_start": cache_entries,
            "total_budget_s": total,
        },
        "parts": {},
    }
    jpath, mpath = out / "gpu_suite.json", out / "gpu_suite.md"

    def save():
        res["meta"]["total_s"] = time.perf_counter() - t_start
        jpath.write_text(json.dumps(res, indent=1, default=str))
        mpath.write_text(markdown(res))

    base = {name: plan[name][0] * args.budget_scale for name in wanted}
    for i, name in enumerate(wanted):
        _, params = plan[name]
        if args.overrides:
            params = {**params, "overrides": list(params.get("overrides", [])) + args.overrides}
        if name == "loader":
            consumed = {}
            for tr in ("train_tokenizer", "train_dynamics"):
                rows = res["parts"].get(tr, {}).get("results", {}).get("batches", [])
                ok = [r for r in rows if "frames_per_s" in r]
                if ok:
                    consumed[tr] = max(r["frames_per_s"] for r in ok)
            params = {**params, "consumed_frames_per_s": consumed}
            cached = res["parts"].get("train_dynamics", {}).get("results", {}).get("latent_cache")
            if cached is not None:  # what the dynamics part's step read, so the loader compares alike
                params["dynamics_latent_cache"] = cached
        left = total - (time.perf_counter() - t_start)
        budget = budget_now(base[name], left, sum(base[n] for n in wanted[i + 1 :]))
        if left < 10:
            res["parts"][name] = {
                "status": "skipped",
                "wall_s": 0.0,
                "budget_s": budget,
                "results": {},
                "reason": f"not started: {left:.0f} s of the suite's {total:.0f} s left",
            }
            save()
            continue
        budget = min(budget, left)
        print(f"[suite] {name}: budget {budget:.0f} s", flush=True)
        entry = run_part(name, {**params, "_budget_s": budget}, budget, work)
        res["parts"][name] = entry
        print(
            f"[suite] {name}: {entry['status']} in {entry['wall_s']:.1f} s"
            + (f" ({entry['reason']})" if entry.get("reason") else ""),
            flush=True,
        )
        if entry["status"] != "ok":
            print(entry["log_tail"][-800:], flush=True)
        save()
    save()
    print("\n" + mpath.read_text())
    print(f"wrote {jpath} and {mpath}")
    if not os.environ.get("DREAMER4_SUITE_KEEP"):
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The parts of the GPU suite, one per process: `python benchmarks/gpu_suite_parts.py PART --params JSON --out FILE`.

`benchmarks/gpu_suite.py` starts one process per part (a crash, an out-of-memory or a hang loses
that part only, and each part's peak GPU memory is its own) and kills it at its time budget. A part
writes what it has measured to FILE after every measurement (atomic rename), so a part stopped
at its budget still reports what it finished. DREAMER4_SUITE_FAIL=part1,part2 makes those parts
raise at their start (tests: one failing part must not lose the others).

Everything this suite needs from the package is imported here, at the top: the config loader,
the compilation cache, the training runtime (mesh, state placement, compiled step), the model
constructors, the sampler, the collector and the loader. Model cases (shapes, analytic FLOPs)
and the bare env loop are reused from benchmarks/train_step.py and benchmarks/data.py.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dreamer4.config import load_config
from dreamer4.data.loader import make_loader
from dreamer4.dynamics.sampler import generate_step
from dreamer4.nn import attention
from dreamer4.nn.module_jit import module_jit
from dreamer4.runtime.jax_setup import enable_compilation_cache
from dreamer4.runtime.loading import TRAINABLE, build_dynamics, build_tokenizer
from dreamer4.runtime.mesh import global_batch, make_mesh
from dreamer4.runtime.train_loop import compile_train_step, place_train_state

HERE = Path(__file__).resolve().parent


def _bench_module(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train_step_bench = _bench_module("train_step")  # tokenizer_case, dynamics_case, PEAK_BF16, FRAME_SHAPES
profile_summary = _bench_module("profile_summary")  # profile_calls, read_events, summarize
gpu_hlo = _bench_module("gpu_hlo")  # kernels, summarize: static traffic of a compiled module


def _collection():
    """(dreamer4.data.collect.collect, benchmarks/data.py): imported by the parts that step Craftax
    only, since importing Craftax costs seconds that every other part would pay."""
    from dreamer4.data.collect import collect

    return collect, _bench_module("data")


class Recorder:
    """The part's result dict, written to disk (atomically) after every update."""

    def __init__(self, path: Path):
        self.path, self.res = path, {}

    def __setitem__(self, key, value):
        self.res[key] = value
        self.flush()

    def flush(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.res, indent=1, default=str))
        tmp.replace(self.path)


T_IMPORTED = time.time()  # when no _t0 is given: this module's imports are done by now
MARGIN_S = 4.0  # kept free at the end of a part's budget: writing results, process exit


def _left(p) -> float:
    """Seconds of the part's budget left, less MARGIN_S: the driver passes the budget (_budget_s)
    and the wall-clock time it started this process (_t0), imports included."""
    return p.get("_budget_s", float("inf")) - (time.time() - p.get("_t0", T_IMPORTED)) - MARGIN_S


def _device():
    return jax.devices()[0]


def _wait_for_textures(p, rec) -> None:
    """Wait (within the part's budget) for the Craftax texture cache that gpu_suite.sh builds in
    the background when it carried none: two processes building it at once would race on the file."""
    marker = os.environ.get("DREAMER4_TEXTURES_PENDING")
    if not marker:
        return
    t0 = time.time()
    while not Path(marker).exists() and _left(p) > 0:
        time.sleep(0.5)
    rec["texture_wait_s"] = time.time() - t0


def _peak_flops():
    kind = getattr(_device(), "device_kind", "")
    if _device().platform == "cpu":
        return None
    for k, v in train_step_bench.PEAK_BF16.items():
        if k.lower() in kind.lower():
            return v
    return None


def _memory_stats() -> dict:
    try:
        s = _device().memory_stats() or {}
    except Exception:  # noqa: BLE001  (CPU backends may not implement it)
        s = {}
    return {k: int(s[k]) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in s}


def _cost(compiled) -> dict:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    ca = ca or {}
    return {k: float(ca[k]) for k in ("flops", "bytes accessed", "transcendentals") if k in ca}


def _memory_analysis(compiled) -> dict:
    try:
        ma = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001  (not every backend implements it)
        return {"error": str(e)}
    if ma is None:
        return {}
    return {k: int(getattr(ma, k)) for k in dir(ma) if k.endswith("_in_bytes")}


def _timed_steps(fn, seconds: float, min_n: int, max_n: int):
    """Call fn(i) (returns something to block on) until `seconds` passed (>= min_n, <= max_n calls)."""
    n, out, t0 = 0, None, time.perf_counter()
    while n < min_n or (time.perf_counter() - t0 < seconds and n < max_n):
        out = fn(n)
        n += 1
        if n in (min_n, 2 * min_n) or n % 8 == 0:  # check the clock without syncing every call
            jax.block_until_ready(out)
    jax.block_until_ready(out)
    return n, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- parts
def part_env(p, rec: Recorder):
    import importlib.metadata as md

    dev = _device()
    rec["jax"] = jax.__version__
    rec["backend"] = jax.default_backend()
    rec["devices"] = [str(d) for d in jax.devices()]
    rec["device_kind"] = dev.device_kind
    rec["platform"] = dev.platform
    rec["peak_bf16_flops"] = _peak_flops()
    rec["memory"] = _memory_stats()
    versions = {}
    for name in ("jaxlib", "flax", "optax", "orbax-checkpoint", "tensorstore", "craftax", "grain", "wandb", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    rec["versions"] = versions
    rec["python"] = platform.python_version()
    rec["cpu_count"] = os.cpu_count()
    if p.get("require_gpu") and dev.platform != "gpu":
        raise RuntimeError(f"jax.devices() shows no GPU: {jax.devices()} (backend {jax.default_backend()})")
    if p.get("transfer_mb"):
        rows: list = []
        rec["transfer"] = rows
        try:  # a failure here is recorded; it does not fail the part (the facts above stand)
            _transfer_rates(dev, p["transfer_mb"], p.get("transfer_reps", 2), rows, rec)
        except Exception as e:  # noqa: BLE001
            rows.append({"method": "(set-up)", "MB": p["transfer_mb"], "error": _error(e)})
            rec.flush()


# One classic frame's bytes; a 1,024-env chunk holds 1,024 x 128 of them (1,561 MB).
CHUNK_FRAME_BYTES = 63 * 63 * 3


def _transfer_rates(dev, mb: float, reps: int, rows: list, rec) -> None:
    """Device-to-host copies of one uint8 array of `mb` MB (a 1,024-env classic chunk's frames:
    1,561 MB), each from a fresh device array; seconds = the fastest of `reps`:
      device_get          np.asarray(x), as a synchronous jax.device_get does;
      copy_to_host_async  x.copy_to_host_async(), then np.asarray(x): the collector's way;
      pinned_host         jax.device_put(x) into the device's pinned host memory, then np.asarray.
    The third lease's collector moved ~1.7 GB/s (device_get ~0.95 s per 1,024-env chunk, H200
    host): if the host table shows the copy as the collecting thread's bound, these rows say which
    path to take instead."""
    n_rows = max(int(mb * 1e6 / CHUNK_FRAME_BYTES), 1)

    def fresh(i):  # one fused kernel, no int32 array of the full size
        shape = (n_rows, CHUNK_FRAME_BYTES)
        ij = 7 * jax.lax.broadcasted_iota(jnp.int32, shape, 0) + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        return (ij + i).astype(jnp.uint8)

    make = jax.jit(fresh)  # on the default device, `dev`
    kinds = [m.kind for m in dev.addressable_memories()]
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host") if "pinned_host" in kinds else None

    def copy(method: str, x) -> dict:
        t0 = time.perf_counter()
        if method == "copy_to_host_async":
            x.copy_to_host_async()
        elif method == "pinned_host":
            x = jax.block_until_ready(jax.device_put(x, pinned))
        t1 = time.perf_counter()
        out = np.asarray(x)
        t2 = time.perf_counter()
        assert out.nbytes == n_rows * CHUNK_FRAME_BYTES
        return {"s": t2 - t0, "start_s": t1 - t0, "asarray_s": t2 - t1}

    for method in ("device_get", "copy_to_host_async", "pinned_host"):
        row = {"method": method, "MB": n_rows * CHUNK_FRAME_BYTES / 1e6}
        rows.append(row)
        if method == "pinned_host" and pinned is None:
            row["error"] = f"no pinned_host memory on {dev} (memories: {kinds})"
            continue
        try:
            times = []
            for i in range(reps):
                x = jax.block_until_ready(make(jnp.int32(i)))
                times.append(copy(method, x))
                del x
                gc.collect()
            best = min(times, key=lambda t: t["s"])
            row.update({**best, "GB_per_s": row["MB"] / 1e3 / best["s"], "reps": reps})
        except Exception as e:  # noqa: BLE001
            row["error"] = _error(e)
        rec.flush()


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _train_batch(p, rec: Recorder, row: dict, cfg, tc, stage: str, trainable) -> None:
    """Compile (and unless compile_only, time) one train step at row's batch; fills `row`."""
    case = train_step_bench.tokenizer_case if stage == "tokenizer" else train_step_bench.dynamics_case
    model, loss_fn, data, model_flops, tokens, n_params, frames = case(cfg, row["batch"], row["seq_len"])
    row.update(
        {"params": n_params, "model_flops_per_step": model_flops, "tokens_per_step": tokens, "frames_per_step": frames}
    )
    mesh = make_mesh(cfg.runtime.fsdp)
    graphdef, state, shardings = place_train_state(model, tc, mesh, trainable)
    del model
    step = compile_train_step(graphdef, loss_fn, shardings, mesh, trainable)
    gb = global_batch(mesh, data)
    key = jax.device_put(jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    compiled = step.lower(state, gb, key).compile()
    row["compile_s"] = time.perf_counter() - t0
    row["cost_analysis"] = _cost(compiled)
    row["memory_analysis"] = _memory_analysis(compiled)
    hlo_text = compiled.as_text()
    try:  # bytes each kernel of the module this device compiled reads and writes (benchmarks/gpu_hlo.py)
        traffic = gpu_hlo.summarize(gpu_hlo.kernels(hlo_text), top=5)
        row["hlo_traffic"] = {k: traffic[k] for k in ("kernels", "bytes", "non_matmul_bytes", "by_kind")}
    except Exception as e:  # noqa: BLE001  (a parser surprise must not lose the timings)
        row["hlo_traffic"] = {"error": _error(e)}
    rec.flush()
    if p.get("compile_only"):  # FLOPs and memory of the compiled step, without running it
        return
    state, metrics = compiled(state, gb, key)  # warm-up
    jax.block_until_ready(metrics)
    # no host round trip inside a step: batch, key and state are on the device already
    try:
        with jax.transfer_guard("disallow"):
            state, metrics = compiled(state, gb, key)
            jax.block_until_ready(metrics)
        row["host_transfers_in_step"] = "none (jax.transfer_guard('disallow') passed)"
    except Exception as e:  # noqa: BLE001
        row["host_transfers_in_step"] = f"transfer guard tripped: {_error(e)[:200]}"
    keys = [jax.random.fold_in(key, i) for i in range(8)]
    holder = {"state": state, "metrics": metrics}
    del state

    def one(i):
        holder["state"], holder["metrics"] = compiled(holder["state"], gb, keys[i % 8])
        return holder["metrics"]

    if p.get("warmup_seconds"):  # untimed: the third lease's 2 s loops ran 2-10% slower per step than its traces
        _timed_steps(one, p["warmup_seconds"], 1, p.get("max_steps", 200))
    n, dt = _timed_steps(one, p["seconds"], p.get("min_steps", 3), p.get("max_steps", 200))
    step_s = dt / n
    peak = _peak_flops()
    xla_flops = row["cost_analysis"].get("flops")
    finite = all(bool(np.isfinite(np.asarray(v)).all()) for v in jax.device_get(holder["metrics"]).values())
    row.update(
        {
            "steps_timed": n,
            "step_s": step_s,
            "frames_per_s": frames / step_s,
            "tokens_per_s": tokens / step_s,
            "model_tflops_per_s": model_flops / step_s / 1e12,
            "xla_tflops_per_s": (xla_flops / step_s / 1e12) if xla_flops else None,
            "mfu_model": (model_flops / step_s / peak) if peak else None,
            "mfu_xla": (xla_flops / step_s / peak) if (peak and xla_flops) else None,
            "memory": _memory_stats(),
            "metrics_finite": finite,
        }
    )
    n_prof = p.get("profile_steps", 0)
    if n_prof and _left(p) > n_prof * step_s + p.get("profile_overhead_s", 10.0):
        try:
            row["profile"] = _profile(p, one, n_prof, step_s, model_flops, f"{stage}_b{row['batch']}", hlo_text)
        except Exception as e:  # noqa: BLE001  (a profiler failure must not lose the timing above)
            row["profile"] = {"error": _error(e)}
    elif n_prof:
        row["profile"] = {"error": f"skipped: {_left(p):.0f} s of the budget left"}


def _profile(p, step_fn, n: int, step_s: float, model_flops: float, label: str, hlo_text=None) -> dict:
    """Trace n more calls of step_fn (dispatched back to back, as timed) and summarise where the
    device time goes (benchmarks/profile_summary.py); with keep_trace_dir, gzipped copies of the
    trace (open it in xprof / TensorBoard's profile plugin) and of the compiled HLO text go to the
    suite's output folder, so `profile_summary.py TRACE --hlo HLO` can redo the split offline."""
    op_names = profile_summary.hlo_op_names(hlo_text) if hlo_text else None
    t0 = time.perf_counter()
    trace_dir = Path(p["work"]) / f"trace_{label}"
    shutil.rmtree(trace_dir, ignore_errors=True)
    xplane = profile_summary.profile_calls(step_fn, n, trace_dir)
    events, source = profile_summary.read_events(xplane)
    summary = profile_summary.summarize(events, n, step_s * 1e3, model_flops, top=10, source=source, op_names=op_names)
    if source != "device" and _device().platform != "cpu":
        summary["warning"] = (
            "the trace holds no device kernels (CUPTI not loaded?): these are the host's XLA thunk "
            "times (launches), not GPU kernel times"
        )
    keep = p.get("keep_trace_dir")
    if keep and xplane.stat().st_size < 60 * 2**20:
        dest = Path(keep) / f"trace_{label}.xplane.pb.gz"
        with open(xplane, "rb") as src, gzip.open(dest, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        if dest.stat().st_size > 15 * 2**20:  # the device tool returns files up to 16 MiB
            dest.unlink()
        else:
            summary["trace_file"] = dest.name
    if keep and hlo_text:
        dest = Path(keep) / f"hlo_{label}.txt.gz"
        dest.write_bytes(gzip.compress(hlo_text.encode(), 6))
        summary["hlo_file"] = dest.name
    summary["profile_s"] = time.perf_counter() - t0
    return summary


def _attention_and_grads(impl, q, k, v, w, mask, cap):
    """[out, dq, dk, dv] (float32 numpy) of sum(w * attention(q, k, v)) with the given kernel."""

    def loss(q, k, v):
        y = attention.dot_product_attention(q, k, v, mask, cap, implementation=impl)
        return jnp.sum(y.astype(jnp.float32) * w), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(a, np.float32) for a in (y, *grads)]


def _attention_inputs(N, Q, M, K, G, H):
    """Random bf16 q (N, Q, K, H), k and v (N, M, G, H), and float32 weights w of the output for a
    loss sum(out * w) whose gradients reach every q, k and v."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (N, Q, K, H), jnp.bfloat16)
    k = jax.random.normal(keys[1], (N, M, G, H), jnp.bfloat16)
    v = jax.random.normal(keys[2], (N, M, G, H), jnp.bfloat16)
    return q, k, v, jax.random.normal(keys[3], (N, Q, K, H), jnp.float32)


def fused_attention_check(shapes=((8, 80, 8, 4, 64, False), (64, 16, 8, 4, 64, True)), cap: float = 50.0) -> dict:
    """The fused kernels (attention implementation "pallas") against the einsum reference on this
    device: bf16 inputs like the classic steps', forward and the gradients of q, k, v. Returns the
    largest absolute difference of each and the largest reference value, per shape (N, Q, K, G, H,
    causal); an error names what failed. A CPU runs Pallas' interpreter: the check of the kernel's
    code; a GPU runs Triton's compilation of it, which the CPU tests cannot see."""
    out = {}
    for N, Q, K, G, H, causal in shapes:
        label = f"N{N} Q{Q} K{K} G{G} H{H}" + (" causal" if causal else "")
        try:
            q, k, v, w = _attention_inputs(N, Q, Q, K, G, H)
            mask = attention.causal_time_mask(Q) if causal else None
            got, ref = (_attention_and_grads(impl, q, k, v, w, mask, cap) for impl in ("pallas", "einsum"))
            out[label] = {
                name: {"max_abs_diff": float(np.abs(a - b).max()), "max_abs_ref": float(np.abs(b).max())}
                for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref)
            }
        except Exception as e:  # noqa: BLE001  (a kernel that does not compile must not lose the timings)
            out[label] = {"error": _error(e)}
    return out


def _train(p, rec: Recorder, stage: str):
    cfg = load_config(p["config"], p.get("overrides", []))
    rec["attention"] = attention.IMPLEMENTATION
    shapes = p.get("attention_check_shapes")
    # "auto" also runs the fused kernels on one GPU (capped attention, nn/attention.py): check them there too
    on_gpu_auto = attention.IMPLEMENTATION == "auto" and attention.auto_may_run_fused()
    if attention.IMPLEMENTATION == "pallas" or on_gpu_auto or shapes:
        rec["fused_attention_check"] = (
            fused_attention_check(tuple(map(tuple, shapes))) if shapes else fused_attention_check()
        )
    tc = cfg.tokenizer.train if stage == "tokenizer" else cfg.dynamics.train
    trainable = TRAINABLE[stage]
    rec["precision"] = tc.precision
    rec["config"] = p["config"]
    if stage == "dynamics":  # True: the step reads cached latents, as training does (no encoder in it)
        rec["latent_cache"] = cfg.dynamics.latent_cache
    rec["mfu_flops_note"] = (
        "mfu_xla: FLOPs of the whole compiled step from XLA's cost_analysis (forward, backward and "
        "optimizer update, as compiled); mfu_model: the analytic model FLOPs of benchmarks/train_step.py "
        "(6N per token trained + attention, dynamics: + bootstrap half-step forwards, + the frozen "
        "encoder's forward only with dynamics.latent_cache=false)"
    )
    rows = []
    rec["batches"] = rows
    todo = [tuple(b) for b in p["batches"]]
    while todo:
        batch, seq_len = todo.pop(0)
        row = {"batch": batch, "seq_len": seq_len}
        rows.append(row)
        done = [r for r in rows if "part_time_s" in r]
        if done and _left(p) < done[-1]["part_time_s"]:  # a larger batch costs at least as much
            row["error"] = (
                f"skipped: {_left(p):.0f} s of the budget left, the last batch took {done[-1]['part_time_s']:.0f} s"
            )
            rec.flush()
            continue
        t_row = time.perf_counter()
        try:
            _train_batch(p, rec, row, cfg, tc, stage, trainable)
            row["part_time_s"] = time.perf_counter() - t_row
            if "profile" in row:  # one profile (and trace file) per stage: the preset batch's
                p = {**p, "profile_steps": 0}
        except Exception as e:  # noqa: BLE001  (one batch failing, e.g. out of memory, keeps the others)
            row["error"] = _error(e)
            oom = any(x in str(e) for x in ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory"))
            if oom and batch > 1 and not any("step_s" in r for r in rows):
                # larger batches would not fit either: try half of this one instead
                todo = [(batch // 2, seq_len)] if batch // 2 not in [r["batch"] for r in rows] else []
        rec.flush()
        gc.collect()
    if not any(("compile_s" if p.get("compile_only") else "step_s") in r for r in rows):
        raise RuntimeError("no batch size ran: " + "; ".join(r.get("error", "?") for r in rows))


def part_train_tokenizer(p, rec):
    _train(p, rec, "tokenizer")


def part_train_dynamics(p, rec):
    _train(p, rec, "dynamics")


def _imagine_case(p, row: dict, dyn, tok, decode_step, ts, keys, context_tau: float) -> None:
    """frames/s of generate_step (+ decode) at row's batch and K; fills `row`."""
    batch, K, decode, max_len = row["batch"], row["K"], row["decode"], p["max_len"]
    act = jnp.zeros((batch, 1), jnp.int32)
    mask = jnp.ones((batch, 1), bool)
    st = {"cache": dyn.init_cache(batch, max_len), "tcache": tok.init_cache(batch, max_len) if decode else None}

    def frame(i):
        t = i % max_len  # wraps around: the cost per frame does not depend on t
        z, st["cache"] = generate_step(dyn, st["cache"], ts[t], act, mask, keys[t], K=K, context_tau=context_tau)
        if decode:
            z, st["tcache"] = decode_step(tok, z, st["tcache"], ts[t])
        return z

    t0 = time.perf_counter()
    jax.block_until_ready(frame(0))
    first = time.perf_counter() - t0
    n, dt = _timed_steps(frame, p["seconds"], p.get("min_frames", 4), p.get("max_frames", 4000))
    row.update(
        {
            "frames_timed": n,
            "frames_per_s": batch * n / dt,
            "ms_per_step": dt / n * 1e3,
            "first_call_s": first,
            "compile_s": max(first - dt / n, 0.0),
        }
    )  # compile = first call - one frame


def _run_cases(p, rec: Recorder, rows: list, cases: list[dict], run) -> None:
    """`run(row)` for each case's row, in priority order, each appended to `rows` first. A case is
    skipped when the part's budget left would not hold one more like the slowest so far; one that
    fails records its error, and the others go on (an out-of-memory batch, a kernel that does not
    compile). Each row gets `case_s`, its wall time."""
    for row in cases:
        rows.append(row)
        need = max((r["case_s"] for r in rows if "case_s" in r), default=0.0)
        if _left(p) < need:
            row["error"] = f"skipped: {_left(p):.0f} s of the budget left, a case took up to {need:.0f} s"
            rec.flush()
            continue
        t_row = time.perf_counter()
        try:
            run(row)
            row["case_s"] = time.perf_counter() - t_row
        except Exception as e:  # noqa: BLE001
            row["error"] = _error(e)
        rec.flush()
        gc.collect()


def part_imagine(p, rec: Recorder):
    cfg = load_config(p["config"], p.get("overrides", []))
    dc = cfg.dynamics
    tok = build_tokenizer(cfg, train_step_bench.FRAME_SHAPES[cfg.env.name])
    dyn = build_dynamics(cfg, cfg, 17, seed=0, latent_grid=tok.latent_grid)  # dtype from dynamics.train.precision
    max_len = p["max_len"]
    # module_jit, not nnx.jit: nnx.jit walks the module graph in Python on every call (ms per frame)
    decode_step = module_jit(lambda tok, z, cache, t: tok.decode_step(z, cache, t))
    rec["precision"] = dc.train.precision
    rec["k_max"] = dc.k_max
    rec["cache_len"] = max_len
    rec["note"] = (
        "frames/s after compilation; a frame = one compiled generate_step (K steps in a fori_loop + one "
        "context pass, KV cache donated); 'decode' adds the tokenizer's cached per-frame decoder"
    )
    rows = []
    rec["rows"] = rows
    ts = [jax.device_put(jnp.int32(t)) for t in range(max_len)]
    keys = [jax.device_put(jax.random.fold_in(jax.random.PRNGKey(0), t)) for t in range(max_len)]
    # cases [batch, K, decode] in priority order; a case that would not fit the budget left is skipped
    cases = p.get("cases") or [
        [b, k, d] for b in p["batches"] for k in p["ks"] for d in (False, True) if not d or k in p.get("decode_ks", [4])
    ]
    _run_cases(
        p,
        rec,
        rows,
        [{"batch": batch, "K": K, "decode": bool(decode)} for batch, K, decode in cases],
        lambda row: _imagine_case(p, row, dyn, tok, decode_step, ts, keys, dc.context_tau),
    )
    by = {(r["batch"], r["K"], r["decode"]): r.get("frames_per_s") for r in rows}
    ratios = {}
    k_max = max(k for _, k, _ in cases)
    for batch in sorted({b for b, _, _ in cases}):
        a, b = by.get((batch, 4, False)), by.get((batch, k_max, False))
        ratios[f"batch {batch}: K=4 / K={k_max}"] = (a / b) if (a and b) else None
    rec["speedup_k4_over_kmax"] = ratios
    if not any("frames_per_s" in r for r in rows):
        raise RuntimeError("no imagination case ran: " + "; ".join(r.get("error", "?") for r in rows))


def _device_only_steps_per_s(stepper, cfg, seconds: float, info: dict) -> float:
    """The collector's own jitted chunk (the function `collect` then reuses), rows left on the
    device: collection minus all host work. `info` gets compile_s (init + two warm-up chunks)."""
    N, T = cfg.collect.num_envs, cfg.collect.chunk_steps
    t0 = time.perf_counter()
    carry = stepper.init_fn(jax.random.PRNGKey(cfg.seed))
    # two warm-up chunks: init's carry and chunk's have the same types (data.env.strong_types), so
    # the second is a guard against a second compilation landing in the timing
    for _ in range(2):
        carry, rows = stepper.chunk_fn(carry)
        jax.block_until_ready(rows)
    info["compile_s"] = time.perf_counter() - t0
    # A resumed writer replays chunks and requires the same bits (data/resume_state.py): does this
    # device give them? (If not, each resume drops the running episodes instead.)
    (c1, r1), (c2, r2) = stepper.chunk_fn(carry), stepper.chunk_fn(carry)
    same = [jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves((c1, r1)), jax.tree.leaves((c2, r2)), strict=True)]
    info["chunk_replays_exactly"] = bool(jnp.all(jnp.stack(same)))
    carry = c1
    steps, t0 = 0, time.perf_counter()
    while steps == 0 or time.perf_counter() - t0 < seconds:
        carry, rows = stepper.chunk_fn(carry)
        jax.block_until_ready(rows)
        steps += N * T
    return steps / (time.perf_counter() - t0)


def part_collect(p, rec: Recorder):
    from dreamer4.data.collect import build_stepper

    _wait_for_textures(p, rec)
    collect, data_bench = _collection()
    host = _bench_module("collect_host")  # its timers of collect's host components
    rows = []
    rec["rows"] = rows
    rec["note"] = (
        "device-only: the collector's own jitted chunk (lax.scan over Craftax, no auto-reset, the "
        "preset's behaviour policy), rows left on the device; collect: `dreamer4 collect`'s own "
        "function (device scan + copy to host + episode assembly + TensorStore writes + manifest "
        "commits) reusing that compiled chunk, steady state after its first chunk, stopped after "
        "collect_seconds (finished episodes committed); craftax loop (optional): Craftax's own "
        "auto-reset env in a jitted scan, frames to uint8, compiled separately"
    )
    work = Path(p["work"])
    # [num_envs, collect.commits_in_flight, collect.host_copy] per row; rows of one env count share
    # its compiled chunk (neither setting is part of it), so another setting costs only its collection
    steppers: dict[int, tuple] = {}
    for n_envs, in_flight, host_copy in p["cases"]:
        row = {"num_envs": n_envs, "commits_in_flight": in_flight, "host_copy": host_copy}
        rows.append(row)
        done = [r for r in rows if "collect_wall_s" in r]
        if done:  # another size costs about what the last compiled one did (mostly Craftax compilation)
            compiled = [r["part_time_s"] for r in done if r.get("compile_s") is not None]
            need = compiled[-1] if compiled else done[-1]["part_time_s"]
            walls = [r["collect_wall_s"] for r in done if r["num_envs"] == n_envs]
            if n_envs in steppers and walls:  # the same size again: its collection alone
                need = max(walls) + 5.0
            if _left(p) < need:
                row["skipped"] = f"{_left(p):.0f} s of the part's budget left, the row needs about {need:.0f} s"
                rec.flush()
                continue
        t_row = time.perf_counter()
        try:
            ov = list(p.get("overrides", [])) + [
                f"collect.num_envs={n_envs}",
                # an episode target collection never reaches: it stops after collect_seconds
                f"collect.num_episodes={10**7}",
                f"collect.commits_in_flight={in_flight}",
                f"collect.host_copy={host_copy}",
            ]
            if p.get("chunk_steps"):
                ov.append(f"collect.chunk_steps={p['chunk_steps']}")
            cfg = load_config(p["config"], ov)
            row["chunk_steps"] = cfg.collect.chunk_steps
            if n_envs not in steppers:
                stepper = build_stepper(cfg, 0)
                info: dict = {}
                rate = _device_only_steps_per_s(stepper, cfg, p.get("device_seconds", 3.0), info)
                steppers[n_envs] = (stepper, rate)
                row["compile_s"] = info["compile_s"]  # rows after it reuse the compiled chunk: none
                row["chunk_replays_exactly"] = info["chunk_replays_exactly"]
            stepper, row["device_only_steps_per_s"] = steppers[n_envs]
            rec.flush()
            out = work / f"collect_ds_{n_envs}_{in_flight}"
            shutil.rmtree(out, ignore_errors=True)
            # where the host's time goes (what benchmarks/collect_host.py measures without a GPU):
            # the process's CPU seconds, all threads, and the wall time inside each host component
            timers = host.wrap_collect_components(host.Timers())
            clock = host.ChunkClock()  # the run's second half: what an hours-long collection pays
            t0, u0 = time.perf_counter(), host.usage()
            try:
                summary = collect(
                    cfg,
                    out,
                    log=lambda *a: None,
                    stop_after_s=p.get("collect_seconds", 8.0),
                    stepper=clock.wrap(stepper),
                )
            finally:
                timers.restore()
            wall, u1 = time.perf_counter() - t0, host.usage()
            user, system, faults = (b - a for a, b in zip(u0, u1, strict=True))
            cpu = user + system
            steady = summary.get("steady_steps_per_s") or 0.0
            n_chunks = max(summary.get("new_steps") or 0, 1) / (n_envs * cfg.collect.chunk_steps)
            row.update(
                {
                    "host_cpus": os.cpu_count(),
                    "host_cpu_s_per_chunk": cpu / n_chunks,
                    "host_cores_busy": cpu / wall,
                    # the kernel's share: page faults (first touches of fresh memory) and copies
                    "host_system_cpu_share": system / max(cpu, 1e-9),
                    "host_minor_faults_per_chunk": faults / n_chunks,
                    "host_ms_per_chunk": {
                        **{k: 1e3 * v / n_chunks for k, v in timers.s.items()},
                        # collect's own account: which thread waits for which (data/collect.py)
                        **{f"collect.{k}": 1e3 * v / n_chunks for k, v in (summary.get("host_s") or {}).items()},
                    },
                    "collect_steady_steps_per_s": steady,
                    "collect_wall_s": wall,
                    "collect_steps": summary.get("new_steps"),
                    "episodes": summary.get("episodes"),
                    "shards": summary.get("shards"),
                    "collect_first_chunk_s": summary.get("first_chunk_s"),
                    "ratio_collect_over_device_only": steady / row["device_only_steps_per_s"],
                    "second_half": clock.late(n_envs * cfg.collect.chunk_steps),
                }
            )
            if row["second_half"]:
                row["ratio_second_half_over_device_only"] = (
                    row["second_half"]["steps_per_s"] / row["device_only_steps_per_s"]
                )
            if p.get("craftax_loop_seconds"):  # Craftax's own auto-reset loop: a separate compilation
                info = {}
                row["craftax_loop_steps_per_s"] = data_bench.bare_loop_steps_per_s(
                    cfg, p["craftax_loop_seconds"], info=info
                )
                row["craftax_loop_compile_s"] = info.get("compile_s")
        except Exception as e:  # noqa: BLE001
            row["error"] = _error(e)
        row["part_time_s"] = time.perf_counter() - t_row
        rec.flush()
        gc.collect()
    if not any("collect_steady_steps_per_s" in r for r in rows):
        raise RuntimeError("no collection case ran: " + "; ".join(r.get("error", r.get("skipped", "?")) for r in rows))


def _find_dataset(work: Path):
    """The largest dataset the collect part committed episodes to, or None."""
    best = None
    for m in work.glob("collect_ds_*/manifest.json"):
        try:
            frames = sum(e["length"] for s in json.loads(m.read_text()).get("shards", []) for e in s["episodes"])
        except (OSError, ValueError, KeyError):
            continue
        if frames and (best is None or frames > best[0]):
            best = (frames, m.parent)
    return best[1] if best else None


def synthetic_dataset(cfg, root: Path, videos: int, frames: int, seed: int = 0) -> Path:
    """A dataset of `videos` imported GIFs of Craftax-sized frames (9x9 grids of 7x7 tiles in 16
    colours, a few tiles changing per frame: about as compressible as game frames), written with
    `dataset import-video`'s function: no Craftax compilation, so the loader can be measured even
    when collection did not run. Imported episodes carry no actions; the loader reads them alike."""
    import imageio.v3 as iio

    from dreamer4.data.video import import_videos

    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    src = root.parent / f"{root.name}_gifs"
    src.mkdir(parents=True, exist_ok=True)
    files = []
    for v in range(videos):
        grid = rng.integers(0, 16, (9, 9))
        clip = []
        for _ in range(frames):
            grid[rng.integers(0, 9, 3), rng.integers(0, 9, 3)] = rng.integers(0, 16, 3)
            clip.append(np.repeat(np.repeat(palette[grid], 7, 0), 7, 1))
        f = src / f"v{v:03d}.gif"
        iio.imwrite(f, np.stack(clip), duration=100, loop=0)
        files.append(str(f))
    import_videos(cfg, root, files, log=lambda *a: None)
    return root


def synthetic_latent_cache(cfg, root: Path, path: Path, seq_len: int, seed: int = 0) -> Path:
    """A latent cache of the dataset's training windows of `seq_len` steps, filled with random
    float32 latents of the preset's shape (T x num_latents x latent_dim per window): what the
    dynamics' loader reads when `dynamics.latent_cache` is on, without a trained tokenizer (the
    loader checks only that the cache matches its windows)."""
    from dreamer4.data.latents import LatentCache
    from dreamer4.data.loader import window_source

    source = window_source(root, cfg, "train", seq_len, seq_len_key="dynamics.train.seq_len")
    tc = cfg.tokenizer
    shape, block = (len(source.base_windows), seq_len, tc.num_latents, tc.latent_dim), 64
    cache = LatentCache(path)
    cache.create({**source.identity(), "tokenizer": "synthetic"}, shape, np.float32, block)
    rng = np.random.default_rng(seed)
    for b in range(cache.num_blocks):
        lo, hi = cache.block_range(b)
        cache.write_block(b, rng.standard_normal((hi - lo, *shape[1:]), dtype=np.float32))
    return path


def part_loader(p, rec: Recorder):
    """Frames per second of the grain loader, per case [reads, worker_count]: "frames" at the
    loader's batch (what the tokenizer reads, and the dynamics with dynamics.latent_cache=false),
    "latents" at the dynamics' train batch from a latent cache of the same windows (what the
    dynamics reads by default). Each row's ratio is over the train step that reads that way."""
    _wait_for_textures(p, rec)
    cfg = load_config(p["config"], p.get("overrides", []))
    work = Path(p["work"])
    root = None if p.get("synthetic") else _find_dataset(work)
    if root is None:
        root = work / "synthetic_ds"
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        synthetic_dataset(cfg, root, *p.get("synthetic_size", (32, 256)))
        rec["dataset_note"] = f"synthetic: imported GIFs ({time.perf_counter() - t0:.1f} s to make), " + (
            "as asked" if p.get("synthetic") else "the collect part committed no episodes"
        )
    rec["dataset"] = str(root.name)
    shapes = {
        "frames": tuple(p.get("batch") or (cfg.loader.batch_size, cfg.loader.seq_len)),
        "latents": tuple(p.get("latent_batch") or (cfg.dynamics.train.batch_size, cfg.dynamics.train.seq_len)),
    }
    rec["batch"], rec["latent_batch"] = list(shapes["frames"]), list(shapes["latents"])
    consumed = p.get("consumed_frames_per_s") or {}
    rec["train_consumes_frames_per_s"] = consumed
    # which train step reads what: the tokenizer frames; the dynamics latents unless its part ran
    # with dynamics.latent_cache=false
    readers = {"frames": {"train_tokenizer"}, "latents": set()}
    readers["latents" if p.get("dynamics_latent_cache", cfg.dynamics.latent_cache) else "frames"].add("train_dynamics")
    rows = []
    rec["rows"] = rows
    latents_path = None
    for reads, workers in p["cases"]:
        row = {"reads": reads, "worker_count": workers}
        rows.append(row)
        try:
            B, T = shapes[reads]
            kw = {}
            if reads == "latents":
                if latents_path is None:
                    t0 = time.perf_counter()
                    latents_path = synthetic_latent_cache(cfg, root, work / "synthetic_latents", T)
                    rec["latent_cache_note"] = f"random latents, {time.perf_counter() - t0:.1f} s to write"
                kw["latents"] = latents_path
            # the row's worker count, whichever key its reads take it from (frames / latents)
            c = replace(cfg, loader=replace(cfg.loader, worker_count=workers, latent_worker_count=workers))
            if workers == 0:
                row["read_threads"] = c.loader.read_threads
            t0 = time.perf_counter()
            it = iter(make_loader(root, c, batch_size=B, seq_len=T, **kw))
            next(it)
            row["startup_s"] = time.perf_counter() - t0
            n, nbytes, t0 = 0, 0, time.perf_counter()
            while n < p.get("min_batches", 3) or (time.perf_counter() - t0 < p["seconds"] and n < 10_000):
                b = next(it)
                nbytes += sum(v.nbytes for v in b.values())
                n += 1
            dt = time.perf_counter() - t0
            row.update({"batch": [B, T], "batches": n, "frames_per_s": n * B * T / dt, "MB_per_s": nbytes / dt / 1e6})
            fed = {k: v for k, v in consumed.items() if k in readers[reads]}
            if fed:
                row["ratio_over_train_step"] = row["frames_per_s"] / max(fed.values())
                row["ratio_over"] = max(fed, key=fed.get)
            del it
        except Exception as e:  # noqa: BLE001
            row["error"] = _error(e)
        rec.flush()
    if not any("frames_per_s" in r for r in rows):
        raise RuntimeError("no loader case ran: " + "; ".join(r.get("error", "?") for r in rows))


def _seconds_per_call(fn, args, seconds: float) -> tuple[float, float]:
    """(compile s, including the first call; s per call after it, `_timed_steps`) of a jitted fn."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    n, dt = _timed_steps(lambda _: fn(*args), seconds, 3, 10_000)
    return compile_s, dt / n


def _attention_case(p, row: dict, N, Q, M, K, G, H, cap: float, impl: str) -> None:
    from dreamer4.nn import fused_attention as fused

    q, k, v, w = _attention_inputs(N, Q, M, K, G, H)
    mask = np.tril(np.ones((Q, M), bool), M - Q)  # causal; the last Q of M positions when Q < M
    if impl == "einsum":
        attend = lambda q, k, v: attention.einsum_attention(q, k, v, mask, cap)  # noqa: E731
    else:
        attend = lambda q, k, v: fused.fused_attention(q, k, v, mask, cap, tiling=impl)  # noqa: E731
    fwd = jax.jit(attend)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * w), argnums=(0, 1, 2)))
    row["fwd_compile_s"], fwd_s = _seconds_per_call(fwd, (q, k, v), p["seconds"])
    row["fwd_ms"] = fwd_s * 1e3
    row["fwd_bwd_compile_s"], both_s = _seconds_per_call(grads, (q, k, v), p["seconds"])
    row["fwd_bwd_ms"] = both_s * 1e3


def part_attention(p, rec: Recorder):
    """The attention kernels alone at the classic steps' shapes, paired on one device: the fused
    kernels with the sequences cut into power-of-two tiles ("binary", the default since session
    38) and padded to one ("single", their first form), and the einsum reference. Where both
    tilings give the same tiles (lengths 14, 16, 64), "single" is not run."""
    from dreamer4.nn import fused_attention as fused

    cap = float(p.get("cap", 50.0))
    rec["note"] = (
        f"ms per call after compilation (bf16, soft-cap {cap:g}, causal mask), forward and forward + backward "
        "(the gradients of q, k, v); N sequences of Q queries and M keys, K query and G key/value heads of "
        "width H"
    )
    rows = []
    rec["rows"] = rows
    cases = []
    for label, N, Q, M, K, G, H in p["shapes"]:
        same = all(fused._tiles(n, "binary") == fused._tiles(n, "single") for n in (Q, M))
        for impl in [i for i in p.get("impls", ["binary", "single", "einsum"]) if not (i == "single" and same)]:
            cases.append({"shape": label, "NQMKGH": [N, Q, M, K, G, H], "impl": impl})
    _run_cases(p, rec, rows, cases, lambda row: _attention_case(p, row, *row["NQMKGH"], cap, row["impl"]))
    if not any("fwd_bwd_ms" in r for r in rows):
        raise RuntimeError("no attention case ran: " + "; ".join(r.get("error", "?") for r in rows))


PARTS = {
    "env": part_env,
    "train_tokenizer": part_train_tokenizer,
    "train_dynamics": part_train_dynamics,
    "imagine": part_imagine,
    "collect": part_collect,
    "loader": part_loader,
    "attention": part_attention,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=sorted(PARTS))
    ap.add_argument("--params", required=True, help="JSON object")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rec = Recorder(Path(args.out))
    p = json.loads(args.params)
    if p.get("cache_dir"):
        enable_compilation_cache(p["cache_dir"])
    t0 = time.perf_counter()
    try:
        forced = [x.strip() for x in os.environ.get("DREAMER4_SUITE_FAIL", "").split(",") if x.strip()]
        if args.part in forced:
            raise RuntimeError(f"forced failure of part {args.part!r} (DREAMER4_SUITE_FAIL)")
        PARTS[args.part](p, rec)
    except BaseException as e:  # noqa: BLE001
        rec.res["error"] = f"{type(e).__name__}: {e}"[:1000]
        rec.res["traceback"] = traceback.format_exc()[-4000:]
        rec.res["part_s"] = time.perf_counter() - t0
        rec.flush()
        print(f"part {args.part} failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    rec.res["part_s"] = time.perf_counter() - t0
    rec.flush()


if __name__ == "__main__":
    main()

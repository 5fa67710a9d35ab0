"""How fast `dreamer4 collect`'s host side can go: the collector with an instant device (issue 17).

    python benchmarks/collect_host.py [--config configs/classic.yaml] [--envs 1024] [--frames-from DATASET]

On an H100 the collector's jitted chunk steps 1,024 classic envs at ~173k env steps/s, but
`dreamer4 collect` around it ran at 6.7k (BENCHMARKS.md, GPU suite, second lease): the host work
per chunk (copy to host, cutting rows into episodes, shard writes with zstd and digests, the
resume state) set the pace. That host work does not need a GPU to be measured: this script runs
the real `collect()` with a stand-in stepper whose chunk function returns prepared rows that
already sit on the (CPU) device, so the steady rate it reports is the host side's ceiling on this
machine. The rows are shaped like the real ones (episodes of geometric length, mean --mean-len;
a mixture's policy_id), their frames drawn from a real dataset's frames (--frames-from) so that
zstd sees Craftax's compressibility, else from synthetic block-textured frames.

Prints a table (steady host-bound steps/s; per chunk: CPU seconds, the kernel's share of them, minor
page faults, ms in each host component) and writes JSON (--json). Each component is timed by
wrapping the function collect calls (no change to it). The rate, CPU seconds and page faults are
also given over the run's second half (`ChunkClock`): the whole run's include its start, when the
memory the collection settles into is first touched (on a 2-vCPU VM a 30-s run's whole rate was a
fifth below its second half's; BENCHMARKS.md, "Session 44"). Use --seconds 90 or more.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dreamer4.config import load_config  # noqa: E402
from dreamer4.data import collect as collect_mod  # noqa: E402
from dreamer4.data import store  # noqa: E402

# H100 80GB HBM3, commit 7ba1863, 2026-11-27: the collector's chunk alone, classic, 1,024 envs
H100_DEVICE_ONLY_STEPS_PER_S = 173_375


def frame_pool(shape, source: str | None, n: int, rng) -> np.ndarray:
    """n frames (n, H, W, C uint8): a dataset's own frames, or blocky synthetic ones (7x7-pixel
    tiles of a 16-colour palette, as Craftax draws its 9x9 grid of blocks)."""
    H, W, C = shape
    if source:
        ds = store.Dataset.open(source)
        out, want = [], n
        for ep in ds.episodes:
            rows = ds.read(ep, 0, min(ep.length, want), ("frame",))["frame"]
            if rows.shape[1:] != (H, W, C):
                raise SystemExit(f"{source}: frames are {rows.shape[1:]}, this config makes {(H, W, C)}")
            out.append(rows)
            want -= len(rows)
            if want <= 0:
                break
        return np.concatenate(out)[:n]
    palette = rng.integers(0, 256, (16, C), dtype=np.uint8)
    tiles = palette[rng.integers(0, 16, (n, -(-H // 7), -(-W // 7)))]
    return np.repeat(np.repeat(tiles, 7, axis=1), 7, axis=2)[:, :H, :W]


def make_rows(N: int, T: int, chunks: int, spec, mean_len: float, frames: np.ndarray, with_policy: bool, rng):
    """(first, cycle): `chunks` chunks of rows (T, N, ...) that repeat as a cycle, and `first`, the
    cycle's first chunk as the collection's very first chunk, where every env starts an episode.

    Each env's episodes tile its cycle of T * chunks rows circularly, from a random phase: an
    episode may run over the cycle's end into its start, so the cycle repeats consistently while
    episodes end at unrelated steps in different envs, as in a real collection. (Before session 36
    every episode ended at the cycle's last step: every `chunks`-th commit then had no running
    episode to save, which understated the resume state's cost.) Episode lengths are geometric
    with mean `mean_len`, one per env and cycle cut at the phase."""
    L = T * chunks
    is_first = np.zeros((L, N), bool)
    is_last = np.zeros((L, N), bool)
    for n in range(N):
        phase = int(rng.integers(0, L))
        t = phase
        while t < phase + L:
            is_first[t % L, n] = True
            is_last[(t - 1) % L, n] = True
            t += int(rng.geometric(1.0 / mean_len))
    A = len(spec.achievement_names)
    rows = {
        "frame": frames[rng.integers(0, len(frames), (L, N))],
        "action": np.where(is_first, -1, rng.integers(0, spec.num_actions, (L, N))).astype(np.int32),
        "reward": (rng.random((L, N)) < 0.01).astype(np.float32) * ~is_first,
        "is_first": is_first,
        "is_last": is_last,
        "is_terminal": is_last & (rng.random((L, N)) < 0.5),
        "achievements": (rng.random((L, N, A)) < 0.001) & ~is_first[..., None],
    }
    if with_policy:
        rows["policy_id"] = np.broadcast_to((np.arange(N) % 2).astype(np.int32), (L, N)).copy()
    cycle = [jax.device_put({k: v[c * T : (c + 1) * T] for k, v in rows.items()}) for c in range(chunks)]
    # the first chunk ever: reset rows at step 0 (the frames, the large part, are shared)
    starts = {k: rows[k][:T].copy() for k in ("is_first", "action", "reward", "achievements")}
    for k, reset in (("is_first", True), ("action", -1), ("reward", 0.0), ("achievements", False)):
        starts[k][0] = reset
    first = {**cycle[0], **jax.device_put(starts)}
    return first, cycle


def usage() -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of this process so far, all threads. The kernel's
    share tells page faults (first touches of freshly mapped memory) from the host's own work."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


class Timers:
    """Wraps module functions so each call's wall time adds up under a name."""

    def __init__(self):
        self.s = defaultdict(float)
        self.n = defaultdict(int)
        self._undo = []

    def wrap(self, owner, attr: str, name: str):
        fn = getattr(owner, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.s[name] += time.perf_counter() - t0
                self.n[name] += 1

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, fn))

    def restore(self):
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)


class ChunkClock:
    """The time and this process's CPU usage at each call of a stepper's chunk function.

    The collecting thread calls it once per chunk, so consecutive calls are one turn of the
    collection loop apart. The figures over a run's whole length include its start: the first
    touches of the memory the collection settles into (the commit threads' row buffers, the rows of
    running episodes, growing to their steady size), which cost the most on this project's
    2-vCPU VMs. `late` gives the figures over the run's second half instead: what a collection that
    runs for hours pays per chunk."""

    def __init__(self):
        self.marks: list[tuple[float, float, float, int]] = []  # (wall, user s, system s, faults)

    def wrap(self, stepper):
        fn = stepper.chunk_fn

        def chunk_fn(carry):
            self.marks.append((time.perf_counter(), *usage()))
            return fn(carry)

        return replace(stepper, chunk_fn=chunk_fn)

    def late(self, steps_per_chunk: int, share: float = 0.5) -> dict | None:
        """Rate, CPU s, kernel's share and page faults per chunk from the first call in the last
        `share` of the time between the second call (the first was before the loop) and the last,
        to the last; None when fewer than 2 chunks fall in that window."""
        m = self.marks[1:]
        if len(m) < 3:
            return None
        t_from = m[-1][0] - share * (m[-1][0] - m[0][0])
        i = next(i for i, x in enumerate(m) if x[0] >= t_from)
        chunks = len(m) - 1 - i
        if chunks < 2:
            return None
        (t0, u0, s0, f0), (t1, u1, s1, f1) = m[i], m[-1]
        cpu = (u1 - u0) + (s1 - s0)
        return {
            "chunks": chunks,
            "seconds": t1 - t0,
            "steps_per_s": chunks * steps_per_chunk / (t1 - t0),
            "cpu_s_per_chunk": cpu / chunks,
            "cores_busy": cpu / (t1 - t0),
            "system_cpu_share": (s1 - s0) / max(cpu, 1e-9),
            "minor_faults_per_chunk": (f1 - f0) / chunks,
        }


def wrap_collect_components(timers: Timers) -> Timers:
    """Time the host components `collect` calls (also used by the GPU suite's collect part)."""
    timers.wrap(collect_mod.jax, "device_get", "device_get (copy to host)")
    timers.wrap(collect_mod.EpisodeAssembler, "add", "assembler.add (rows -> episodes)")
    timers.wrap(collect_mod.store, "write_shard", "store.write_shard (zstd + files + digests)")
    timers.wrap(collect_mod.resume_state, "encode", "resume_state.encode (resume state)")
    timers.wrap(collect_mod.resume_state, "save", "resume_state.save (write state file)")
    timers.wrap(collect_mod, "concat_rows", "concat_rows (join a shard's pieces)")
    return timers


def run(cfg, seconds: float, mean_len: float, frames_from: str | None, chunks: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    stepper = collect_mod.build_stepper(cfg, 0)  # env, spec, policy mixture; its chunk is never called
    c = cfg.collect
    N, T = c.num_envs, c.chunk_steps
    frames = frame_pool(stepper.spec.frame_shape, frames_from, 4096, rng)
    first, cycle = make_rows(N, T, chunks, stepper.spec, mean_len, frames, stepper.policy_ids is not None, rng)
    jax.block_until_ready((first, cycle))

    # the real carry's arrays (env states, frames; 34 MB at 1,024 classic envs), which the resume
    # state compresses: the real init, run once
    real_carry = jax.block_until_ready(stepper.init_fn(jax.random.PRNGKey(seed)))

    def init_fn(key):
        return {"i": jnp.zeros((), jnp.int32), "key": key, "real": real_carry}

    def chunk_fn(carry):  # instant: the rows are already on the device
        i = int(carry["i"])
        return {**carry, "i": carry["i"] + 1}, first if i == 0 else cycle[i % chunks]

    clock = ChunkClock()
    fake = clock.wrap(replace(stepper, init_fn=init_fn, chunk_fn=chunk_fn))
    timers = wrap_collect_components(Timers())
    out = Path(tempfile.mkdtemp(prefix="d4collect-host-"))
    try:
        t0, u0 = time.perf_counter(), usage()
        summary = collect_mod.collect(cfg, out, log=lambda *a: None, stop_after_s=seconds, stepper=fake)
        wall, u1 = time.perf_counter() - t0, usage()
        user, system, faults = (b - a for a, b in zip(u0, u1, strict=True))
        cpu = user + system
        disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    finally:
        timers.restore()
        shutil.rmtree(out, ignore_errors=True)
    n_chunks = summary["new_steps"] / (N * T)
    return {
        "num_envs": N,
        "chunk_steps": T,
        "shard_frames": c.shard_frames,
        "zstd_level": c.zstd_level,
        "mean_episode_len": mean_len,
        "frames": frames_from or "synthetic blocks",
        "chunks": n_chunks,
        "episodes": summary["episodes"],
        "shards": summary["shards"],
        "wall_s": wall,
        # all chunks, the first included: what the host's cores spend per env step, all threads
        "cpu_s_per_chunk": cpu / n_chunks,
        "steps_per_cpu_s": n_chunks * N * T / cpu,
        "system_cpu_share": system / cpu,
        "minor_faults_per_chunk": faults / n_chunks,
        # the whole process's peak (the prepared rows included): compare runs of equal size
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "steady_steps_per_s": summary["steady_steps_per_s"],
        "share_of_h100_device_only": summary["steady_steps_per_s"] / H100_DEVICE_ONLY_STEPS_PER_S,
        "ms_per_chunk": {
            **{k: 1e3 * v / n_chunks for k, v in timers.s.items()},
            **{f"collect.{k}": 1e3 * v / n_chunks for k, v in summary.get("host_s", {}).items()},
        },
        "calls": dict(timers.n),
        "bytes_on_disk": disk,
        "second_half": clock.late(N * T),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/classic.yaml")
    ap.add_argument("--envs", type=int, default=1024)
    ap.add_argument("--shard-frames", type=int, default=32768, help="the GPU suite's value")
    ap.add_argument("--seconds", type=float, default=20.0, help="steady-state seconds after the first chunk")
    ap.add_argument("--mean-len", type=float, default=188.0, help="mean episode length (H100 lease: 262,144 / 1,393)")
    ap.add_argument("--frames-from", default=None, help="a dataset whose frames fill the rows (default: synthetic)")
    ap.add_argument("--chunks", type=int, default=4, help="distinct chunks of rows prepared (then cycled)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    ov = [f"collect.num_envs={a.envs}", "collect.num_episodes=10000000", f"collect.shard_frames={a.shard_frames}"]
    cfg = load_config(a.config, ov + a.set)
    r = run(cfg, a.seconds, a.mean_len, a.frames_from, a.chunks, a.seed)
    r.update({"host": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "command": sys.argv})
    print(
        f"collect host side, {r['num_envs']} envs x {r['chunk_steps']} steps per chunk, shards of "
        f"{r['shard_frames']} frames, zstd {r['zstd_level']}, {r['cpus']} CPUs, frames: {r['frames']}"
    )
    print("\n| measure | value |\n|---|---|")
    print(f"| steady env steps/s (host-bound) | {r['steady_steps_per_s']:,.0f} |")
    print(
        f"| x the H100's device-only rate ({H100_DEVICE_ONLY_STEPS_PER_S:,}) | {r['share_of_h100_device_only']:.2f} |"
    )
    print(f"| chunks / episodes / shards | {r['chunks']:.0f} / {r['episodes']} / {r['shards']} |")
    print(f"| CPU s per chunk (all threads) | {r['cpu_s_per_chunk']:.1f} |")
    print(f"| env steps per CPU second | {r['steps_per_cpu_s']:,.0f} |")
    print(f"| kernel's share of the CPU time | {r['system_cpu_share']:.0%} |")
    print(f"| minor page faults per chunk | {r['minor_faults_per_chunk']:,.0f} |")
    print(f"| peak resident memory of the process, GiB | {r['peak_rss_gib']:.1f} |")
    late = r["second_half"]
    if late:
        print(
            f"| second half of the run ({late['chunks']} chunks, {late['seconds']:.0f} s): env steps/s | {late['steps_per_s']:,.0f} |"
        )
        print(
            f"| second half: CPU s per chunk / cores busy | {late['cpu_s_per_chunk']:.1f} / {late['cores_busy']:.1f} |"
        )
        print(
            f"| second half: kernel's share / page faults per chunk | {late['system_cpu_share']:.0%} / {late['minor_faults_per_chunk']:,.0f} |"
        )
    for k, v in sorted(r["ms_per_chunk"].items(), key=lambda kv: -kv[1]):
        print(f"| {k}, ms per chunk | {v:,.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()

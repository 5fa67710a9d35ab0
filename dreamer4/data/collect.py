"""`dreamer4 collect`: step many Craftax envs in one jitted lax.scan and write committed shards.

Step convention (DESIGN.md), one stored row per step t of an episode:
    frame_t        the frame shown at step t (uint8)
    action_t       the action that led INTO frame_t; -1 where is_first_t (no action led there)
    reward_t       reward received on arriving at frame_t; 0 where is_first_t
    is_first_t     frame_t is the episode's reset frame
    is_last_t      frame_t is the episode's final frame (death or time limit)
    is_terminal_t  the episode ended by the game (death), not by the time limit
    achievements_t achievements unlocked on arriving at frame_t
So the dynamics at step t sees action_t and predicts frame_t, and an agent acting at step t picks
action_{t+1}. The collector emits exactly one such row per env per scan iteration: an env whose
last row was `is_last` is reset in the next iteration and emits its first row.

Resumability: after each committed shard the writer saves its collector state (the carry: env
states, PRNG key; and the carry before the chunk in which its oldest unfinished episode began) to
`collector/wNNN/state-KKKKKK.pkl.zp` *before* the manifest lists the shard (resume_state.py). A
restarted writer deletes its uncommitted shard groups, loads the state saved with its last committed
shard, replays the chunks that made the unfinished episodes' rows, and continues: on the same kind
of machine the result is byte-identical to an uninterrupted run. Episode data never depends on
`chunk_steps` (the key is split per step, not per chunk).
After a SIGTERM, SIGUSR1 or SIGINT (runtime/preempt.py) the writer commits its finished episodes
at the end of the current chunk (a shorter shard; the episodes, their order, split and labels are
those of an uninterrupted run) and stops with exit code 75; rerun to continue. A writer holds
`collector/wNNN/lock` while it works, so two processes never write as the same writer.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dreamer4.config import Config, ConfigError, save_config, to_dict
from dreamer4.data import resume_state, store
from dreamer4.data.behavior import BehaviorPolicy, assign_envs, mixture_policy, parse_mix
from dreamer4.data.env import EnvSpec, make_env, strong_types, to_uint8
from dreamer4.data.policies import make_policy
from dreamer4.runtime.lock import stage_lock
from dreamer4.runtime.preempt import Preempted, requested
from dreamer4.runtime.progress import Progress

ROW_FIELDS = tuple(store.FIELD_DTYPES)


# ---------------------------------------------------------------------------------------------
# Device side: one jitted chunk of `chunk_steps` iterations over `num_envs` envs.


def make_chunk_fn(env, params, spec: EnvSpec, policy: BehaviorPolicy, num_envs: int, chunk_steps: int, policy_ids=None):
    """Return (init(key) -> carry, chunk(carry) -> (carry, rows_TN)), both jitted.

    carry: env_state, policy_state, frame (N,H,W,C uint8, the frame each env shows now),
    first (N, the frame is a reset frame), done (N, the frame is a last frame), key.
    `policy_ids` (N,), for a mixture: which member policy drives each env; rows then carry it as
    a `policy_id` field (host-side bookkeeping only, never stored in a shard).
    """
    N = num_envs
    extra = {} if policy_ids is None else {"policy_id": jnp.asarray(policy_ids, jnp.int32)}
    reset_v = jax.vmap(env.reset_env, in_axes=(0, None))
    step_v = jax.vmap(env.step_env, in_axes=(0, 0, 0, None))

    def init(key):
        k_env, key = jax.random.split(key)
        obs, env_state = reset_v(jax.random.split(k_env, N), params)
        carry = dict(
            env_state=env_state,
            policy_state=policy.init(N),
            frame=to_uint8(obs),
            first=jnp.zeros((N,), bool),
            done=jnp.ones((N,), bool),  # every env starts by resetting in the first iteration
            key=key,
        )
        return strong_types(carry)  # the types chunk returns: one compilation of chunk, not two

    def select(mask_N, a, b):
        return jax.tree.map(lambda x, y: jnp.where(mask_N.reshape((N,) + (1,) * (x.ndim - 1)), x, y), a, b)

    def one_step(carry, _):
        key, k_act, k_step, k_reset = jax.random.split(carry["key"], 4)
        actions_N, policy_state = policy.act(carry["policy_state"], k_act, carry["frame"], carry["first"])
        actions_N = actions_N.astype(jnp.int32)
        obs, next_state, reward_N, done_N, _ = step_v(
            jax.random.split(k_step, N), carry["env_state"], actions_N, params
        )
        unlocked = next_state.achievements & ~carry["env_state"].achievements
        terminal_N = done_N & (next_state.timestep < params.max_timesteps)
        stepped = dict(
            frame=to_uint8(obs),
            action=actions_N,
            reward=reward_N.astype(jnp.float32),
            is_first=jnp.zeros((N,), bool),
            is_last=done_N,
            is_terminal=terminal_N,
            achievements=unlocked,
            **extra,
        )

        # World generation is costly: run the batched reset only when some env needs it.
        need = carry["done"]
        reset_obs, reset_state = jax.lax.cond(
            jnp.any(need),
            lambda: reset_v(jax.random.split(k_reset, N), params),
            lambda: (obs, next_state),
        )
        reset_row = dict(
            frame=to_uint8(reset_obs),
            action=jnp.full((N,), -1, jnp.int32),
            reward=jnp.zeros((N,), jnp.float32),
            is_first=jnp.ones((N,), bool),
            is_last=jnp.zeros((N,), bool),
            is_terminal=jnp.zeros((N,), bool),
            achievements=jnp.zeros_like(unlocked),
            **extra,
        )
        row = select(need, reset_row, stepped)
        env_state = select(need, reset_state, next_state)
        carry = dict(
            env_state=env_state,
            policy_state=policy_state,
            frame=row["frame"],
            first=row["is_first"],
            done=row["is_last"],
            key=key,
        )
        return carry, row

    def chunk(carry):
        return jax.lax.scan(one_step, carry, None, length=chunk_steps)

    return jax.jit(init), jax.jit(chunk)


# ---------------------------------------------------------------------------------------------
# Host side: cut per-env row streams into whole episodes.


@dataclass
class EpisodeAssembler:
    """Collects rows per env and hands out finished episodes in a deterministic order."""

    num_envs: int
    partial: list[list[dict]] = field(default_factory=list)

    def __post_init__(self):
        if not self.partial:
            self.partial = [[] for _ in range(self.num_envs)]

    def add(self, rows_TN: dict[str, np.ndarray], join: bool = True) -> list:
        """Feed a chunk of rows (T, N, ...); return finished episodes ordered by (end step, env).

        An episode is a dict of arrays (join=True) or, with join=False, the list of its pieces
        (dicts of arrays, in order; `join_pieces` makes the dict): the collector joins them once,
        straight into its shard's arrays, on its commit thread."""
        T = rows_TN["is_first"].shape[0]
        finished, tails = [], []
        for n in range(self.num_envs):
            lasts = np.flatnonzero(rows_TN["is_last"][:, n])
            begin = 0
            for t in lasts:
                pieces = [*self.partial[n], {k: v[begin : t + 1, n] for k, v in rows_TN.items()}]
                self.partial[n] = []
                first, last = pieces[0]["is_first"], pieces[-1]["is_last"]
                assert first[0] and last[-1] and sum(int(p["is_first"].sum()) for p in pieces) == 1, (
                    "collector produced an episode that does not start with is_first / end with is_last"
                )
                finished.append((int(t), n, join_pieces(pieces) if join else pieces))
                begin = t + 1
            if begin < T:
                tails.append((n, begin))
        # The rows of episodes still running are copied out of the chunk (a finished episode's
        # pieces are views, written with the next shard, so the chunk's memory goes then): with
        # episodes longer than a chunk that is most of its bytes. numpy's copies release the GIL,
        # so threads copy different envs' rows at once.
        for (n, _), piece in zip(tails, _copy_tails(rows_TN, tails), strict=True):
            self.partial[n].append(piece)
        finished.sort(key=lambda x: (x[0], x[1]))
        return [ep for _, _, ep in finished]


def _copy_tails(rows_TN: dict[str, np.ndarray], tails: list[tuple[int, int]]) -> list[dict]:
    """[{field: rows_TN[field][begin:, n] as a new array} for (n, begin) in tails], in order; in
    parallel threads when there are many."""

    # Allocated here and only filled in the threads: allocated by the threads (in their own
    # malloc arenas), each chunk's pieces came in fresh pages, whose faults cost more CPU than the
    # copies (BENCHMARKS.md, "Session 35": -70k page faults and -1.1 CPU-s per 1,024-env chunk).
    pieces = [{k: np.empty((len(v) - b, *v.shape[2:]), v.dtype) for k, v in rows_TN.items()} for _, b in tails]

    def copy(batch):
        for i in batch:
            n, b = tails[i]
            for k, v in rows_TN.items():
                np.copyto(pieces[i][k], v[b:, n])

    workers = _copy_threads()
    if workers < 2 or len(tails) < 64:
        copy(range(len(tails)))
    else:
        _in_thread_batches(copy, range(len(tails)), workers, "collect-tails")
    return pieces


@contextlib.contextmanager
def _adding_time(seconds: dict[str, float], key: str, lock: threading.Lock | None = None):
    """Adds the block's wall time to seconds[key] (also when it raises); under `lock` when
    several threads add to the same key."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        with lock or contextlib.nullcontext():
            seconds[key] += time.perf_counter() - t0


def _with_host_copy(out, mode: str = "async"):
    """`out` (a chunk's (carry, rows)) with its rows' copy to the host started (`collect.host_copy`).

    "async": each row array's `copy_to_host_async` (into pageable memory; no-op where the arrays
    already are on the host). "pinned": the rows `device_put` into the device's pinned host memory,
    one batched asynchronous transfer; `jax.device_get` then reads host memory."""
    carry, rows = out
    if mode == "pinned":
        kinds = jax.tree.map(lambda x: x.sharding.with_memory_kind("pinned_host"), rows)
        return carry, jax.device_put(rows, kinds)
    for leaf in jax.tree.leaves(rows):
        if hasattr(leaf, "copy_to_host_async"):
            leaf.copy_to_host_async()
    return out


def check_host_copy(mode: str, device=None) -> None:
    """ConfigError unless `device` (default: the first local one) has the memory `mode` copies into."""
    if mode != "pinned":
        return
    device = device or jax.local_devices()[0]
    kinds = [m.kind for m in device.addressable_memories()]
    if "pinned_host" not in kinds:
        raise ConfigError(
            f"config key 'collect.host_copy': 'pinned' needs the device's pinned host memory, but "
            f"{device} has only {kinds}; use 'async'"
        )


def _copy_threads() -> int:
    """Threads for the host's large copies (numpy releases the GIL while copying)."""
    return min(os.cpu_count() or 1, 16)


def _in_thread_batches(fn, items, workers: int, name: str) -> list:
    """[fn(batch) for each batch], the batches consecutive slices of `items` (about 4 per thread),
    run in `workers` threads; results in order."""
    size = -(-len(items) // (4 * workers))
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        return list(pool.map(fn, [items[i : i + size] for i in range(0, len(items), size)]))


def concat_rows(parts: list[np.ndarray], min_bytes: int = 64 * 2**20, out: np.ndarray | None = None) -> np.ndarray:
    """np.concatenate(parts) along rows. From `min_bytes` on, the parts are copied into the result
    in parallel threads (numpy releases the GIL while copying): a 1,024-env shard's frames are
    1.6 GB, and on the commit thread one core copying them (page faults included) took 0.6-2.7 s
    per chunk, as long as a GPU takes to step 100,000+ env steps. `out`: the result's array (all
    the rows, the parts' row shape and dtype), e.g. a reused one (`RowBuffers`)."""
    workers = _copy_threads()
    shape, dtype = parts[0].shape[1:], parts[0].dtype
    if (
        workers < 2
        or len(parts) < 2
        or sum(p.nbytes for p in parts) < min_bytes
        or any(p.shape[1:] != shape or p.dtype != dtype for p in parts)
    ):
        return np.concatenate(parts, out=out)
    ends = np.cumsum([len(p) for p in parts])
    if out is None:
        out = np.empty((int(ends[-1]), *shape), dtype)
    elif out.shape != (int(ends[-1]), *shape) or out.dtype != dtype:
        raise ValueError(f"concat_rows: out is {out.dtype}{out.shape}, the parts need {dtype}{(int(ends[-1]), *shape)}")

    def copy(batch: range) -> None:
        for i in batch:
            out[ends[i] - len(parts[i]) : ends[i]] = parts[i]

    _in_thread_batches(copy, range(len(parts)), workers, "collect-join")
    return out


class RowBuffers:
    """One reused array per field that a commit joins the shard's pieces into (`concat_rows(out=)`).
    A fresh 1.6 GB array per 1,024-env shard pays its page faults at every commit: joining the
    same pieces into a fresh array took 0.13-1.7 s on a 2-core VM, into a reused one 0.07-0.10 s
    (BENCHMARKS.md, "After the third lease"). A view stays valid until the next `join` of its
    field; capacity grows to a quarter beyond the largest request."""

    def __init__(self):
        self._arrays: dict[str, np.ndarray] = {}

    def join(self, field: str, parts: list[np.ndarray]) -> np.ndarray:
        rows, shape, dtype = sum(len(p) for p in parts), parts[0].shape[1:], parts[0].dtype
        a = self._arrays.get(field)
        if a is None or len(a) < rows or a.shape[1:] != shape or a.dtype != dtype:
            a = self._arrays[field] = np.empty((rows + rows // 4, *shape), dtype)
        return concat_rows(parts, out=a[:rows])


def join_pieces(pieces: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One episode's pieces (consecutive rows, as `EpisodeAssembler.add(join=False)` gives them)
    as one dict of arrays."""
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


# ---------------------------------------------------------------------------------------------
# Split / label assignment


def stratified_pick(index: int, fraction: float, offset: float) -> bool:
    """Pick item `index` of a stream so that exactly ~fraction of every prefix is picked.

    picked(n) = floor((n+1) f + u) - floor(n f + u) >= 1, with a seeded offset u in [0, 1):
    deterministic, streamable, and exact to within one item for any prefix (so a tiny dataset of
    a few dozen episodes still gets its share of eval and labeled episodes).
    """
    return math.floor((index + 1) * fraction + offset) - math.floor(index * fraction + offset) >= 1


def _offsets(seed: int, writer: int) -> tuple[float, float]:
    rng = np.random.default_rng([seed, writer, 0x5EED])
    return float(rng.random()), float(rng.random())


# ---------------------------------------------------------------------------------------------
# The writer


def episodes_for_writer(total: int, writer: int, num_writers: int) -> int:
    return total // num_writers + (1 if writer < total % num_writers else 0)


def behavior_members(c) -> list[tuple[str, float]]:
    """[(policy spec, weight)] of the collection: the `collect.mix` members, or `collect.policy`."""
    return parse_mix(c.mix) if c.mix else [(c.policy, 1.0)]


def _config_header(cfg: Config, num_writers: int) -> dict:
    """The header facts that come from the config alone (no environment needs to be built)."""
    c = cfg.collect
    return {
        "format": store.FORMAT,
        "format_version": store.FORMAT_VERSION,
        "seed": cfg.seed,
        "num_writers": num_writers,
        "num_episodes": c.num_episodes,
        "behavior_policy": c.mix or c.policy,
        "behavior_mixture": [{"policy": s, "weight": w} for s, w in behavior_members(c)],
        "epsilon": c.epsilon,
        "has_actions": True,
        "has_rewards": True,
        "labeled_fraction": c.labeled_fraction,
        "eval_fraction": c.eval_fraction,
        "step_convention": "row t: frame_t; action_t led into frame_t (-1 at is_first); "
        "reward_t received on arriving at frame_t",
        # how fast a run commits is not a property of the data: any value may continue a dataset
        "collect_config": _data_config(c),
    }


def _data_config(c) -> dict:
    """The collect config without the keys that change how fast a run goes but not one byte of
    what it writes: a dataset may be continued, and a compiled stepper reused, with any values."""
    return {k: v for k, v in to_dict(c).items() if k not in ("commits_in_flight", "host_copy")}


def _header(cfg: Config, spec: EnvSpec, num_writers: int) -> dict:
    h = store.env_header(spec)
    h.update(_config_header(cfg, num_writers))
    return h


# Header keys that must agree between every writer of one dataset.
_MUST_MATCH = (
    "env",
    "frame_shape",
    "num_actions",
    "seed",
    "num_writers",
    "num_episodes",
    "behavior_policy",
    "labeled_fraction",
    "eval_fraction",
    "collect_config",
)


def _check_header(root: Path, existing: dict, mine: dict, keys=_MUST_MATCH) -> None:
    if existing.get("format") != store.FORMAT:
        raise store.DatasetError(f"{store.manifest_path(root)} exists but is not a dreamer4 dataset manifest")
    for key in keys:
        if existing.get(key) != mine[key]:
            raise store.DatasetError(
                f"{store.manifest_path(root)} was created with {key}={existing.get(key)!r}, but this "
                f"collect run has {key}={mine[key]!r}; use the same config and --num-writers, or a new --out"
            )


def precheck_dataset(cfg: Config, root: Path, num_writers: int) -> None:
    """Refuse before any environment is built (building full Craftax takes minutes): shards
    without a manifest (never overwritten), or a manifest made with another env or config."""
    store.refuse_orphaned_shards(root)
    m = store.read_manifest(root)
    if not m:
        return
    env = m.get("env") or {}
    if env.get("name") != cfg.env.name:
        raise store.DatasetError(
            f"{store.manifest_path(root)} holds {env.get('id', '?')} episodes (env.name={env.get('name')!r}), "
            f"but this collect run has env.name={cfg.env.name!r}; use the dataset's config or a new --out"
        )
    if m.get("created_by") == "import-video" and "collect_config" not in m:
        return
    _check_header(
        root,
        m,
        _config_header(cfg, num_writers),
        keys=tuple(k for k in _MUST_MATCH if k not in ("env", "frame_shape", "num_actions")),
    )


def resolve_writer(writer_id: int | None, num_writers: int | None) -> tuple[int, int]:
    """Default to the JAX process index/count so a multi-host job splits writers by itself."""
    if num_writers is None:
        num_writers = jax.process_count()
    if writer_id is None:
        writer_id = jax.process_index() if num_writers == jax.process_count() else 0
    if not (0 <= writer_id < num_writers):
        raise ConfigError(f"--writer-id {writer_id} must be in [0, --num-writers={num_writers})")
    return writer_id, num_writers


def collect(
    cfg: Config,
    out: str | Path,
    writer_id: int | None = None,
    num_writers: int | None = None,
    log=print,
    stop_after_shards: int | None = None,
    row_sink=None,
    stop_after_s: float | None = None,
    stepper: Stepper | None = None,
) -> dict:
    """Fill (or finish filling) dataset `out` with this writer's share of episodes.

    Returns a summary dict. `stop_after_shards` is for tests and benchmarks: stop after committing
    that many shards in this call, as if killed right after the commit. `stop_after_s` (benchmarks):
    once this many seconds have passed since the first chunk came back, commit the finished
    episodes (a shorter shard, as after a preemption signal) and stop. `row_sink(rows_TN)`, if
    given, sees every chunk of raw rows as it leaves the device (tests compare it with the store).
    `stepper`: a prebuilt `build_stepper(cfg, writer)` (its compiled chunk function is reused).
    """
    root = Path(out)
    writer, num_writers = resolve_writer(writer_id, num_writers)
    check_host_copy(cfg.collect.host_copy)
    precheck_dataset(cfg, root, num_writers)
    # Each writer owns its shards: a second process writing as the same writer id is refused.
    with stage_lock(resume_state.lock_path(root, writer), f"collect w{writer}", shared=False, log=log):
        return _collect(cfg, root, writer, num_writers, log, stop_after_shards, row_sink, stop_after_s, stepper)


@dataclass
class Stepper:
    """A writer's device side: the env, its behaviour policy and the jitted (init, chunk) functions.

    `build_stepper` makes it; `collect(..., stepper=)` takes a prebuilt one, so a caller that has
    already compiled and run its chunk function (the GPU suite's device-only timing) shares that
    compilation with the collection itself.
    """

    key: tuple  # (env name, writer, collect config): what the functions were built for
    env: object
    params: object
    spec: EnvSpec
    members: list
    policy_ids: np.ndarray | None
    init_fn: object
    chunk_fn: object


def build_stepper(cfg: Config, writer: int) -> Stepper:
    """Env, behaviour policy (a mixture's env assignment depends on the writer) and chunk functions."""
    c = cfg.collect
    env, params, spec = make_env(cfg.env.name)
    members = behavior_members(c)
    policy_ids = None
    if c.mix or c.epsilon > 0:
        policy_ids = assign_envs([w for _, w in members], c.num_envs, cfg.seed, writer)
        for i, (s, w) in enumerate(members):
            if w > 0 and i not in policy_ids:
                raise ConfigError(
                    f"config key 'collect.mix': policy {s!r} (weight {w:.3g}) gets none of the "
                    f"collect.num_envs={c.num_envs} envs; raise num_envs or its weight"
                )
        policy = mixture_policy([make_policy(s, spec, c) for s, _ in members], policy_ids, c.epsilon, spec.num_actions)
    else:
        policy = make_policy(c.policy, spec, c)
    init_fn, chunk_fn = make_chunk_fn(env, params, spec, policy, c.num_envs, c.chunk_steps, policy_ids)
    return Stepper(_stepper_key(cfg, writer), env, params, spec, members, policy_ids, init_fn, chunk_fn)


def _stepper_key(cfg: Config, writer: int) -> tuple:
    return (cfg.env.name, writer, cfg.seed, repr(_data_config(cfg.collect)))


def _collect(
    cfg: Config, root: Path, writer: int, num_writers: int, log, stop_after_shards, row_sink, stop_after_s, stepper
) -> dict:
    c = cfg.collect
    if stepper is None:
        stepper = build_stepper(cfg, writer)
    elif stepper.key != _stepper_key(cfg, writer):
        raise ValueError("collect(stepper=...) was built for another config or writer")
    spec, members = stepper.spec, stepper.members
    header = _header(cfg, spec, num_writers)

    root.mkdir(parents=True, exist_ok=True)
    store.write_group_json(root, {"dreamer4": "dataset; see manifest.json"})
    with store.locked_manifest(root) as m:
        if not m:
            m.update(header)
            m["shards"] = []
            m["writers"] = {}
            save_config(cfg, root)
        elif m.get("created_by") == "import-video" and "collect_config" not in m:
            # Labeled Craftax play added to a dataset of imported videos: adopt its header.
            for key in ("env", "frame_shape", "num_actions"):
                if m.get(key) != header[key]:
                    raise store.DatasetError(
                        f"{store.manifest_path(root)} (imported videos) has {key}={m.get(key)!r}, but this "
                        f"collect run has {key}={header[key]!r}"
                    )
            m.update({k: v for k, v in header.items() if k not in ("has_actions", "has_rewards")})
            m.setdefault("writers", {})
        else:
            _check_header(root, m, header)
        mine = [s for s in m["shards"] if s["writer"] == writer]
        wstate = m["writers"].get(str(writer), {})
        header_now = store.manifest_header(m)
    target = episodes_for_writer(c.num_episodes, writer, num_writers)
    shards_done = len(mine)
    episodes_done = sum(len(s["episodes"]) for s in mine)
    if wstate.get("complete"):
        log(f"writer {writer}: already complete ({episodes_done} episodes in {shards_done} shards)")
        return {"writer": writer, "episodes": episodes_done, "shards": shards_done, "new_steps": 0}

    # Anything of ours on disk beyond the committed shards is a half-written leftover.
    sdir = root / "shards"
    if sdir.is_dir():
        for p in sdir.glob(f"w{writer:03d}-s*"):
            if int(p.name.split("-s")[1]) >= shards_done:
                shutil.rmtree(p)

    init_fn, chunk_fn = stepper.init_fn, stepper.chunk_fn
    assembler = EpisodeAssembler(c.num_envs)
    carries, chunk_no = resume_state.CarryLog(), 0  # chunk_no: the next chunk's index in this process
    if shards_done == 0:
        carry = init_fn(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), writer))
    else:
        saved = resume_state.load(root, writer, shards_done)
        log(f"writer {writer}: resuming after {shards_done} committed shards ({episodes_done} episodes)")
        carry, assembler.partial, carries, chunk_no = resume_state.resume(saved, chunk_fn, log, f"writer {writer}: ")

    eval_u, label_u = _offsets(cfg.seed, writer)
    train_done = sum(1 for s in mine for e in s["episodes"] if e["split"] == "train")
    pending: list[dict] = []
    # wall seconds: the collecting thread getting rows / waiting for commits; the commit thread
    host_s = {"rows_to_host": 0.0, "waiting_for_commits": 0.0, "commits": 0.0}
    steps_new = 0
    bytes_new = 0
    t0 = time.time()
    bar = Progress(total=target, initial=episodes_done, desc=f"collect w{writer}", unit="ep")

    def commit(index: int, plan, episodes, labels, final: bool, before) -> None:
        """Write `episodes` as shard `index`, then (once the commit `before` has ended) the resume
        state (`plan`) and the manifest entry: the commit. Runs on a committer thread; up to
        `collect.commits_in_flight` run at once, and they finish in order."""
        with _adding_time(host_s, "commits", stats_lock):
            _commit(index, plan, episodes, labels, final, before)

    def _commit(index: int, plan, episodes, labels, final: bool, before) -> None:
        nonlocal shards_done, episodes_done, bytes_new
        name = store.shard_name(writer, index)
        # each episode is its list of pieces: one copy, straight into the shard's arrays (this
        # thread's own, reused: write_shard has finished with them when it returns)
        if not hasattr(row_buffers, "b"):
            row_buffers.b = RowBuffers()
        arrays = {k: row_buffers.b.join(k, [p[k] for ep in episodes for p in ep]) for k in ROW_FIELDS}
        eps, start = [], 0
        for ep, (n, is_eval, labeled) in zip(episodes, labels, strict=True):
            L = sum(len(p["frame"]) for p in ep)
            ret = float(arrays["reward"][start + 1 : start + L].sum())  # reward_0 is the reset row's 0
            got = arrays["achievements"][start : start + L].any(0)
            eps.append(
                {
                    "id": f"w{writer:03d}-e{n:06d}",
                    "start": start,
                    "length": L,
                    "return": ret,
                    "achievements": [spec.achievement_names[i] for i in np.flatnonzero(got)],
                    "labeled": bool(labeled),
                    "split": "eval" if is_eval else "train",
                    "policy": members[int(ep[0]["policy_id"][0])][0] if "policy_id" in ep[0] else c.policy,
                }
            )
            start += L
        entry = {
            "name": name,
            "writer": writer,
            "index": index,
            "num_frames": int(len(arrays["frame"])),
            "episodes": eps,
            "target_episodes": target,
            "final": final,
        }
        # The state's zstd and TensorStore's both release the GIL: compress the resume state meanwhile.
        with ThreadPoolExecutor(1) as pool:
            encoded = pool.submit(resume_state.encode, plan, carries)
            digests = store.write_shard(
                root,
                name,
                arrays,
                read_chunk=c.read_chunk_frames,
                zstd_level=c.zstd_level,
                entry=entry,
                header=header_now,
            )
            data = encoded.result()
        if before is not None:
            before.result()  # in order: an earlier commit that failed fails this one too (not listed)
        assert shards_done == index, (shards_done, index)
        resume_state.save(root, writer, index + 1, data)
        # the commit: one line appended to the manifest's log, not a rewrite of the manifest
        store.append_commit(
            root,
            [
                {
                    "name": name,
                    "writer": writer,
                    "index": index,
                    "num_frames": int(len(arrays["frame"])),
                    "digests": digests,
                    "episodes": eps,
                }
            ],
            {
                str(writer): {
                    "committed_shards": index + 1,
                    "episodes": episodes_done + len(eps),
                    "target_episodes": target,
                    "complete": final,
                }
            },
        )
        resume_state.prune(root, writer, keep_from=index + 1)
        shards_done += 1
        episodes_done += len(eps)
        bytes_new += sum(a.nbytes for a in arrays.values())

    # Commits run on background threads, so the device steps and the host cuts rows into episodes
    # while the last shards are compressed, hashed and written. At most `commits_in_flight` are in
    # flight (the next waits for the oldest): memory stays bounded. Each saves its state and
    # manifest entry only after the one before it, so shards commit in order. A commit snapshots
    # what it saves (the carry after chunk k and the partial rows as they were then), and its
    # shard index, episode numbers, splits and labels are fixed when it is submitted, so the
    # result is the same as committing inline.
    committer = ThreadPoolExecutor(c.commits_in_flight, thread_name_prefix=f"collect-w{writer}-commit")
    row_buffers = threading.local()  # each commit thread joins into its own RowBuffers
    stats_lock = threading.Lock()
    in_flight: collections.deque = collections.deque()
    # what the commits submitted so far will have committed (the collecting thread's count)
    planned = {"shards": shards_done, "episodes": episodes_done, "train": train_done}
    first_shard = shards_done

    def wait_commit(all_: bool = True) -> None:
        """Wait for the commits in flight (all, or only the oldest); the first failure raises."""
        while in_flight:
            f = in_flight.popleft()
            with _adding_time(host_s, "waiting_for_commits"):
                f.result()  # a failed commit's error surfaces here, in the collecting thread
            if not all_:
                return

    def submit_commit(carry_after, final: bool) -> None:
        """Commit the pending episodes with the state after chunk `chunk_no`."""
        nonlocal pending
        if len(in_flight) >= c.commits_in_flight:
            wait_commit(all_=False)
        plan = carries.plan(carry_after, chunk_no, assembler.partial)
        episodes, pending = pending, []
        labels = []
        for _ in episodes:
            n = planned["episodes"] + len(labels)
            is_eval = stratified_pick(n, c.eval_fraction, eval_u)
            labeled = True if is_eval else stratified_pick(planned["train"], c.labeled_fraction, label_u)
            planned["train"] += 0 if is_eval else 1
            labels.append((n, is_eval, labeled))
        before = in_flight[-1] if in_flight else None
        in_flight.append(committer.submit(commit, planned["shards"], plan, episodes, labels, final, before))
        planned["shards"] += 1
        planned["episodes"] += len(episodes)

    # Pipelining: the next chunk is dispatched (asynchronously) before the host cuts and writes
    # the one before it, so writing hides behind stepping. Each chunk's rows start their copy to
    # the host as soon as it is dispatched (after its computation, on the device's own queue), so
    # the copy runs while this thread cuts the chunk before; a 1,024-env chunk is 1.6 GB, and its
    # copy took ~1 s of this thread on the third lease's H200 host.
    taken = episodes_done  # episodes handed to commits (committed or in flight) or pending
    finished = False
    t_first, steps_first = None, 0
    try:
        out = _with_host_copy(chunk_fn(carry), c.host_copy)
        carry_in = carry  # the carry chunk `chunk_no` started from
        while True:
            carry_k, rows_k = out
            carries.record(chunk_no, carry_in)  # a reference: copied only if a commit saves it
            out = _with_host_copy(chunk_fn(carry_k), c.host_copy)
            with _adding_time(host_s, "rows_to_host"):
                rows = jax.device_get(rows_k)
            if t_first is None:  # steady-state rate excludes compilation and the first chunk
                t_first, steps_first = time.time(), steps_new + rows["is_first"].size
            if row_sink is not None:
                row_sink(rows)
            steps_new += rows["is_first"].size
            new_eps = assembler.add(rows, join=False)
            room = target - taken
            pending.extend(new_eps[:room])
            taken += min(len(new_eps), room)
            bar.update(min(len(new_eps), room), steps_per_s=steps_new / max(time.time() - t0, 1e-9), MB=bytes_new / 1e6)
            if taken >= target:
                submit_commit(carry_k, final=True)
                wait_commit()
                finished = True
                break
            if sum(len(p["frame"]) for ep in pending for p in ep) >= c.shard_frames:
                submit_commit(carry_k, final=False)
                if stop_after_shards is not None and planned["shards"] - first_shard >= stop_after_shards:
                    wait_commit()
                    break
            if stop_after_s is not None and time.time() - t_first >= stop_after_s:
                if pending:
                    submit_commit(carry_k, final=False)
                wait_commit()
                break
            signal_name = requested()  # writers are independent: no agreement between processes needed
            if signal_name is not None:
                if pending:  # commit the finished episodes (a shorter shard) with the state after chunk k
                    submit_commit(carry_k, final=False)
                wait_commit()
                bar.close()
                log(f"writer {writer}: {episodes_done}/{target} episodes committed in {shards_done} shards")
                raise Preempted(
                    f"collect w{writer}",
                    signal_name,
                    saved=f"{shards_done} shards of writer {writer} committed in {root}",
                )
            carry_in, chunk_no = carry_k, chunk_no + 1
    finally:
        committer.shutdown(wait=True)  # an exception here still lets the commit in flight finish
        try:  # a writer that stops leaves one manifest.json, as readers of earlier versions expect
            store.fold_manifest_log(root)
        except Exception as e:  # noqa: BLE001  (the log is read as it is; do not hide the real error)
            log(f"writer {writer}: could not fold manifest.log into manifest.json ({e}); readers apply it")
    bar.close()
    elapsed = time.time() - t0
    log(
        f"writer {writer}: {episodes_done}/{target} episodes in {shards_done} shards; "
        f"{steps_new} env steps in {elapsed:.1f}s ({steps_new / max(elapsed, 1e-9):.0f} steps/s); "
        f"rows to host ({c.host_copy}) {host_s['rows_to_host']:.1f}s, commits {host_s['commits']:.1f}s, "
        f"waiting for commits {host_s['waiting_for_commits']:.1f}s"
    )
    steady = (steps_new - steps_first) / max(time.time() - t_first, 1e-9) if t_first else 0.0
    return {
        "writer": writer,
        "episodes": episodes_done,
        "shards": shards_done,
        "new_steps": steps_new,
        "seconds": elapsed,
        "steady_steps_per_s": steady,
        # from the call to the first chunk's rows on the host: compilation (if not done) + one chunk
        "first_chunk_s": (t_first - t0) if t_first else None,
        "complete": finished,
        # where the wall time went (seconds; the two threads overlap): copying rows to the host and
        # waiting for the commit thread (collecting thread), and the commits themselves
        "host_s": dict(host_s),
    }

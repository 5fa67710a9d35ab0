"""One play session: the world model and the real Craftax game in lockstep, no HTTP.

Shape key: C context steps, W steps kept when the cache slides, L latents, N latent width,
H/W pixels.

Models. The run's world model (tokenizer + dynamics). When the run has an agent stage
(RUN_DIR/agent, else RUN_DIR/agent_bc) the session uses the agent's world model instead: the one
its policy was trained in (behaviour cloning fine-tunes the transformer), with the agent token in
every step, so the same cached passes give the imagined frame and the agent's state (reward,
value, next action). The world model's own predictions do not depend on the agent token
(policy/heads.py).

Start. `reset(start="world", seed)`: a new real Craftax world from `seed`; its reset frame and
C - 1 noop steps (C = `context`, default the run's `dynamics.eval_context`) are encoded by the
tokenizer and written into the transformer's KV cache (`prefill`), and the tokenizer decoder's
cache is filled with the same latents. `reset(start="episode", episode=i)`: the first C frames of
a held-out episode of the run's dataset (with its actions where labeled); no real game then.

Step. `step(action, K)`: one jitted call per K (compiled on first use, `warm` compiles ahead):
K shortcut steps for the next frame against the KV cache (`dynamics.sampler.generate_frame`, a
`lax.fori_loop`), one context pass, the tokenizer decoder's cached step and, with an agent, its
reward, value and sampled next action; both caches are donated, so they are updated in place.
The real game steps with the same action (its own jitted step); PSNR between the two frames. In
Craftax's play tool every key is noop while the player sleeps (or rests, full Craftax); the same
holds here for the person's keys.

Context longer than the cache. The caches hold `cache_len` steps (default the dynamics' training
sequence length: the longest history the model learned to attend over). When the next step would
not fit, the session slides: a fresh cache is prefilled with the last W = max(C, cache_len // 2)
(at most cache_len - 1) steps (the clean latents the session generated, with their actions) and
generation continues at step W. Time attention is relative (RoPE), so the shift changes nothing but the forgotten steps;
the picture goes on. A slide costs one prefill of W steps (compiled once, also by `warm`).

Recording (play/record.py): with a recorder, each session of the real game (world start with
lockstep) is one episode, committed when the game ends, on a reset, or on `close`.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamer4.config import Config, ConfigError
from dreamer4.data.env import make_env, strong_types, to_uint8
from dreamer4.data.store import Dataset, DatasetError
from dreamer4.dynamics.sampler import context_inputs, generate_frame
from dreamer4.play.keys import key_bindings
from dreamer4.play.record import Recorder
from dreamer4.runtime.images import psnr
from dreamer4.runtime.loading import load_agent, load_world_model
from dreamer4.runtime.stage import StageDir

AGENT_STAGES = ("agent", "agent_bc")  # the imagination-trained policy first, else the BC one
STARTS = ("world", "episode")
ACTORS = ("human", "agent")
VIDEO_FRAMES = 3000  # frames kept for the session download (a bound on memory)
VIDEO_FORMATS = ("gif", "mp4")
MAX_LISTED = 500  # dataset episodes offered on the page (a bound on the page's size)


@dataclass(frozen=True)
class RunInfo:
    """What a run offers to `play`, read from its stage directories without loading any weights."""

    run_dir: Path
    cfg: Config  # the dynamics stage's config (env, sampling, sequence length)
    frame_shape: tuple[int, int, int]
    num_actions: int
    data: str | None  # the dataset the dynamics was trained on
    agent_stage: str | None


def inspect_run(run_dir: str | Path) -> RunInfo:
    """The run's facts; one clear error for a missing directory or a missing/unfinished stage."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"--run {run}: no such run directory")
    for name in ("tokenizer", "dynamics"):
        st = StageDir(run, name)
        if not st.has_model():
            raise DatasetError(
                f"{st.dir} holds no trained {name}: `dreamer4 play` needs a run with a tokenizer and a "
                f"dynamics stage (run `dreamer4 {st.spec.command}` first)"
            )
    dyn = StageDir(run, "dynamics")
    facts = dyn.facts()
    agent = next((s for s in AGENT_STAGES if StageDir(run, s).has_model()), None)
    return RunInfo(
        run_dir=run,
        cfg=dyn.trained_config(),
        frame_shape=tuple(facts["frame_shape"]),
        num_actions=int(facts["num_actions"]),
        data=facts.get("data"),
        agent_stage=agent,
    )


# ----------------------------------------------------------------------------- jitted functions
def world_functions(graphdef, with_agent: bool, k_max: int, context_tau: float):
    """(encode, prefill, step), jitted over the model's state (an nnx.State argument).

    encode(state, frames_1CHWC uint8) -> clean latents z_1CLN.
    prefill(state, z_1CLN, actions_1C, mask_1C, key, max_len) -> (caches, last frame uint8, extras).
    step(state, caches, t, action, key, K) -> (caches, z_11LN, frame uint8, extras); caches donated.
    extras (with an agent): reward (of the transition into the step, from the state heads on the
    previous and the new latents: what imagination training reads) and value, and the next action
    sampled from the policy; {} without one. caches also carry the last frame's latents ("z").
    """

    def world_of(model):
        return model.world if with_agent else model

    def readout(agent, h_1D, z_prev_11LN, z_11LN, key):
        logits = agent.policy_logits(h_1D)
        return {
            "reward": agent.state_reward_cont(z_prev_11LN, z_11LN)[0][0, 0],
            "value": agent.value_now(h_1D)[0],
            "next_action": jax.random.categorical(key, logits)[0].astype(jnp.int32),
        }

    def encode(state, frames_1CHWC):
        return world_of(nnx.merge(graphdef, state)).latents(frames_1CHWC)

    def prefill(state, z_1CLN, actions_1C, mask_1C, key, max_len: int):
        model = nnx.merge(graphdef, state)
        world = world_of(model)
        k_ctx, k_act = jax.random.split(key)
        zc, tau, d = context_inputs(z_1CLN, k_ctx, context_tau, k_max)
        extras = {}
        if with_agent:
            (_, h_1CD), cache = model.prefill(zc, tau, d, actions_1C, mask_1C, jnp.zeros_like(actions_1C), max_len)
            z_prev = z_1CLN[:, -2:-1] if z_1CLN.shape[1] > 1 else z_1CLN[:, -1:]  # one frame: no change
            extras = readout(model, h_1CD[:, -1], z_prev, z_1CLN[:, -1:], k_act)
        else:
            dyn = world.dynamics
            _, cache = dyn.transformer.prefill(dyn.tokens(zc, tau, d, actions_1C, mask_1C), max_len)
        frames, dec = world.tokenizer.decode_prefill(z_1CLN, max_len)
        return {"dyn": cache, "dec": dec, "z": z_1CLN[:, -1:]}, to_uint8(frames[0, -1]), extras

    def step(state, caches, t, action, key, K: int):
        model = nnx.merge(graphdef, state)
        world = world_of(model)
        dyn = world.dynamics
        k_noise, k_ctx, k_act = jax.random.split(key, 3)
        a_11 = jnp.reshape(action, (1, 1)).astype(jnp.int32)
        mask_11 = jnp.ones((1, 1), bool)
        if with_agent:
            task_11 = jnp.zeros((1, 1), jnp.int32)
            step_fn = lambda z, tau, d, c: model.step(z, tau, d, a_11, mask_11, task_11, c, t)
            z_of = lambda out: out[0]
        else:
            step_fn = lambda z, tau, d, c: dyn.step(z, tau, d, a_11, mask_11, c, t)
            z_of = lambda out: out
        z_t, out, cache = generate_frame(
            step_fn, caches["dyn"], k_noise, k_ctx, (1, 1, dyn.L, dyn.N), K, k_max, context_tau, z_of
        )
        frame, dec = world.tokenizer.decode_step(z_t, {"dec": caches["dec"]}, t)
        extras = readout(model, out[1][:, 0], caches["z"], z_t, k_act) if with_agent else {}
        return {"dyn": cache, "dec": dec["dec"], "z": z_t}, z_t, to_uint8(frame[0, 0]), extras

    return (
        jax.jit(encode),
        jax.jit(prefill, static_argnames=("max_len",)),
        jax.jit(step, static_argnames=("K",), donate_argnames=("caches",)),
    )


def host_device():
    """The CPU backend's device, where the real game runs; None when JAX has no CPU backend."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


def env_functions(env, params, device=None):
    """(reset(key), step(state, action, key)) of the real game, jitted, frames uint8, on `device`.

    One env's step is a long chain of tiny ops: on an H100 it added 2-10 ms to a step (kernel
    launches, after the world model's kernels), on a CPU core it takes ~2 ms. On `device` (the
    CPU) it also runs beside the world model's step on the accelerator instead of after it.
    """

    def reset(key):
        obs, state = env.reset_env(key, params)
        return to_uint8(obs), strong_types(state)  # the types step returns: step compiles once

    def step(state, action, key):
        obs, nxt, reward, done, _ = env.step_env(key, state, action, params)
        out = {
            "frame": to_uint8(obs),
            "reward": reward.astype(jnp.float32),
            "done": done,
            "terminal": done & (nxt.timestep < params.max_timesteps),  # death, not the time limit
            "unlocked": nxt.achievements & ~state.achievements,
            # Craftax's play tool turns every key into noop while the player sleeps / rests
            "asleep": nxt.is_sleeping | getattr(nxt, "is_resting", False),
        }
        return nxt, out

    reset_fn, step_fn = jax.jit(reset), jax.jit(step)
    if device is None:
        return reset_fn, step_fn
    put = lambda x: jax.device_put(x, device)  # committed inputs: the jitted function runs there
    return (lambda key: reset_fn(put(key))), (lambda state, action, key: step_fn(state, put(action), put(key)))


def k_choices(k_max: int) -> list[int]:
    """1, 2, 4, ... up to k_max (the step sizes the shortcut model was trained on)."""
    return [2**i for i in range(int(np.log2(k_max)) + 1)]


def side_by_side(a_HWC: np.ndarray, b_HWC: np.ndarray | None, scale: int = 4, gap: int = 2) -> np.ndarray:
    """imagined | real (or imagined alone), nearest-neighbour upscaled, for the session video."""
    parts = [a_HWC] if b_HWC is None else [a_HWC, np.zeros((a_HWC.shape[0], gap, 3), np.uint8), b_HWC]
    x = np.concatenate(parts, axis=1)
    return np.repeat(np.repeat(x, scale, 0), scale, 1)


def encode_video(frames: list[np.ndarray], fmt: str, fps: int = 8) -> bytes:
    """Frames (T, H, W, 3) uint8 as GIF or MP4 bytes (MP4: H.264 via imageio-ffmpeg)."""
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"video format must be one of {VIDEO_FORMATS}, got {fmt!r}")
    x = np.stack(frames)
    if fmt == "gif":
        return iio.imwrite("<bytes>", x, extension=".gif", duration=int(1000 / fps), loop=0)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():  # the writer needs a file; ours
        # imageio-ffmpeg starts ffmpeg with fork + exec at once, which JAX's fork warning cannot tell apart
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        path = Path(d) / "session.mp4"
        iio.imwrite(path, x, fps=fps, codec="libx264", macro_block_size=2)
        return path.read_bytes()


# ----------------------------------------------------------------------------- the session
class PlaySession:
    """The models of a run, the real game, and the state of the current session.

    Not thread-safe: the server serialises calls (one step at a time).
    """

    def __init__(
        self,
        run_dir: str | Path,
        record: str | Path | None = None,
        context: int | None = None,
        cache_len: int | None = None,
        log=print,
    ):
        info = inspect_run(run_dir)
        cfg = info.cfg
        self.info, self.log = info, log
        self.env_name = cfg.env.name
        self.context = int(cfg.dynamics.eval_context if context is None else context)
        self.cache_len = int(max(cfg.dynamics.train.seq_len, self.context + 1) if cache_len is None else cache_len)
        if self.context < 1:
            raise ConfigError(f"--context {self.context}: must be >= 1 (the reset frame)")
        if self.cache_len <= self.context:
            raise ConfigError(f"--cache-len {self.cache_len} must exceed --context {self.context}")
        self.keep = min(max(self.context, self.cache_len // 2), self.cache_len - 1)
        self.env, self.env_params, self.spec = make_env(self.env_name)
        if tuple(self.spec.frame_shape) != info.frame_shape or self.spec.num_actions != info.num_actions:
            raise DatasetError(
                f"{info.run_dir} was trained on frames {info.frame_shape} with {info.num_actions} actions, but "
                f"craftax {self.env_name} has {tuple(self.spec.frame_shape)} and {self.spec.num_actions}"
            )
        self.recorder = (
            Recorder(record, self.spec, cfg.collect.read_chunk_frames, cfg.collect.zstd_level, log=log)
            if record
            else None
        )
        if info.agent_stage:
            model, wcfg, _ = load_agent(info.run_dir, info.agent_stage)
        else:
            model, wcfg, _ = load_world_model(info.run_dir)
        self.has_agent = info.agent_stage is not None
        dyn = model.world.dynamics if self.has_agent else model.dynamics
        self.k_max = dyn.cfg.k_max
        self.ks = k_choices(self.k_max)
        self.default_k = min(wcfg.dynamics.sample_steps, self.k_max)
        graphdef, self.state = nnx.split(model)
        self._encode, self._prefill, self._step = world_functions(
            graphdef, self.has_agent, self.k_max, wcfg.dynamics.context_tau
        )
        self._env_reset, self._env_step = env_functions(self.env, self.env_params, host_device())
        self.bindings = key_bindings(self.env_name, self.spec.action_meanings)
        self.noop = self.spec.action_meanings.index("noop")
        self.episodes = self._episodes(info.data)
        self.caches = None
        self.lockstep = False
        self.context_steps = 0
        self._rows: list[dict] = []

    # -- what the page needs to know -----------------------------------------------------------------
    def _episodes(self, data) -> list:
        """Held-out episodes long enough for a context (every episode if the eval split has none)."""
        if not data or not Path(data).is_dir():
            return []
        try:
            self.dataset = Dataset.open(data, env_name=self.env_name)
        except DatasetError as e:
            self.log(f"episode starts unavailable: {e}")
            return []
        eps = [e for e in self.dataset.split("eval") if e.length > self.context]
        return eps or [e for e in self.dataset.episodes if e.length > self.context]

    def describe(self) -> dict:
        return {
            "run": str(self.info.run_dir),
            "env": self.env_name,
            "env_id": self.spec.env_id,
            "frame_shape": list(self.spec.frame_shape),
            "actions": list(self.spec.action_meanings),
            "keys": self.bindings,
            "ks": self.ks,
            "default_k": self.default_k,
            "agent": self.info.agent_stage,
            "context": self.context,
            "cache_len": self.cache_len,
            "slide_keep": self.keep,
            "episodes": [
                {"index": i, "id": e.id, "length": e.length} for i, e in enumerate(self.episodes[:MAX_LISTED])
            ],
            "recording": str(self.recorder.root) if self.recorder else None,
            "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        }

    # -- start -------------------------------------------------------------------------------------
    def reset(self, start: str = "world", seed: int = 0, episode: int = 0, lockstep: bool = True) -> dict:
        """Start a new session; returns the first frames (the context's last frame and its decoding)."""
        if start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {start!r}")
        self.finish_recording()
        self.key = jax.random.PRNGKey(seed)
        C = self.context
        noop = self.noop
        if start == "world":
            k_reset, k_steps, self.key = jax.random.split(self.key, 3)
            frame, state = self._env_reset(k_reset)
            frames = [frame]
            rows = [self._row(frame, -1, 0.0, first=True)]
            done, asleep = False, False
            for i in range(1, C):  # the context: noop steps in the real game
                state, out = self._env_step(state, jnp.int32(noop), jax.random.fold_in(k_steps, i))
                out = jax.device_get(out)
                frames.append(out["frame"])
                rows.append(self._row(out["frame"], noop, out["reward"], unlocked=out["unlocked"]))
                done, asleep = bool(out["done"]), bool(out["asleep"])
                if done:
                    break
            frames = np.stack(jax.device_get(frames))
            actions = np.array([0] + [noop] * (len(frames) - 1), np.int32)
            mask = np.arange(len(frames)) > 0  # no action led into the reset frame
            self.real_state, self.real_done, self.asleep = state, done, asleep
            self.lockstep = bool(lockstep) and not done
            self.k_env = k_steps
            self._rows = rows if (self.lockstep and self.recorder) else []
            self.context_steps = len(frames) - 1
            self.real_return = float(sum(r["reward"] for r in rows[1:]))
        else:
            if not self.episodes:
                raise ValueError("this run has no dataset episodes to start from (its dataset is missing or too short)")
            if not 0 <= episode < len(self.episodes):
                raise ValueError(f"episode must be in [0, {len(self.episodes)}), got {episode}")
            ep = self.episodes[episode]
            rows = self.dataset.read(ep, 0, C, ("frame", "action"))
            frames = rows["frame"]
            mask = rows["action"] >= 0  # unlabeled actions are hidden (-1); the first row has none
            actions = np.maximum(rows["action"], 0).astype(np.int32)
            self.lockstep, self.real_done, self.asleep = False, False, False
            self._rows = []
            self.real_return = 0.0
        k_pre, self.k_slide, self.key = jax.random.split(self.key, 3)
        z = self._encode(self.state, jnp.asarray(frames[None]))
        self.caches, recon, extras = self._prefill(
            self.state, z, jnp.asarray(actions[None]), jnp.asarray(mask[None]), k_pre, max_len=self.cache_len
        )
        T = z.shape[1]
        z_host = np.asarray(jax.device_get(z))  # the history stays on the host: a slide does no eager device op
        self.history = [(z_host[:, i : i + 1], int(actions[i]), bool(mask[i])) for i in range(T)]
        self.t = T  # the cache slot of the next step
        self.n = 0  # steps since the reset
        self.start = start
        self.agent_steps = 0
        self.extras = jax.device_get(extras)
        recon = np.asarray(jax.device_get(recon))
        real = frames[-1] if start == "world" else None
        self.video = deque([side_by_side(recon, real if self.lockstep else None)], maxlen=VIDEO_FRAMES)
        return self._result(recon, real if self.lockstep else None, None, None, "reset", 0.0, {}, slid=False)

    # -- one step ------------------------------------------------------------------------------------
    def step(self, action: int | None, K: int, actor: str = "human") -> dict:
        """One step of the world model (and of the real game in lockstep) with `action`, or with the
        agent's action when actor == "agent"."""
        if self.caches is None:
            raise ValueError("no session: reset first")
        if K not in self.ks:
            raise ValueError(f"K must be one of {self.ks}, got {K}")
        if actor not in ACTORS:
            raise ValueError(f"actor must be one of {ACTORS}, got {actor!r}")
        if self.lockstep and self.real_done:
            raise ValueError("the real episode is over: reset to play again")
        t0 = time.perf_counter()
        if actor == "agent":
            if not self.has_agent:
                raise ValueError("this run has no agent stage")
            action = int(self.extras["next_action"])
        else:
            if (
                isinstance(action, bool)
                or not isinstance(action, int | np.integer)
                or not 0 <= action < self.spec.num_actions
            ):
                raise ValueError(f"action must be an integer in [0, {self.spec.num_actions}), got {action!r}")
            if self.lockstep and self.asleep:
                action = self.noop  # as in Craftax's play tool: asleep, every key is noop
        slid = self.t >= self.cache_len
        if slid:
            self._slide()
        key = jax.random.fold_in(self.key, self.n)
        self.caches, z_t, frame, extras = self._step(
            self.state, self.caches, jnp.int32(self.t), jnp.int32(action), key, K=K
        )
        real_out = None
        if self.lockstep:
            self.real_state, real_out = self._env_step(
                self.real_state, jnp.int32(action), jax.random.fold_in(self.k_env, self.context + self.n)
            )
        frame, z_t, extras, real_out = jax.device_get((frame, z_t, extras, real_out))
        self.history.append((z_t, action, True))
        self.t += 1
        self.n += 1
        self.agent_steps += actor == "agent"
        self.extras = extras
        real = None
        if real_out is not None:
            real = real_out["frame"]
            self.real_done, self.asleep = bool(real_out["done"]), bool(real_out["asleep"])
            self.real_return += float(real_out["reward"])
            if self._rows:
                self._rows.append(
                    self._row(
                        real,
                        action,
                        real_out["reward"],
                        unlocked=real_out["unlocked"],
                        last=self.real_done,
                        terminal=bool(real_out["terminal"]),
                    )
                )
        self.video.append(side_by_side(frame, real))
        recorded = self.finish_recording() if self.real_done else None
        return self._result(
            frame,
            real,
            action,
            actor,
            "step",
            time.perf_counter() - t0,
            real_out or {},
            slid=slid,
            K=K,
            recorded=recorded,
        )

    def _slide_inputs(self, hist):
        """(z_1WLN, actions_1W, mask_1W) of history entries, built on the host (one transfer each)."""
        z = np.concatenate([h[0] for h in hist], axis=1)
        actions = np.array([[h[1] for h in hist]], np.int32)
        mask = np.array([[h[2] for h in hist]], bool)
        return jnp.asarray(z), jnp.asarray(actions), jnp.asarray(mask)

    def _slide(self) -> None:
        """Refill a fresh cache with the last `keep` steps (see the module docstring)."""
        hist = self.history[-self.keep :]
        z, actions, mask = self._slide_inputs(hist)
        k_pre = jax.random.fold_in(self.k_slide, self.n)
        self.caches, _, _ = self._prefill(self.state, z, actions, mask, k_pre, max_len=self.cache_len)
        self.history = hist
        self.t = self.keep

    def warm(self, ks=()) -> float:
        """Compile the step for each K in `ks`, the slide's prefill and the real game's step without
        changing the session (on copies of its caches); returns the seconds it took."""
        t0 = time.perf_counter()
        for K in ks:
            caches = jax.tree.map(jnp.copy, self.caches)  # the step donates its caches
            jax.block_until_ready(self._step(self.state, caches, jnp.int32(self.t), jnp.int32(0), self.key, K=K))
        z, actions, mask = self._slide_inputs(self.history[:1] * self.keep)  # the slide's exact inputs
        jax.block_until_ready(self._prefill(self.state, z, actions, mask, self.key, max_len=self.cache_len))
        if self.lockstep:
            jax.block_until_ready(self._env_step(self.real_state, jnp.int32(0), self.key))
        return time.perf_counter() - t0

    # -- results, recording, video ------------------------------------------------------------------
    def _result(self, imagined, real, action, actor, kind, seconds, real_out, slid, K=None, recorded=None) -> dict:
        p = None
        if real is not None:
            p = float(psnr(np.asarray(imagined, np.float32) / 255.0, np.asarray(real, np.float32) / 255.0))
        names = self.spec.achievement_names
        unlocked = real_out.get("unlocked")
        return {
            "kind": kind,
            "step": self.n,
            "slot": self.t,
            "K": K,
            "action": action,
            "action_name": None if action is None else self.spec.action_meanings[action],
            "actor": actor,
            "imagined": imagined,
            "real": real,
            "psnr": p,
            "latency_ms": 1000.0 * seconds,
            "lockstep": self.lockstep,
            "start": self.start,
            "real_reward": float(real_out["reward"]) if "reward" in real_out else None,
            "real_return": self.real_return,
            "done": self.real_done,
            "terminal": bool(real_out.get("terminal", False)),
            "achievements": [] if unlocked is None else [names[i] for i in np.flatnonzero(unlocked)],
            "asleep": self.asleep,
            "pred_reward": float(self.extras["reward"]) if self.has_agent else None,
            "pred_value": float(self.extras["value"]) if self.has_agent else None,
            "agent_action": int(self.extras["next_action"]) if self.has_agent else None,
            "slid": slid,
            "recorded": recorded,
        }

    def _row(self, frame, action, reward, first=False, last=False, terminal=False, unlocked=None) -> dict:
        A = len(self.spec.achievement_names)
        return {
            "frame": np.asarray(frame, np.uint8),
            "action": np.int32(action),
            "reward": np.float32(reward),
            "is_first": first,
            "is_last": last,
            "is_terminal": terminal,
            "achievements": np.zeros((A,), bool) if unlocked is None else np.asarray(unlocked, bool),
        }

    def finish_recording(self) -> str | None:
        """Commit the real-game episode in progress (cut here if it has not ended); its id, or None
        when nothing is recorded or nobody has played a step yet."""
        rows, self._rows = self._rows, []
        if not self.recorder or len(rows) <= 1 + self.context_steps:
            return None
        rows[-1]["is_last"] = True
        arrays = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        return self.recorder.commit(arrays, agent_steps=self.agent_steps, context_steps=self.context_steps)

    def video_frames(self) -> list[np.ndarray]:
        """The session so far (imagined | real, upscaled), a copy: encode it outside the step lock."""
        return list(self.video)

    def close(self) -> None:
        """Commit the episode in progress and release the recording directory."""
        self.finish_recording()
        if self.recorder:
            self.recorder.close()

"""Craftax factory and the facts about an environment that a dataset records.

Craftax renders float32 pixels in [0, 1]; we store `round(x * 255)` as uint8, converted on the
device (`to_uint8`) so only bytes leave it.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp

ENV_IDS = {
    "classic": "Craftax-Classic-Pixels-v1",
    "full": "Craftax-Pixels-v1",
}


@dataclass(frozen=True)
class EnvSpec:
    name: str  # "classic" | "full"
    env_id: str
    frame_shape: tuple[int, int, int]  # H, W, C
    num_actions: int
    action_meanings: tuple[str, ...]
    achievement_names: tuple[str, ...]
    max_timesteps: int
    craftax_version: str


def make_env(name: str):
    """Return (env, params, spec) for the pixel, no-auto-reset Craftax variant `name`.

    We reset ourselves so that the terminal frame of an episode is kept (auto-reset would replace
    it by the next episode's first frame).
    """
    if name not in ENV_IDS:
        raise ValueError(f"unknown env.name {name!r}; expected one of {sorted(ENV_IDS)}")
    if name == "classic":
        from craftax.craftax_classic import constants as C
    else:
        from craftax.craftax import constants as C
    cache = texture_cache(C)
    from craftax.craftax_env import make_craftax_env_from_name

    try:
        env = make_craftax_env_from_name(ENV_IDS[name], auto_reset=False)
    except (EOFError, pickle.UnpicklingError, OSError) as e:  # bz2: EOFError, or OSError "Invalid data stream"
        if isinstance(e, OSError) and "Invalid data stream" not in str(e):
            raise
        raise RuntimeError(
            f"Craftax's texture cache {cache} could not be read ({e!r}): it is damaged, e.g. written by "
            f"a build that was interrupted, or not Craftax's; delete it and run again (it is rebuilt, "
            f"about a minute)"
        ) from None
    params = env.default_params
    obs_shape = tuple(int(s) for s in env.observation_space(params).shape)
    spec = EnvSpec(
        name=name,
        env_id=ENV_IDS[name],
        frame_shape=obs_shape,  # type: ignore[arg-type]
        num_actions=int(env.num_actions),
        action_meanings=tuple(a.name.lower() for a in C.Action),
        achievement_names=tuple(a.name.lower() for a in C.Achievement),
        max_timesteps=int(params.max_timesteps),
        craftax_version=metadata.version("craftax"),
    )
    return env, params, spec


_build_lock = threading.Lock()


def texture_cache(C, log=print) -> Path:
    """Craftax's texture cache file for constants module `C`, built first if it is missing.

    Craftax builds the cache on first use (about a minute of one core) and writes it in place, not
    atomically: a second process that starts meanwhile (a CI worker, another task of a multi-process
    collect on a fresh install) finds the file half-written and fails in bz2 with EOFError. Here the
    first process builds it under an exclusive lock next to it, into a temporary file renamed into
    place, so the others wait for it and never read part of it.

    Where Craftax's package folder is read-only (a shared cluster environment), Craftax fails with
    PermissionError when it saves the cache; then the cache lives in the user's cache folder
    ($XDG_CACHE_HOME or ~/.cache, under dreamer4/craftax-VERSION/) and `C` is pointed there.
    """
    path = Path(C.TEXTURE_CACHE_FILE)
    if not path.exists() and not os.access(path.parent, os.W_OK):
        home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        path = home / "dreamer4" / f"craftax-{metadata.version('craftax')}" / path.name
        path.parent.mkdir(parents=True, exist_ok=True)
        C.TEXTURE_CACHE_FILE = str(path)  # where Craftax's loader reads (and builder saves) it
    if path.exists():
        return path
    with _build_lock, open(path.with_name(path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not path.exists():  # not built by another process while this one waited
            log(f"building Craftax's texture cache {path} (once per install, about a minute)")
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            C.TEXTURE_CACHE_FILE = str(tmp)  # load_all_textures saves where this global says
            # Craftax keeps the textures in an lru_cache per process: a copy already in memory would
            # return without building (and without writing the file)
            getattr(C.load_all_textures, "cache_clear", lambda: None)()
            try:
                C.load_all_textures()
                os.replace(tmp, path)
            finally:
                C.TEXTURE_CACHE_FILE = str(path)
                tmp.unlink(missing_ok=True)  # left only by a build that failed or was interrupted
    return path


def to_uint8(obs_float):
    """Craftax float pixels in [0, 1] -> uint8, exactly round(x * 255)."""
    return jnp.round(jnp.clip(obs_float, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def strong_types(tree):
    """`tree` with every weak-typed array made strong, dtypes unchanged.

    Craftax builds parts of a reset state from Python scalars, so a fresh state holds weak-typed
    int32 / float32 arrays, while the state a jitted step returns holds strong ones. A jitted loop
    fed first the one and then the other compiles twice (the collector's chunk and PPO's update each
    did: ~15-20 s more per run on a CPU). Loops therefore start from `strong_types(reset state)`.
    """

    def strong(x):
        x = jnp.asarray(x)  # Python scalars too (a state's plain int field)
        return x.astype(x.dtype) if jax.typeof(x).weak_type else x

    return jax.tree.map(strong, tree)

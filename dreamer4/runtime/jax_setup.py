"""Process-wide JAX settings every command applies before compiling anything."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Persist compiled executables across processes (Craftax's scan takes ~40 s to compile on CPU).

    The directory is $DREAMER4_JAX_CACHE, else ~/.cache/dreamer4/jax; set DREAMER4_JAX_CACHE=off to
    disable. Returns the directory used, or None (also when it cannot be created: a warning, and
    every process compiles afresh).
    """
    path = path or os.environ.get("DREAMER4_JAX_CACHE") or str(Path.home() / ".cache" / "dreamer4" / "jax")
    if path.lower() in ("off", "0", "none", ""):
        return None
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only or full home on a cluster node: slower, not wrong
        print(
            f"warning: JAX's compilation cache is off: cannot create {path} ({e.strerror}); "
            f"set DREAMER4_JAX_CACHE to a writable folder (or to off)",
            file=sys.stderr,
        )
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path

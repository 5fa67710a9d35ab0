"""Build the latent cache (data/latents.py): every training window encoded once by the frozen tokenizer.

Without it the dynamics step encodes its batch's frames in every step: on the classic preset the
frozen encoder's forward is about a quarter of the step's FLOPs and a third of its memory traffic
(BENCHMARKS.md), repeated for every epoch over the data. With it, the step starts from latents.
The cached latents equal the on-the-fly ones (same windows, same encoder: tests/test_latent_cache.py).

Work is split in blocks of windows; block b belongs to process b % P of a multi-process job, which
encodes it on its local devices with its own copy of the tokenizer (the tokenizer is loaded whole
in every process) and writes it as one file. Blocks already written by an earlier, killed build
are kept. All processes meet at a barrier before anyone reads the cache.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dreamer4.data.latents import LatentCache, cache_name
from dreamer4.data.loader import WindowSource
from dreamer4.dynamics.model import encode_frames
from dreamer4.runtime.distributed import barrier
from dreamer4.runtime.preempt import Preempted, agreed_stop
from dreamer4.runtime.progress import Progress


def _local(x):
    """A copy of x this process can compute with alone (a restored multi-process run's variables
    can be global arrays spanning other processes' devices)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return x
    if x.is_fully_replicated:
        return x.addressable_data(0)
    return multihost_utils.process_allgather(x, tiled=True)  # every process calls this, in order


def _local_state(tokenizer: nnx.Module):
    graphdef, state = nnx.split(tokenizer)
    return graphdef, jax.tree.map(_local, state)


def _digest(net, state) -> str:
    h = hashlib.sha256()
    h.update(repr(net).encode())  # the architecture: the same weights with another context encode otherwise
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        a = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{a.shape}:{a.dtype};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer: nnx.Module) -> str:
    """sha256 of the tokenizer's network config (e.g. its time window) and variables (paths,
    shapes, dtypes and bytes): a cache built by another tokenizer is never read."""
    return _digest(tokenizer.cfg, _local_state(tokenizer)[1])


def _encoder(graphdef, state, block: int):
    """jit(frames_BTHWC uint8 -> latents) on this process's devices, the batch split over them
    when it divides (the tokenizer's variables replicated there)."""
    devices = jax.local_devices()
    if len(devices) > 1 and block % len(devices) == 0:
        mesh = jax.sharding.Mesh(np.asarray(devices), ("b",))
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("b"))
    else:
        rep = data = jax.sharding.SingleDeviceSharding(devices[0])
    state = jax.device_put(state, rep)
    fn = jax.jit(lambda s, f: encode_frames(nnx.merge(graphdef, s), f), in_shardings=(rep, data))
    # (put explicitly: jit refuses numpy inputs with a non-trivial sharding in a multi-process job)
    return lambda frames: np.asarray(fn(state, jax.device_put(frames, data)))


def build_latent_cache(
    tokenizer: nnx.Module, source: WindowSource, latents_dir: str | Path, block: int, log=print
) -> WindowSource:
    """Make sure `latents_dir/<split>-T<T>-s<stride>` holds the latents of every window of `source`;
    encode what is missing (this process's blocks). `block` windows are encoded at a time and
    written as one file when the cache is new; an existing one keeps its own block size. Returns
    `source` reading that cache (its records carry "latents" instead of "frames"). Call from every
    process."""
    cache = LatentCache(Path(latents_dir) / cache_name(source.split, source.seq_len, source.stride))
    graphdef, state = _local_state(tokenizer)
    identity = {**source.identity(), "tokenizer": _digest(tokenizer.cfg, state)}
    W, T = len(source.base_windows), source.seq_len
    out = jax.eval_shape(
        lambda f: encode_frames(nnx.merge(graphdef, state), f),
        jax.ShapeDtypeStruct((1, T, *source.ds.frame_shape), jnp.uint8),
    )
    shape, dtype = (W, *out.shape[1:]), out.dtype
    if jax.process_index() == 0:
        if cache.matches(identity, shape, dtype):
            done = cache.num_blocks - len(cache.missing())
            log(f"[latents] {cache.path}: {done} of {cache.num_blocks} blocks present, continuing")
        else:
            why = "another tokenizer or other windows" if cache.meta is not None else "none yet"
            log(f"[latents] building {cache.path} ({W} windows x {T} steps, blocks of {block}; was: {why})")
            cache.create(identity, shape, dtype, block)
    barrier("latent cache created")
    cache = LatentCache(cache.path)  # re-read the metadata process 0 may have written
    # An existing cache keeps its block size (the dynamics' and the BC phase's batches may differ:
    # each would otherwise rebuild the other's cache), so missing blocks are encoded in its blocks.
    block = cache.meta["block"]
    P, p = jax.process_count(), jax.process_index()
    missing = set(cache.missing())  # the same set in every process
    # Round r: process p encodes block r * P + p if missing. Every process walks the same rounds
    # (those with any block missing) and asks agreed_stop() after each: a signal stops all of
    # them at the same round, with the blocks written so far kept (runtime/preempt.py).
    rounds = sorted({b // P for b in missing})
    mine = [r * P + p for r in rounds if r * P + p in missing]
    if rounds:
        encode = _encoder(graphdef, state, block) if mine else None

        def frames_of(b):  # one block's frames, padded to a whole block (one compiled shape)
            lo, hi = cache.block_range(b)
            f = np.stack([source.read_frames(w) for w in range(lo, hi)])
            return np.concatenate([f, np.repeat(f[-1:], block - len(f), 0)]) if len(f) < block else f

        bar = Progress(cache.num_blocks, "latents", unit="blocks", initial=cache.num_blocks - len(missing))
        with ThreadPoolExecutor(1) as pool:  # read the next block while this one encodes
            i, ahead = 0, pool.submit(frames_of, mine[0]) if mine else None
            for r in rounds:
                b = r * P + p
                if i < len(mine) and b == mine[i]:
                    frames = ahead.result()
                    i += 1
                    if i < len(mine):
                        ahead = pool.submit(frames_of, mine[i])
                    lo, hi = cache.block_range(b)
                    cache.write_block(b, encode(frames)[: hi - lo])
                bar.update(sum(1 for q in range(P) if r * P + q in missing))
                stop = agreed_stop()
                if stop:
                    done = cache.num_blocks - len(cache.missing())
                    raise Preempted("latents", stop, saved=f"{done} of {cache.num_blocks} blocks kept in {cache.path}")
        bar.close()
    barrier("latent cache written")
    return source.with_latents(cache.path, tokenizer=identity["tokenizer"])

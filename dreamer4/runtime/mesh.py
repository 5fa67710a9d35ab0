"""Device mesh ("data", "fsdp") and shardings, the same code on 1 CPU, fake CPUs, GPU and TPU.

Parameters and optimizer state are sharded FSDP-style: each array is split along its largest
dimension that the "fsdp" axis size divides, and replicated when none does. Batches are split
along their leading (batch) dimension over both axes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(fsdp: int = 0) -> Mesh:
    """Mesh over all devices of all processes; `fsdp` devices per "fsdp" group (0 = all)."""
    devices = jax.devices()
    n = len(devices)
    fsdp = n if fsdp in (0, None) else fsdp
    if n % fsdp:
        raise ValueError(f"config key 'runtime.fsdp' ({fsdp}) must divide the number of devices ({n})")
    return Mesh(np.asarray(devices).reshape(n // fsdp, fsdp), ("data", "fsdp"))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Shard the largest dimension divisible by `fsdp_size`; replicate if none is."""
    if fsdp_size > 1:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % fsdp_size == 0 and shape[dim] >= fsdp_size:
                spec = [None] * len(shape)
                spec[dim] = "fsdp"
                return P(*spec)
    return P()


def state_shardings(mesh: Mesh, tree):
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs)."""
    size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp")))


def global_batch(mesh: Mesh, local: dict) -> dict:
    """Assemble process-local numpy batches into global jax.Arrays sharded over the batch dim."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}

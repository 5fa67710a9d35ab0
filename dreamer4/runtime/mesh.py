"""Device mesh ("data", "fsdp") and shardings, the same code on 1 CPU, fake CPUs, GPU and TPU.

Parameters and optimizer state are sharded FSDP-style: each array is split along its largest
dimension that the "fsdp" axis size divides, and replicated when none does. Batches are split
along their leading (batch) dimension over both axes.

Over several processes the mesh is hybrid where the topology allows: when every process (one per
node, or one per TPU host) holds whole "fsdp" groups, each group stays inside one process's fast
interconnect (NVLink / ICI) and only the "data" axis crosses the slower network (gradients are
all-reduced over it once per step). TPU multi-slice jobs use slices instead of processes as the
outer unit. With one process per GPU, processes on one node are consecutive (Slurm's block
distribution), so "fsdp" groups of up to GPUs-per-node devices again stay inside a node. In every
layout process p's devices cover rows [p*b, (p+1)*b) of the global batch, which is how the loader
hands out process-local shards (checked by `check_process_layout`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(fsdp: int = 0, devices=None) -> Mesh:
    """Mesh over all devices of all processes; `fsdp` devices per "fsdp" group (0 = all)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    fsdp = n if fsdp in (0, None) else fsdp
    if fsdp < 0 or n % fsdp:
        raise ValueError(f"config key 'runtime.fsdp' ({fsdp}) must divide the number of devices ({n})")
    grid = device_grid(devices, fsdp)
    check_process_layout(grid)
    return Mesh(grid, ("data", "fsdp"))


def _granules(devices) -> tuple[str, list[list]]:
    """The outer (slow network) units: TPU slices if there are several, else processes."""
    slices = {getattr(d, "slice_index", 0) for d in devices}
    key = (lambda d: getattr(d, "slice_index", 0)) if len(slices) > 1 else (lambda d: d.process_index)
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(key(d), []).append(d)
    return ("slice" if len(slices) > 1 else "process"), [groups[k] for k in sorted(groups)]


def device_grid(devices, fsdp: int) -> np.ndarray:
    """(n / fsdp, fsdp) array of devices; hybrid (fsdp inside a granule) when sizes allow.

    Topology-aware layouts are tried first; any that would not give each process one contiguous
    block of the batch (see `check_process_layout`) falls back to the plain process-ordered one.
    """
    n = len(devices)
    kind, groups = _granules(devices)
    per = len(groups[0])
    candidates = []
    if len(groups) > 1 and all(len(g) == per for g in groups) and per % fsdp == 0:
        candidates.append(
            lambda: mesh_utils.create_hybrid_device_mesh(
                (per // fsdp, fsdp),
                (len(groups), 1),
                devices,
                process_is_granule=kind == "process",
                allow_split_physical_axes=True,
            )
        )
    if len(groups) == 1 and devices[0].platform != "cpu":  # physical-topology-aware order on one host
        candidates.append(
            lambda: mesh_utils.create_device_mesh((n // fsdp, fsdp), devices, allow_split_physical_axes=True)
        )
    for make in candidates:
        try:
            grid = make()
            check_process_layout(grid)
            return grid
        except (ValueError, NotImplementedError, AssertionError, KeyError):
            continue  # e.g. an unknown physical topology: the plain layout below always works
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return np.asarray(ordered, dtype=object).reshape(n // fsdp, fsdp)


def check_process_layout(grid: np.ndarray) -> None:
    """Every process's devices must be one contiguous run of the flattened (data, fsdp) order,
    runs in process order: then process p's local batch is rows [p*b, (p+1)*b) of the global batch."""
    flat = [d.process_index for d in grid.reshape(-1)]
    runs = [p for i, p in enumerate(flat) if i == 0 or p != flat[i - 1]]
    if runs != sorted(set(flat)):
        raise ValueError(
            f"device mesh does not give each process one contiguous block in process order "
            f"({flat}); this device topology needs another runtime.fsdp"
        )


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

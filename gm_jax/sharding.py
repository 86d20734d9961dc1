"""Meshes and shardings: one 1-D "data" axis over every device.

The train state is replicated; a batch is split along its leading axis.
``local_rows`` says which rows of a global batch this process's devices hold
and ``host_to_global`` stitches the per-process pieces into one global
``jax.Array``. Reading those rows is the input pipeline's business
(``gm_jax.input_pipeline``).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh named "data" over ``devices`` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, name: str) -> None:
  """Raises ValueError unless the global batch splits evenly over devices."""
  if batch_size % mesh.size:
    raise ValueError(
        f"{name}={batch_size} must be divisible by the number of devices"
        f" ({mesh.size}) so that every device gets the same share.")


def local_rows(batch_size: int, mesh: Mesh) -> slice:
  """The rows of a global batch that this process's devices hold."""
  sharding = batch_sharding(mesh)
  index_map = sharding.addressable_devices_indices_map((batch_size,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [batch_size if idx[0].stop is None else idx[0].stop
           for idx in index_map.values()]
  start, stop = min(starts), max(stops)
  if stop - start != batch_size // mesh.size * len(index_map):
    raise ValueError("This process's devices do not hold a contiguous block"
                     " of the batch; build the mesh from jax.devices().")
  return slice(start, stop)


def host_to_global(local_batch: Mapping[str, np.ndarray],
                   mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's rows of a batch into global sharded arrays."""
  sharding = batch_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in local_batch.items()
  }

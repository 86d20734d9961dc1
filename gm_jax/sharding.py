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


# How long a process waits for the others to finish compiling a function
# before the first run of it.
COMPILE_BARRIER_SECONDS = 15 * 60


class SyncedJit:
  """``jax.jit(fn, **kwargs)`` that, in a multi-process run, compiles each
  new signature ahead and waits for every process before running it.

  XLA's CPU collectives (gloo) give a process 30 s to meet the others at
  the first collective of a program. Processes compile independently, and
  on a loaded machine one can finish more than 30 s after another, which
  failed a 2-process run with ``DEADLINE_EXCEEDED``. Compiling first and
  meeting at the coordination service's barrier, which takes a timeout,
  leaves only run time between the processes. A single process skips all
  of this.
  """

  def __init__(self, fn, name: str, **jit_kwargs):
    self._jitted = jax.jit(fn, **jit_kwargs)
    self._name = name
    self._seen: set = set()
    self.__wrapped__ = fn

  def lower(self, *args, **kwargs):
    return self._jitted.lower(*args, **kwargs)

  def trace(self, *args, **kwargs):
    """``jax.jit(fn).trace``: the jaxpr of a call, without compiling."""
    return self._jitted.trace(*args, **kwargs)

  def __call__(self, *args):
    if jax.process_count() > 1:
      leaves, treedef = jax.tree_util.tree_flatten(args)
      signature = (treedef, tuple(
          (leaf.shape, str(leaf.dtype)) if hasattr(leaf, "dtype") else leaf
          for leaf in leaves))
      if signature not in self._seen:
        # The jit cache keeps this executable, so the call below reuses it.
        self._jitted.lower(*args).compile()
        barrier(f"gm_jax/compiled/{self._name}/{len(self._seen)}",
                COMPILE_BARRIER_SECONDS)
        self._seen.add(signature)
    return self._jitted(*args)


def barrier(name: str, timeout_seconds: float) -> None:
  """Waits until every process reaches the barrier ``name``."""
  # Orbax and jax's own multi-process tests reach the client the same way;
  # jax has no public barrier with a timeout.
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is None or jax.process_count() == 1:
    return
  client.wait_at_barrier(name, int(timeout_seconds * 1000))

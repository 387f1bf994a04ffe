"""The device mesh ``('data', 'fsdp')``, parameter shardings, and host <-> global batches.

Batches are split over all devices; parameters and optimizer state are replicated, or with
``mesh.fsdp > 1`` sharded along their largest dimension divisible by it. Host batches become global
arrays with ``jax.make_array_from_process_local_data``.
"""

from typing import Dict, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


BATCH_AXES = ('data', 'fsdp')


FSDP_MIN_SIZE = 2 ** 12  # smaller arrays stay replicated under fsdp


def make_mesh(fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
  """The ``('data', 'fsdp')`` mesh of ``devices`` (default: all of JAX's; abstract TPU devices
  to compile ahead of time, see ``dtf_jax.tpu_target``)."""
  n = jax.device_count() if devices is None else len(devices)
  if n % fsdp:
    raise ValueError(f'config.mesh.fsdp={fsdp} does not divide the {n} devices')
  return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


class MeshJit:
  """A jitted function called and lowered with its mesh set (``jax.set_mesh``), so that code
  which places work per shard sees the mesh while it is traced (the Pallas aggregation kernel
  runs through ``shard_map`` on each device's part of the batch)."""

  def __init__(self, jitted, mesh: jax.sharding.Mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


def param_spec(shape: Tuple[int, ...], fsdp: int) -> P:
  """Shards the largest dimension divisible by ``fsdp`` over the 'fsdp' axis (big arrays only)."""
  if fsdp == 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return P(*[None] * dim, 'fsdp')
  return P()


def to_global(batch: Dict[str, np.ndarray], sharding: NamedSharding, keys=('video', 'label')):
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in keys}


def host_local(array: jax.Array, mesh) -> np.ndarray:
  """The rows of a batch-sharded global array that this process fed in."""
  return np.asarray(multihost_utils.global_array_to_host_local_array(array, mesh, P(BATCH_AXES)))

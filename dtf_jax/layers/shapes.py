"""Reshapes that keep the batch axis's sharding under meshes with Explicit axes."""

import jax


def reshape_keep_batch(x, shape):
  """``x.reshape(shape)`` for a reshape whose leading axis is the batch axis, or the batch axis
  merged with the axes after it (``B T ... -> B*T ...``), or split from them (the inverse).

  Under a mesh with Explicit axes, JAX asks for the output sharding of reshapes that split or merge
  several axes; this keeps the batch axis sharded as it is and the others unsharded.
  """
  sharding = jax.typeof(x).sharding
  if sharding.mesh.empty or not sharding.spec or sharding.spec[0] is None:
    return x.reshape(shape)
  spec = jax.sharding.PartitionSpec(sharding.spec[0], *([None] * (len(shape) - 1)))
  return jax.lax.reshape(x, shape, out_sharding=sharding.update(spec=spec))

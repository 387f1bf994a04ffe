"""Rearranges that keep the batch axis's sharding under meshes with Explicit axes."""

import einops
import jax


def rearrange_keep_batch(x, pattern: str, **axes_lengths):
  """``einops.rearrange(x, pattern, **axes_lengths)`` for a pattern whose leading axis is the
  batch axis, kept as it is or merged with the axes after it (``b t ... -> (b t) ...``).

  Under a mesh with Explicit axes, JAX infers the sharding of a reshape only when it splits one
  axis or merges one group of axes; for others (window partition: two axes split, then two groups
  merged) it asks for the output sharding. This runs the rearrange with the mesh axes left to the
  compiler (``jax.sharding.auto_axes``) and keeps the batch axis sharded as it is, the others
  unsharded. Plain ``einops.rearrange`` where JAX infers it.
  """
  sharding = jax.typeof(x).sharding
  if sharding.mesh.empty or not sharding.spec or sharding.spec[0] is None:
    return einops.rearrange(x, pattern, **axes_lengths)
  batch_only = sharding.update(spec=jax.sharding.PartitionSpec(sharding.spec[0]))
  return jax.sharding.auto_axes(lambda y: einops.rearrange(y, pattern, **axes_lengths),
                                out_sharding=batch_only)(x)

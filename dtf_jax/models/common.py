"""Pieces shared by the backbones: input checks and stochastic depth."""

import flax.linen as nn
import jax
import jax.numpy as jnp


def check_video(video, *, model: str, clip_length: int, early_stride: int):
  """Raises ``ValueError`` unless ``video`` is ``B T H W 3`` with ``T == clip_length``."""
  if video.ndim != 5 or video.shape[-1] != 3:
    raise ValueError(f'{model}: expected a video B T H W 3, got shape {tuple(video.shape)}.')
  if video.shape[1] != clip_length:
    raise ValueError(f'{model}: expected clip length {clip_length} (the model was built for it), '
                     f'got {video.shape[1]} frames (input shape {tuple(video.shape)}).')
  if clip_length % early_stride:
    raise ValueError(f'{model}: clip length {clip_length} is not a multiple of early_stride '
                     f'{early_stride}.')


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample (leading axis).  ``N ... -> N ...``"""
  rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def reshape_keep_batch(x, shape):
  """``x.reshape(shape)`` for a reshape that keeps the leading (batch) axis.

  Under a mesh with Explicit axes, JAX asks for the output sharding of reshapes that split or merge
  several axes; this keeps the batch axis sharded as it is and the others unsharded.
  """
  sharding = jax.typeof(x).sharding
  if sharding.mesh.empty or not sharding.spec or sharding.spec[0] is None:
    return x.reshape(shape)
  spec = jax.sharding.PartitionSpec(sharding.spec[0], *([None] * (len(shape) - 1)))
  return jax.lax.reshape(x, shape, out_sharding=sharding.update(spec=spec))

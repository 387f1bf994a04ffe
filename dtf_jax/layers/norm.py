"""Batch normalisation with PyTorch semantics (what the official weights were trained with)."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


def batch_moments(x):
  """Mean and biased variance per channel (``C``) over every axis of ``x`` but the last."""
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  return mean, jnp.mean(jnp.square(x - mean), axis=axes)


def update_running(ra_mean, ra_var, mean, var, count: int, momentum: float):
  """PyTorch's update of running statistics (variables ``C``) by a batch's ``mean`` and biased
  ``var`` over ``count`` values per channel: ``momentum`` weighs the batch, the variance made
  unbiased."""
  unbiased = var * (count / max(count - 1, 1))
  ra_mean.value = (1 - momentum) * ra_mean.value + momentum * mean
  ra_var.value = (1 - momentum) * ra_var.value + momentum * unbiased


class RunningStatistics(nn.Module):
  """The running statistics of a :class:`BatchNorm` without the normalisation, for a caller that
  computes the batch moments and normalises by itself (the fused DTF block): the same variables
  ``batch_stats/{mean,var}`` (``C``). Call it for the running ``(mean, var)``; call it with
  ``batch=(mean, var, count)`` in training to update them (not while initialising)."""
  momentum: float = 0.1

  @nn.compact
  def __call__(self, channels: int, batch=None):
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((channels,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((channels,), jnp.float32))
    if batch is not None and not self.is_initializing():
      update_running(ra_mean, ra_var, *batch, self.momentum)
    return ra_mean.value, ra_var.value


class BatchNorm(nn.Module):
  """Batch norm over every axis but the last (channels), as ``torch.nn.BatchNorm{1,2,3}d``.

  Differences from ``flax.linen.BatchNorm`` that matter for loading PyTorch weights:
  ``momentum`` is the weight of the NEW batch statistic (0.1), and the running variance is updated
  with the unbiased batch variance. Statistics are computed in float32 whatever the input dtype.
  Under ``jax.jit`` with a batch-sharded input the means are over the global batch.

  Input ``... C``, output the same shape and dtype. Variables: ``params/{scale,bias}`` (if
  ``use_affine``) and ``batch_stats/{mean,var}``.
  """
  use_affine: bool = True
  momentum: float = 0.1
  epsilon: float = 1e-5
  scale_init: Any = nn.initializers.ones
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    channels = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((channels,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((channels,), jnp.float32))
    xf = x.astype(jnp.float32)
    if train:
      mean, var = batch_moments(xf)
      if not self.is_initializing():
        update_running(ra_mean, ra_var, mean, var, xf.size // channels, self.momentum)
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * lax.rsqrt(var + self.epsilon)
    if self.use_affine:
      y = y * self.param('scale', self.scale_init, (channels,), jnp.float32)
      y = y + self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    return y.astype(self.dtype or x.dtype)

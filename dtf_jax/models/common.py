"""Pieces shared by the backbones: input checks, stochastic depth, rematerialisation."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dtf_jax.errors import UserError
from dtf_jax.layers.temporal import make_temporal

# What the backbones' ``remat`` attribute can be: recompute nothing, each block (Bottleneck /
# SwinBlock), or only each temporal module (the DTF block), in the backward pass.
REMAT_OPTIONS = ('none', 'block', 'dtf')
# What a rematerialised part keeps from its forward pass: nothing but its inputs, the least memory.
# Activations kept for the backward pass (``model_info --train``, bfloat16), remat 'block':
# DTF-Swin-B 64x224² batch 1 0.27 GiB with this policy, 1.13 GiB keeping the matmul outputs
# (``dots_with_no_batch_dims_saveable``; 5.19 GiB without remat); DTF-R50 16x224² batch 4 0.39
# against 0.52 GiB (3.68 without remat). The price is recomputing each block's forward once.
REMAT_POLICY = jax.checkpoint_policies.nothing_saveable


class ModelArgumentError(UserError, ValueError):
  """A model argument, or an input, that the model cannot take (the message names it)."""


def nan_where_not_finite(video, out):
  """``out`` (``B ...``) with NaN for each example whose ``video`` (``B T H W 3``) holds a NaN or
  an infinity. Compiled, XLA may drop a NaN on the way (a max with 0 returns 0), so a jitted or
  exported model would return ordinary-looking logits for such input; this makes every path
  (eager, jit, export) return NaN for it."""
  finite = jnp.all(jnp.isfinite(video), axis=tuple(range(1, video.ndim)))
  return jnp.where(finite.reshape((-1,) + (1,) * (out.ndim - 1)), out, jnp.nan)


def check_video(video, *, model: str, clip_length: int, early_stride: int):
  """Raises ``ValueError`` unless ``video`` is ``B T H W 3`` with ``T == clip_length``."""
  if video.ndim != 5 or video.shape[-1] != 3:
    raise ModelArgumentError(
        f'{model}: expected a video B T H W 3, got shape {tuple(video.shape)}.')
  if video.shape[1] != clip_length:
    raise ModelArgumentError(
        f'{model}: expected clip length {clip_length} (the model was built for it), '
        f'got {video.shape[1]} frames (input shape {tuple(video.shape)}).')
  if clip_length % early_stride:
    raise ModelArgumentError(
        f'{model}: clip length {clip_length} is not a multiple of early_stride '
        f'{early_stride}.')


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample (leading axis).
  ``N ... -> N ...``"""
  rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def check_remat(remat: str, model: str) -> None:
  if remat not in REMAT_OPTIONS:
    raise ModelArgumentError(f'{model}: remat={remat!r} is not one of {REMAT_OPTIONS}.')


def remat_class(cls, remat: str, *, when: str):
  """``cls`` rematerialised (``nn.remat``, its ``__call__(x, train)`` with ``train`` a static
  Python bool) when ``remat == when``, else ``cls``. Names and variables are those of ``cls``."""
  if remat != when:
    return cls
  return nn.remat(cls, static_argnums=(2,), policy=REMAT_POLICY)


def make_temporal_remat(kind: str, remat: str, *, dtype: Any, name: str,
                        **options: Any) -> Optional[nn.Module]:
  """:func:`dtf_jax.layers.temporal.make_temporal`, rematerialised when ``remat == 'dtf'``.
  Call the result positionally, ``module(x, train)``."""
  return make_temporal(kind, dtype=dtype, name=name,
                       wrap=lambda cls: remat_class(cls, remat, when='dtf'), **options)

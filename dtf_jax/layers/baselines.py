"""Time-domain temporal modules that the paper compares DTF with, channels-last.

Shapes: ``B`` batch, ``T`` time steps, ``H W`` space, ``C`` channels. Each module maps
``B T H W C -> B T H W C``, is called as ``module(x, train)``, computes in ``dtype`` with float32
parameters, and (except the parameter-free temporal shift) adds its output to ``x`` scaled by a
per-channel ``alpha`` initialised to zero, so that it starts as the exact identity, as the DTF
block does. Their convolutions and matmuls run under :data:`BASELINE_SCOPE` and their elementwise
products under ``COUNTED_SCOPE`` inside it (counted as ``temporal_conv`` and
``temporal_elementwise`` by ``dtf_jax.flops``). Which paper row each one reproduces:
``dtf_jax.layers.temporal``.
"""

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from dtf_jax.layers.aggregation import COUNTED_SCOPE, neighbour_dots, shift_to_previous_frame
from dtf_jax.layers.conv import FrameConv

# The baselines' operations run under this scope (see dtf_jax/flops.py).
BASELINE_SCOPE = 'temporal_baseline'

# Kaiming normal, fan_out, as the backbones' convolutions.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def scaled_residual(module: nn.Module, x, y):
  """``x + alpha * y`` with ``alpha: C`` a parameter of ``module`` initialised to zero.

  ``x, y: B T H W C -> B T H W C`` in ``x.dtype`` (the sum in float32).
  """
  alpha = module.param('alpha', nn.initializers.zeros, (x.shape[-1],), jnp.float32)
  return (x.astype(jnp.float32) + alpha * y.astype(jnp.float32)).astype(x.dtype)


def pad_time(x, kernel_size: int):
  """Zero padding of ``K // 2`` on ``T``.  ``B T ... -> B T+2p ...``."""
  p = kernel_size // 2
  return jnp.pad(x, ((0, 0), (p, p)) + ((0, 0),) * (x.ndim - 2))


class TemporalConv(nn.Module):
  """A learned temporal convolution (``dtf_1d``).  ``B T H W C -> B T H W C``.

  ``y[t] = sum_k x[t + k - K//2] @ W[k]`` (zero padded in time), ``W: K C C`` (``kernel``), shared
  by every location; out ``x + alpha * y``. A full channel convolution, as the temporal
  ``K x 1 x 1`` conv of the factorised (2+1)D networks that the paper's "temporal conv" row
  stands for (a depthwise one would mix no channels, where DTF mixes them after its filter).
  """
  kernel_size: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.astype(self.dtype)
    k, time = self.kernel_size, x.shape[1]
    kernel = self.param('kernel', conv_init, (k, x.shape[-1], x.shape[-1]), jnp.float32)
    padded = pad_time(x, k)
    with jax.named_scope(BASELINE_SCOPE):  # K matmuls (a 3D conv is slow on XLA:CPU)
      y = sum(padded[:, i:i + time] @ kernel[i].astype(self.dtype) for i in range(k))
    return scaled_residual(self, x, y)


class DynamicTemporalConv(nn.Module):
  """A temporal convolution whose kernel is predicted per location (``dtf_1d_dynamic``).

  ``B T H W C -> B T H W C``. Like the DTF filter estimator, a 1x1 conv over the time-folded
  features (kernel ``tap_kernel: T C (C/S)*K``, no bias) gives, per location, ``K`` taps for each
  group of ``S = group_size`` channels, shared over time; ``y[t, c] = sum_k taps[c // S, k] *
  x[t + k - K//2, c]`` (zero padded); out ``x + alpha * y``. The taps are used as predicted, with
  no softmax, as DTF uses its estimated filter (a softmax would only allow smoothing kernels).
  """
  kernel_size: int = 3
  group_size: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    _, time, _, _, channels = x.shape
    if channels % self.group_size:
      raise ValueError(f'DynamicTemporalConv: channels C={channels} must be divisible by the '
                       f'group size {self.group_size}.')
    groups, k = channels // self.group_size, self.kernel_size
    x = x.astype(self.dtype)
    with jax.named_scope(BASELINE_SCOPE):
      kernel = self.param(
          'tap_kernel',
          nn.initializers.variance_scaling(2.0, 'fan_out', 'normal', in_axis=(0, 1), out_axis=-1),
          (time, channels, groups * k), jnp.float32)
      taps = jnp.einsum('bthwc,tco->bhwo', x, kernel.astype(self.dtype))
      taps = einops.rearrange(taps, 'b h w (g k) -> b 1 h w g 1 k', k=k)
      padded = einops.rearrange(pad_time(x, k), 'b t h w (g s) -> b t h w g s', g=groups)
      with jax.named_scope(COUNTED_SCOPE):
        y = sum(taps[..., i] * padded[:, i:i + time] for i in range(k))
    return scaled_residual(self, x, einops.rearrange(y, 'b t h w g s -> b t h w (g s)'))


class TemporalShift(nn.Module):
  """Temporal shift (``temporal_shift``, TSM).  ``B T H W C -> B T H W C``, no parameters.

  With ``n = C // fold_div``: channels ``[0, n)`` take the next frame's values (``y[t] = x[t+1]``),
  channels ``[n, 2n)`` the previous frame's (``y[t] = x[t-1]``), zeros where there is none; the
  rest are unchanged. TSM's recommended residual shift shifts inside the residual branch: here the
  module already sits inside the bottleneck branch (after its 3x3 conv, where TSM shifts before the
  first 1x1 conv), so it is the shift alone. It cannot start as the identity (nothing to learn).
  """
  fold_div: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.astype(self.dtype)
    n = x.shape[-1] // self.fold_div
    zeros = jnp.zeros_like(x[:, :1, ..., :n])
    from_next = jnp.concatenate([x[:, 1:, ..., :n], zeros], axis=1)
    from_previous = jnp.concatenate([zeros, x[:, :-1, ..., n:2 * n]], axis=1)
    return jnp.concatenate([from_next, from_previous, x[..., 2 * n:]], axis=-1)


def next_frame_correlation(x, kernel_size: int):
  """Correlation of each location with its ``K x K`` neighbourhood in the next frame.

  ``B T H W C -> B T H W K2`` (float32): ``out[t, h, w, i*K + j] = mean_c x[t, h, w, c] *
  x[t+1, h+i-K//2, w+j-K//2, c]``, zero outside the frame and for the last frame.
  """
  return neighbour_dots(x, shift_to_previous_frame(x), kernel_size) / x.shape[-1]


class Correlation(nn.Module):
  """Correlation features (``correlation``, after CorrNet).  ``B T H W C -> B T H W C``.

  The ``K2`` correlation map of frame ``t`` with frame ``t + 1`` (:func:`next_frame_correlation`)
  through a 1x1 conv ``K2 -> C`` (``proj``, no bias); out ``x + alpha * proj(corr)``. Simpler
  than CorrNet: one channel group (the mean over all channels), no dilation, no learned weights
  inside the correlation, the map of the next frame only, and a 1x1 conv instead of its
  spatio-temporal filtering of the map.
  """
  kernel_size: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.astype(self.dtype)
    with jax.named_scope(BASELINE_SCOPE):
      corr = next_frame_correlation(x, self.kernel_size)
      y = nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype, name='proj')(
          corr.astype(self.dtype))
    return scaled_residual(self, x, y)


def frame_differences(x):
  """``d[t] = x[t + 1] - x[t]`` for ``t < T - 1``, ``d[T - 1] = 0``.  ``B T ... -> B T ...``."""
  return jnp.concatenate([x[:, 1:] - x[:, :-1], jnp.zeros_like(x[:, :1])], axis=1)


class TemporalDifference(nn.Module):
  """Temporal differences (``temporal_difference``, after TDN).  ``B T H W C -> B T H W C``.

  Differences of adjacent frames' features (:func:`frame_differences`) through 1x1 ``C -> C/r``,
  ReLU, 3x3 spatial, ReLU, 1x1 ``C/r -> C`` (no bias, no norm); out ``x + alpha * y``. Simpler
  than TDN's short-term module: feature differences rather than stacked RGB differences around
  the frame, no spatial down/up-sampling, no attention path, one scale.
  """
  reduction: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    channels = x.shape[-1]
    hidden = max(channels // self.reduction, 1)
    x = x.astype(self.dtype)
    with jax.named_scope(BASELINE_SCOPE):
      y = nn.Dense(hidden, use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                   name='reduce')(frame_differences(x))
      y = FrameConv(hidden, (1, 3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init,
                    dtype=self.dtype, name='spatial')(nn.relu(y))
      y = nn.Dense(channels, use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                   name='expand')(nn.relu(y))
    return scaled_residual(self, x, y)

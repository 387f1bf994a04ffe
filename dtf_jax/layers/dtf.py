"""The Dynamic Temporal Filter (DTF) block, channels-last.

Shapes: ``B`` batch, ``T`` time steps, ``H W`` space, ``C`` channels, ``F = T // 2 + 1`` frequency
bins, ``K`` the frame-wise aggregation window (``K2 = K * K`` neighbours), ``G`` the filter
expansion factor. The semantics are those of the official implementation (see SPEC §1):

1. frame-wise aggregation: correlation of every location of frame ``t`` with its ``K x K``
   neighbourhood in the same frame, using frame ``max(t - 1, 0)`` as the query; softmax over the
   neighbourhood; attention-weighted aggregation; the aggregate of frame ``t + 1`` is added to frame
   ``t`` (the last frame gets nothing);
2. ``rfft`` along time (orthonormal, float32);
3. a grouped 1x1 filter estimator on ``[features, correlation]`` with time folded into channels,
   expanded ``G``-fold in place to a complex filter per channel, bin and location;
4. complex modulation, complex channel mixing, batch norm of the spectrum (real and imaginary
   parts pooled), scaling by ``alpha`` (zero at init, so the block starts as the identity);
5. ``irfft`` back to time and a residual: ``out = x + irfft(...) + bias``.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dtf_jax.layers.norm import BatchNorm

# Multiply-adds under this scope are elementwise ones that the FLOP counter should see
# (see dtf_jax/tools/flops.py); plain elementwise ops elsewhere are not counted.
COUNTED_SCOPE = 'counted_macs'


def _neighbour_slices(padded, kernel_size, height, width):
  """Yields the ``K2`` shifted views ``B T H W C`` of a spatially padded ``B T H+K-1 W+K-1 C``."""
  for i in range(kernel_size):
    for j in range(kernel_size):
      yield padded[:, :, i:i + height, j:j + width, :]


def _pad_space(x, kernel_size):
  p = kernel_size // 2
  return jnp.pad(x, ((0, 0), (0, 0), (p, p), (p, p), (0, 0)))


def frame_correlation(x, kernel_size: int):
  """Correlation of each location with its ``K x K`` neighbours.  ``B T H W C -> B T H W K2`` (f32).

  ``out[b, t, h, w, i*K + j] = mean_c x[b, max(t-1, 0), h, w, c] * x[b, t, h+i-K//2, w+j-K//2, c]``
  with zeros outside the frame (the official fixed weights are ``1 / C``).
  """
  _, _, height, width, channels = x.shape
  query = jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)
  padded = _pad_space(x, kernel_size)
  with jax.named_scope(COUNTED_SCOPE):
    corr = [jnp.sum(query * n, axis=-1, dtype=jnp.float32)
            for n in _neighbour_slices(padded, kernel_size, height, width)]
  return jnp.stack(corr, axis=-1) / channels


def frame_aggregation(x, attention, kernel_size: int):
  """Attention-weighted sum over each ``K x K`` neighbourhood.

  ``x: B T H W C``, ``attention: B T H W K2`` -> ``B T H W C``. Uses ``K2`` shifted slices of one
  padded tensor; no ``K2``-fold copy of the feature map is built.
  """
  _, _, height, width, _ = x.shape
  padded = _pad_space(x, kernel_size)
  out = None
  with jax.named_scope(COUNTED_SCOPE):
    for k, n in enumerate(_neighbour_slices(padded, kernel_size, height, width)):
      term = attention[..., k:k + 1] * n
      out = term if out is None else out + term
  return out


def shift_to_previous_frame(x):
  """``y[:, t] = x[:, t + 1]`` for ``t < T - 1`` and ``y[:, T - 1] = 0``.  ``B T ... -> B T ...``."""
  return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


def expand_filter(g, channels: int, num_bins: int, group_factor: int):
  """Expands the estimator output ``B H W (C*F*2/G)`` to the complex filter ``B F H W C``.

  Each estimator channel is repeated ``G`` times in place (the official ordering), so
  ``filter[b, f, h, w, c] = g[(c*2F + 2f) // G] + 1j * g[(c*2F + 2f + 1) // G]``.
  """
  b, h, w, _ = g.shape
  full = jnp.repeat(g, group_factor, axis=-1).reshape(b, h, w, channels, num_bins, 2)
  full = jnp.transpose(full, (0, 4, 1, 2, 3, 5))
  return jax.lax.complex(full[..., 0], full[..., 1])


class DTFBlock(nn.Module):
  """The DTF block.  ``B T H W C -> B T H W C``.

  Attributes:
    kernel_size: ``K`` of the frame-wise aggregation window.
    group_factor: ``G``; ``C * (T//2 + 1) * 2`` must be divisible by it.
    dtype: compute dtype of the spatial part; the spectral part (FFTs, modulation, mixing, norm)
      always runs in float32.
  """
  kernel_size: int = 3
  group_factor: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    batch, time, height, width, channels = x.shape
    k2 = self.kernel_size ** 2
    bins = time // 2 + 1
    if (channels * bins * 2) % self.group_factor:
      raise ValueError(
          f'DTFBlock: channels * (T//2 + 1) * 2 = {channels} * {bins} * 2 must be divisible by the '
          f'group factor G={self.group_factor}.')
    estimator_out = channels * bins * 2 // self.group_factor
    x = x.astype(self.dtype)

    # 1. Frame-wise aggregation.
    corr = frame_correlation(x, self.kernel_size)
    attention = jax.nn.softmax(corr, axis=-1).astype(self.dtype)
    aggregated = x + shift_to_previous_frame(frame_aggregation(x, attention, self.kernel_size))

    # 2. Spectrum along time.
    spectrum = jnp.fft.rfft(aggregated.astype(jnp.float32), axis=1, norm='ortho')

    # 3. Filter estimator: 1x1 conv over (time x [features, correlation]).
    kernel = self.param(
        'filter_kernel',
        nn.initializers.variance_scaling(2.0, 'fan_out', 'normal', in_axis=(0, 1), out_axis=-1),
        (time, channels + k2, estimator_out), jnp.float32)
    kernel = kernel.astype(self.dtype)
    g = (jnp.einsum('bthwc,tco->bhwo', aggregated, kernel[:, :channels])
         + jnp.einsum('bthwk,tko->bhwo', corr.astype(self.dtype), kernel[:, channels:]))
    filt = expand_filter(g.astype(jnp.float32), channels, bins, self.group_factor)

    # 4. Modulation, complex channel mixing (weight [real|imag, C_in, C_out]), spectrum norm.
    with jax.named_scope(COUNTED_SCOPE):
      modulated = spectrum * filt
    mix = self.param('mix_kernel', nn.initializers.normal(0.02), (2, channels, channels),
                     jnp.float32)
    mixed = jnp.einsum('bfhwc,cd->bfhwd', modulated, jax.lax.complex(mix[0], mix[1]))
    parts = jnp.stack([mixed.real, mixed.imag], axis=-2)  # B F H W 2 C
    parts = BatchNorm(use_affine=False, dtype=jnp.float32, name='spectrum_norm')(parts, train)
    alpha = self.param('alpha', nn.initializers.zeros, (channels,), jnp.float32)
    scaled = jax.lax.complex(parts[..., 0, :] * alpha, parts[..., 1, :] * alpha)

    # 5. Back to time, residual.
    out = jnp.fft.irfft(scaled, n=time, axis=1, norm='ortho')
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    return (x.astype(jnp.float32) + out + bias).astype(self.dtype)

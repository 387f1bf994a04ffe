"""The Dynamic Temporal Filter (DTF) block, channels-last.

Shapes: ``B`` batch, ``T`` time steps, ``H W`` space, ``C`` channels, ``F = T // 2 + 1`` frequency
bins, ``K`` the frame-wise aggregation window (``K2 = K * K`` neighbours), ``G`` the filter
expansion factor. The semantics are those of the official implementation (see SPEC §1):

1. frame-wise aggregation: correlation of every location of frame ``t`` with its ``K x K``
   neighbourhood in the same frame, using frame ``max(t - 1, 0)`` as the query; softmax over the
   neighbourhood; attention-weighted aggregation; the aggregate of frame ``t + 1`` is added to frame
   ``t`` (the last frame gets nothing);
2. ``rfft`` along time (orthonormal, float32; a direct DFT, see ``spectral.py``);
3. a grouped 1x1 filter estimator on ``[features, correlation]`` with time folded into channels,
   expanded ``G``-fold in place to a complex filter per channel, bin and location;
4. complex modulation, complex channel mixing, batch norm of the spectrum (real and imaginary
   parts pooled), scaling by ``alpha`` (zero at init, so the block starts as the identity);
5. ``irfft`` back to time and a residual: ``out = x + irfft(...) + bias``.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dtf_jax.layers.norm import BatchNorm
from dtf_jax.layers.spectral import irfft_time, rfft_time

# Multiply-adds under this scope are elementwise ones that the FLOP counter should see
# (see dtf_jax/flops.py); plain elementwise ops elsewhere are not counted.
COUNTED_SCOPE = 'counted_macs'
# The complex channel mixing runs as a real matmul under this scope (counted as 'dtf_mixing').
MIXING_SCOPE = 'complex_mixing'


# The K x K neighbourhood ops below are written as K2 shifted slices of one zero-padded tensor.
# Neighbour k = (i, j) of location (h, w) is (h + i - K//2, w + j - K//2). The two primitives,
# neighbour_dots and neighbour_sum, have hand-written VJPs built from each other and from
# neighbour_scatter, so both passes hold O(1) copies of the feature map; the K2 dot products run
# as a loop so that no K2-fold copy is ever live.


def _pad_space(x, kernel_size):
  p = kernel_size // 2
  return jnp.pad(x, ((0, 0), (0, 0), (p, p), (p, p), (0, 0)))


def _slice_neighbour(padded, k, kernel_size, shape):
  i, j = k // kernel_size, k % kernel_size
  return jax.lax.dynamic_slice(padded, (0, 0, i, j, 0), shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def neighbour_dots(a, x, kernel_size: int):
  """``out[..., h, w, k] = sum_c a[..., h, w, c] * x[..., h+i-K//2, w+j-K//2, c]`` (zero padded).

  ``a, x: B T H W C -> B T H W K2`` (float32 accumulation).
  """
  padded = _pad_space(x, kernel_size)

  def one_neighbour(_, k):
    n = _slice_neighbour(padded, k, kernel_size, x.shape)
    with jax.named_scope(COUNTED_SCOPE):
      return None, jnp.sum(a * n, axis=-1, dtype=jnp.promote_types(a.dtype, jnp.float32))

  _, out = jax.lax.scan(one_neighbour, None, jnp.arange(kernel_size ** 2))
  return jnp.moveaxis(out, 0, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def neighbour_sum(w, x, kernel_size: int):
  """``out[..., h, w, c] = sum_k w[..., h, w, k] * x[..., h+i-K//2, w+j-K//2, c]``.

  ``w: B T H W K2``, ``x: B T H W C -> B T H W C``.
  """
  _, _, height, width, _ = x.shape
  padded = _pad_space(x, kernel_size)
  out = 0
  with jax.named_scope(COUNTED_SCOPE):
    for k in range(kernel_size ** 2):
      i, j = k // kernel_size, k % kernel_size
      out = out + w[..., k:k + 1] * padded[:, :, i:i + height, j:j + width, :]
  return out.astype(x.dtype)


def neighbour_scatter(w, g, kernel_size: int):
  """Transpose of :func:`neighbour_sum` in ``x``: each ``w_k g`` is added back at the location
  of neighbour ``k``: ``out[h', w'] = sum_k (w_k g)[h' - i + K//2, w' - j + K//2]``.

  ``w: B T H W K2``, ``g: B T H W C -> B T H W C``.
  """
  _, _, height, width, _ = g.shape
  w_padded, g_padded = _pad_space(w, kernel_size), _pad_space(g, kernel_size)
  out = 0
  for k in range(kernel_size ** 2):
    a, b = kernel_size - 1 - k // kernel_size, kernel_size - 1 - k % kernel_size
    out = out + (w_padded[:, :, a:a + height, b:b + width, k:k + 1]
                 * g_padded[:, :, a:a + height, b:b + width, :])
  return out.astype(g.dtype)


def _dots_fwd(a, x, kernel_size):
  return neighbour_dots(a, x, kernel_size), (a, x)


def _dots_bwd(kernel_size, residuals, g):
  a, x = residuals
  g = g.astype(a.dtype)
  return neighbour_sum(g, x, kernel_size), neighbour_scatter(g, a, kernel_size)


def _sum_fwd(w, x, kernel_size):
  return neighbour_sum(w, x, kernel_size), (w, x)


def _sum_bwd(kernel_size, residuals, g):
  w, x = residuals
  dw = neighbour_dots(g.astype(x.dtype), x, kernel_size).astype(w.dtype)
  return dw, neighbour_scatter(w, g, kernel_size)


neighbour_dots.defvjp(_dots_fwd, _dots_bwd)
neighbour_sum.defvjp(_sum_fwd, _sum_bwd)


def frame_correlation(x, kernel_size: int):
  """Correlation of each location with its ``K x K`` neighbours.  ``B T H W C -> B T H W K2`` (f32).

  ``out[b, t, h, w, i*K + j] = mean_c x[b, max(t-1, 0), h, w, c] * x[b, t, h+i-K//2, w+j-K//2, c]``
  with zeros outside the frame (the official fixed weights are ``1 / C``).
  """
  query = jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)
  return neighbour_dots(query, x, kernel_size) / x.shape[-1]


def frame_aggregation(x, attention, kernel_size: int):
  """Attention-weighted sum over each ``K x K`` neighbourhood.

  ``x: B T H W C``, ``attention: B T H W K2`` -> ``B T H W C``. No ``K2``-fold copy of the
  feature map is built (see :func:`neighbour_sum`).
  """
  return neighbour_sum(attention.astype(x.dtype), x, kernel_size)


def shift_to_previous_frame(x):
  """``y[:, t] = x[:, t + 1]`` for ``t < T - 1`` and ``y[:, T - 1] = 0``.  ``B T ... -> B T ...``."""
  return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


def expand_filter(g, channels: int, num_bins: int, group_factor: int):
  """Expands the estimator output ``B H W (C*F*2/G)`` to the filter ``B F H W C 2`` (real, imag).

  Each estimator channel is repeated ``G`` times in place (the official ordering), so
  ``filter[b, f, h, w, c, r] = g[b, h, w, (c*2F + 2f + r) // G]``.
  """
  b, h, w, _ = g.shape
  full = jnp.repeat(g, group_factor, axis=-1).reshape(b, h, w, channels, num_bins, 2)
  return jnp.transpose(full, (0, 4, 1, 2, 3, 5))


def complex_mixing(real, imag, kernel):
  """Complex channel mixing ``(real + i imag) @ (kernel[0] + i kernel[1])`` as ONE real matmul.

  ``real, imag: ... C_in``, ``kernel: 2 C_in C_out`` -> ``... 2 C_out`` (real, imag). The input
  ``[real, imag]`` times ``[[Wr, Wi], [-Wi, Wr]]`` is 4 real multiply-adds per complex one.
  """
  wr, wi = kernel[0], kernel[1]
  block = jnp.concatenate([jnp.concatenate([wr, wi], axis=1),
                           jnp.concatenate([-wi, wr], axis=1)], axis=0)
  with jax.named_scope(MIXING_SCOPE):
    out = jnp.concatenate([real, imag], axis=-1) @ block
  return out.reshape(out.shape[:-1] + (2, kernel.shape[-1]))


class DTFBlock(nn.Module):
  """The DTF block.  ``B T H W C -> B T H W C``.

  Attributes:
    kernel_size: ``K`` of the frame-wise aggregation window.
    group_factor: ``G``; ``C * (T//2 + 1) * 2`` must be divisible by it.
    dtype: compute dtype of the spatial part; the spectral part (DFTs, modulation, mixing, norm)
      always runs in float32.
  """
  kernel_size: int = 3
  group_factor: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    _, time, _, _, channels = x.shape
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
    s_re, s_im = rfft_time(aggregated)  # float32

    # 3. Filter estimator: 1x1 conv over (time x [features, correlation]).
    kernel = self.param(
        'filter_kernel',
        nn.initializers.variance_scaling(2.0, 'fan_out', 'normal', in_axis=(0, 1), out_axis=-1),
        (time, channels + k2, estimator_out), jnp.float32)
    kernel = kernel.astype(self.dtype)
    g = (jnp.einsum('bthwc,tco->bhwo', aggregated, kernel[:, :channels])
         + jnp.einsum('bthwk,tko->bhwo', corr.astype(self.dtype), kernel[:, channels:]))
    filt = expand_filter(g.astype(jnp.float32), channels, bins, self.group_factor)

    # 4. Complex modulation (real arithmetic), complex channel mixing (weight [real|imag, C_in,
    # C_out]), batch norm of the spectrum with real and imaginary parts pooled.
    f_re, f_im = filt[..., 0], filt[..., 1]
    with jax.named_scope(COUNTED_SCOPE):
      m_re, m_im = s_re * f_re - s_im * f_im, s_re * f_im + s_im * f_re
    mix = self.param('mix_kernel', nn.initializers.normal(0.02), (2, channels, channels),
                     jnp.float32)
    parts = complex_mixing(m_re, m_im, mix)  # B F H W 2 C
    parts = BatchNorm(use_affine=False, dtype=jnp.float32, name='spectrum_norm')(parts, train)
    alpha = self.param('alpha', nn.initializers.zeros, (channels,), jnp.float32)

    # 5. Back to time, residual.
    out = irfft_time(parts[..., 0, :] * alpha, parts[..., 1, :] * alpha, time)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    return (x.astype(jnp.float32) + out + bias).astype(self.dtype)

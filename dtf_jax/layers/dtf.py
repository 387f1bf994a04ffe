"""The Dynamic Temporal Filter (DTF) block, channels-last.

Shapes: ``B`` batch, ``T`` time steps, ``H W`` space, ``C`` channels, ``F = T // 2 + 1`` frequency
bins, ``K`` the frame-wise aggregation window (``K2 = K * K`` neighbours), ``G`` the filter
expansion factor. The semantics are those of the official implementation (see SPEC §1):

1. frame-wise aggregation: correlation of every location of frame ``t`` with its ``K x K``
   neighbourhood in the same frame, using frame ``max(t - 1, 0)`` as the query; softmax over the
   neighbourhood; attention-weighted aggregation; the aggregate of frame ``t + 1`` is added to frame
   ``t`` (the last frame gets nothing);
2. ``rfft`` along time (orthonormal, float32; direct, as a matmul or ``jnp.fft``: ``spectral.py``);
3. a grouped 1x1 filter estimator on ``[features, correlation]`` with time folded into channels,
   expanded ``G``-fold in place to a complex filter per channel, bin and location;
4. complex modulation, complex channel mixing, batch norm of the spectrum (real and imaginary
   parts pooled), scaling by ``alpha`` (zero at init, so the block starts as the identity);
5. ``irfft`` back to time and a residual: ``out = x + irfft(...) + bias``.

Ablation switches (the paper's Table 1, see ``dtf_jax.layers.temporal``): ``aggregation=False``
takes the spectrum (and the estimator's features) of ``x`` itself; ``correlation=False`` gives the
estimator the features only (``C`` input rows, not ``C + K2``); ``fixed_filter=True`` replaces the
estimated filter by a learned static one per bin and channel (``F C``, complex), so the modulation
is a fixed circular convolution along time.
"""

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from dtf_jax.layers.aggregation import COUNTED_SCOPE, frame_correlation, frame_wise_aggregation
from dtf_jax.layers.norm import BatchNorm
from dtf_jax.layers.spectral import irfft_time, rfft_time

# The complex channel mixing runs as a real matmul under this scope (counted as 'dtf_mixing').
MIXING_SCOPE = 'complex_mixing'
# With the 'intermediates' collection mutable, the block sows its filter ``B F H W C 2`` (real,
# imag; the static filter broadcast over batch and space) under this name.
FILTER_NAME = 'frequency_filter'


def expand_filter(g, channels: int, num_bins: int, group_factor: int):
  """Expands the estimator output ``B H W (C*F*2/G)`` to the filter ``2 B F H W C`` (real, imag).

  Each estimator channel is repeated ``G`` times in place (the official ordering), so
  ``filter[r, b, f, h, w, c] = g[b, h, w, (c*2F + 2f + r) // G]``. Real and imaginary parts are
  the major axis: a minor axis of 2 would be padded to a whole TPU tile.
  """
  full = einops.repeat(g, 'b h w o -> b h w (o g)', g=group_factor)
  return einops.rearrange(full, 'b h w (c f r) -> r b f h w c', c=channels, f=num_bins, r=2)


def modulate(s_re, s_im, f_re, f_im):
  """Complex product ``(s_re + i s_im) (f_re + i f_im)`` in real arithmetic, 4 real MACs each.

  Any broadcastable shapes (``B F H W C`` spectrum, filter ``B F H W C`` or ``F 1 1 C``) -> the
  broadcast shape, as ``(re, im)``.
  """
  with jax.named_scope(COUNTED_SCOPE):
    return s_re * f_re - s_im * f_im, s_re * f_im + s_im * f_re


def all_pass_filter(_, shape, dtype=jnp.float32):
  """Initial static filter ``F C 2``: 1 + 0i in every bin (the modulation starts as identity)."""
  return jnp.stack([jnp.ones(shape[:-1], dtype), jnp.zeros(shape[:-1], dtype)], axis=-1)


def complex_mixing(real, imag, kernel):
  """Complex channel mixing ``(real + i imag) @ (kernel[0] + i kernel[1])`` as ONE real matmul.

  ``real, imag: ... C_in``, ``kernel: 2 C_in C_out`` -> ``2 ... C_out`` (real, imag: the major
  axis). The input ``[real, imag]`` times ``[[Wr, Wi], [-Wi, Wr]]`` is 4 real multiply-adds per
  complex one; float32 products (``Precision.HIGHEST``; a TPU would round them to bfloat16).
  """
  wr, wi = kernel[0], kernel[1]
  block = jnp.stack([jnp.concatenate([wr, -wi], axis=0),
                     jnp.concatenate([wi, wr], axis=0)], axis=1)  # 2C_in, 2 (re, im), C_out
  with jax.named_scope(MIXING_SCOPE):
    return jnp.einsum('...k,kro->r...o', jnp.concatenate([real, imag], axis=-1), block,
                      precision=jax.lax.Precision.HIGHEST)


class DTFBlock(nn.Module):
  """The DTF block.  ``B T H W C -> B T H W C``.

  Attributes:
    kernel_size: ``K`` of the frame-wise aggregation window.
    group_factor: ``G``; ``C * (T//2 + 1) * 2`` must be divisible by it.
    dtype: compute dtype of the spatial part; the spectral part (DFTs, modulation, mixing, norm)
      always runs in float32.
    fa_impl: implementation of the frame-wise aggregation, one of
      ``dtf_jax.layers.aggregation.FA_IMPLS`` (same values; ``'auto'`` picks per platform). The
      correlation alone (``aggregation=False, correlation=True``) always runs as ``'scan'``.
    spectral_impl: implementation of the time DFTs, one of
      ``dtf_jax.layers.spectral.SPECTRAL_IMPLS`` (same values; ``'auto'`` picks per platform).
    aggregation: apply the frame-wise aggregation; if False the spectrum and the estimator's
      features are those of the block input.
    correlation: feed the correlation map to the filter estimator (its kernel then has
      ``C + K2`` input rows per time step, else ``C``).
    fixed_filter: a learned static filter ``F C`` (complex, all-pass at init, parameter
      ``static_filter: F C 2``) instead of the estimated one; no estimator, so ``correlation``
      and ``group_factor`` play no part.
  """
  kernel_size: int = 3
  group_factor: int = 16
  dtype: Any = jnp.float32
  fa_impl: str = 'auto'
  spectral_impl: str = 'auto'
  aggregation: bool = True
  correlation: bool = True
  fixed_filter: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    _, time, _, _, channels = x.shape
    k2 = self.kernel_size ** 2
    bins = time // 2 + 1
    estimated = not self.fixed_filter
    if estimated and (channels * bins * 2) % self.group_factor:
      raise ValueError(
          f'DTFBlock: channels * (T//2 + 1) * 2 = {channels} * {bins} * 2 must be divisible by the '
          f'group factor G={self.group_factor}.')
    estimator_out = channels * bins * 2 // self.group_factor
    x = x.astype(self.dtype)

    # 1. Frame-wise aggregation (or only the correlation that it computes, or neither).
    use_corr = estimated and self.correlation
    if self.aggregation:
      aggregated, corr = frame_wise_aggregation(x, self.kernel_size, self.fa_impl)
    else:
      aggregated = x
      corr = frame_correlation(x, self.kernel_size) if use_corr else None

    # 2. Spectrum along time.
    s_re, s_im = rfft_time(aggregated, self.spectral_impl)  # float32

    # 3. Filter: estimated per location by a 1x1 conv over (time x [features, correlation]), or
    # static per bin and channel.
    if estimated:
      kernel = self.param(
          'filter_kernel',
          nn.initializers.variance_scaling(2.0, 'fan_out', 'normal', in_axis=(0, 1), out_axis=-1),
          (time, channels + k2 if use_corr else channels, estimator_out), jnp.float32)
      kernel = kernel.astype(self.dtype)
      g = jnp.einsum('bthwc,tco->bhwo', aggregated, kernel[:, :channels])
      if use_corr:
        g = g + jnp.einsum('bthwk,tko->bhwo', corr.astype(self.dtype), kernel[:, channels:])
      f_re, f_im = expand_filter(g.astype(jnp.float32), channels, bins, self.group_factor)
    else:
      filt = self.param('static_filter', all_pass_filter, (bins, channels, 2), jnp.float32)
      f_re, f_im = filt[:, None, None, :, 0], filt[:, None, None, :, 1]  # F 1 1 C
    if self.is_mutable_collection('intermediates'):  # tools.visualize; free otherwise
      shape = s_re.shape
      self.sow('intermediates', FILTER_NAME,
               jnp.stack([jnp.broadcast_to(f_re, shape), jnp.broadcast_to(f_im, shape)], -1))

    # 4. Complex modulation (real arithmetic), complex channel mixing (weight [real|imag, C_in,
    # C_out]), batch norm of the spectrum with real and imaginary parts pooled.
    m_re, m_im = modulate(s_re, s_im, f_re, f_im)
    mix = self.param('mix_kernel', nn.initializers.normal(0.02), (2, channels, channels),
                     jnp.float32)
    parts = complex_mixing(m_re, m_im, mix)  # 2 B F H W C
    parts = BatchNorm(use_affine=False, dtype=jnp.float32, name='spectrum_norm')(parts, train)
    alpha = self.param('alpha', nn.initializers.zeros, (channels,), jnp.float32)

    # 5. Back to time, residual.
    out = irfft_time(parts[0] * alpha, parts[1] * alpha, time, self.spectral_impl)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    return (x.astype(jnp.float32) + out + bias).astype(self.dtype)

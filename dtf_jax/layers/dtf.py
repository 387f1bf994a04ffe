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

import dataclasses
import functools
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from dtf_jax.layers.aggregation import COUNTED_SCOPE, frame_correlation, frame_wise_aggregation
from dtf_jax.layers.norm import RunningStatistics, batch_moments
from dtf_jax.layers.platform import per_platform
from dtf_jax.layers.spectral import irfft_time, rfft_time, spectrum_count

# The complex channel mixing runs as a real matmul under this scope (counted as 'dtf_mixing').
MIXING_SCOPE = 'complex_mixing'
# With the 'intermediates' collection mutable, the block sows its filter ``B F H W C 2`` (real,
# imag; the static filter broadcast over batch and space) under this name.
FILTER_NAME = 'frequency_filter'
# How the whole block runs (``block_impl``): 'parts' composes the frame-wise aggregation
# (``fa_impl``), the time DFTs (``spectral_impl``) and XLA ops; 'fused' runs the full block
# (aggregation, correlation, estimated filter) as Pallas TPU kernels, forward and backward
# (``dtf_pallas.py``: about 3 passes over the feature map forward, 10 in a training step), where
# its row tiles fit VMEM beside its weights, else 'parts'. The GPU runs 'parts'; the CPU
# interprets 'fused' (tests).
BLOCK_IMPLS = ('auto', 'parts', 'fused')
# What 'auto' runs per platform. TPU: the compiled programs' bytes accessed (v5e, bfloat16, batch 4
# per chip): one block at 4x56x56x64 moves 1.13 GB forward and 3.78 GB with its gradient as
# 'parts', 0.05 and 0.11 GB fused; DTF-R50 / C2D-R50 at 16x224², 1.37 forward and 1.20 per
# train step (5.1 and 3.7 with 'parts').
AUTO_BLOCK_IMPL = {'cpu': 'parts', 'gpu': 'parts', 'tpu': 'fused'}
EPSILON = 1e-5  # the spectrum norm's (torch.nn.BatchNorm's default)


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


def resolve_block_impl(impl: str, kind: str) -> str:
  """``impl`` with ``'auto'`` replaced by the choice for ``kind`` ('cpu', 'gpu', 'tpu')."""
  if impl not in BLOCK_IMPLS:
    raise ValueError(f'block_impl={impl!r} is not one of {BLOCK_IMPLS}.')
  chosen = AUTO_BLOCK_IMPL.get(kind, 'parts') if impl == 'auto' else impl
  return 'parts' if kind == 'gpu' else chosen


@dataclasses.dataclass(frozen=True)
class _Maths:
  """The static settings of the block's computation."""
  kernel_size: int
  group_factor: int
  dtype: Any
  fa_impl: str
  spectral_impl: str
  aggregation: bool
  correlation: bool
  fixed_filter: bool


def _parts(maths: _Maths, train: bool, x, weight, mix, alpha, bias, running_mean, running_var):
  """The block composed of its parts: ``(out, mean, var, (f_re, f_im))`` with the statistics the
  spectrum was normalised with (the batch's in training) and the filter ``B F H W C`` (or
  ``F 1 1 C``). ``weight``: the estimator kernel, or the static filter with ``fixed_filter``."""
  _, time, _, _, channels = x.shape
  bins = time // 2 + 1
  use_corr = not maths.fixed_filter and maths.correlation

  # 1. Frame-wise aggregation (or only the correlation that it computes, or neither).
  if maths.aggregation:
    aggregated, corr = frame_wise_aggregation(x, maths.kernel_size, maths.fa_impl)
  else:
    aggregated = x
    corr = frame_correlation(x, maths.kernel_size) if use_corr else None

  # 2. Spectrum along time.
  s_re, s_im = rfft_time(aggregated, maths.spectral_impl)  # float32

  # 3. Filter: estimated per location by a 1x1 conv over (time x [features, correlation]), or
  # static per bin and channel.
  if not maths.fixed_filter:
    kernel = weight.astype(maths.dtype)
    g = jnp.einsum('bthwc,tco->bhwo', aggregated, kernel[:, :channels])
    if use_corr:
      g = g + jnp.einsum('bthwk,tko->bhwo', corr.astype(maths.dtype), kernel[:, channels:])
    f_re, f_im = expand_filter(g.astype(jnp.float32), channels, bins, maths.group_factor)
  else:
    f_re, f_im = weight[:, None, None, :, 0], weight[:, None, None, :, 1]  # F 1 1 C

  # 4. Complex modulation (real arithmetic), complex channel mixing (weight [real|imag, C_in,
  # C_out]), batch norm of the spectrum with real and imaginary parts pooled.
  m_re, m_im = modulate(s_re, s_im, f_re, f_im)
  parts = complex_mixing(m_re, m_im, mix)  # 2 B F H W C
  if train:
    mean, var = batch_moments(parts)
  else:
    mean, var = running_mean, running_var
  parts = (parts - mean) * jax.lax.rsqrt(var + EPSILON)

  # 5. Back to time, residual.
  out = irfft_time(parts[0] * alpha, parts[1] * alpha, time, maths.spectral_impl)
  return (x.astype(jnp.float32) + out + bias).astype(maths.dtype), mean, var, (f_re, f_im)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fused(maths: _Maths, train: bool, fused_backward: bool, interpret: bool, x, kernel, mix,
           alpha, bias, running_mean, running_var):
  """The full block by the Pallas kernels: ``(out, mean, var)`` as :func:`_parts` gives them.
  Its gradient in training is the kernels' (``fused_backward``; the cotangents of the
  statistics, which only update the running ones, are taken as zero), else that of
  :func:`_parts` (forward and backward)."""
  del fused_backward
  settings = dict(kernel_size=maths.kernel_size, group_factor=maths.group_factor,
                  dtype=maths.dtype, interpret=interpret)
  if train:
    count = spectrum_count(x.shape)
    sums = dtf_pallas().spectrum_moments(x, kernel, mix, running_mean, **settings).sum(axis=0)
    shifted_mean = sums[0] / count
    mean = running_mean + shifted_mean
    var = jnp.maximum(sums[1] / count - jnp.square(shifted_mean), 0.0)
  else:
    mean, var = running_mean, running_var
  out = dtf_pallas().block_output(x, kernel, mix, mean, var, alpha, bias, epsilon=EPSILON,
                                  **settings)
  return out, mean, var


def _fused_fwd(maths, train, fused_backward, interpret, *args):
  if train and fused_backward:
    outputs = _fused(maths, train, fused_backward, interpret, *args)
    x, kernel, mix, alpha = args[:4]
    return outputs, (x, kernel, mix, alpha, outputs[1], outputs[2])
  return jax.vjp(lambda *a: _parts(maths, train, *a)[:3], *args)


def _fused_bwd(maths, train, fused_backward, interpret, residuals, cotangents):
  if not (train and fused_backward):
    return residuals(cotangents)
  x, kernel, mix, alpha, mean, var = residuals
  grads = dtf_pallas().block_gradient(
      x, kernel, mix, mean, var, alpha, cotangents[0], kernel_size=maths.kernel_size,
      group_factor=maths.group_factor, dtype=maths.dtype, epsilon=EPSILON, interpret=interpret)
  return grads + (jnp.zeros_like(mean), jnp.zeros_like(var))


_fused.defvjp(_fused_fwd, _fused_bwd)


def dtf_pallas():
  from dtf_jax.layers import dtf_pallas as module  # Pallas is imported only where it is used
  return module


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
    block_impl: how the whole block runs, one of :data:`BLOCK_IMPLS` (``'auto'`` picks per
      platform): ``'parts'`` (``fa_impl``, ``spectral_impl`` and XLA) or ``'fused'`` (Pallas TPU
      kernels, forward and backward, where the block's shapes fit VMEM and the block is the full
      one; see :data:`BLOCK_IMPLS`).
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
  block_impl: str = 'auto'
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
    resolve_block_impl(self.block_impl, 'cpu')  # checks the name
    x = x.astype(self.dtype)
    use_corr = estimated and self.correlation
    if estimated:
      weight = self.param(
          'filter_kernel',
          nn.initializers.variance_scaling(2.0, 'fan_out', 'normal', in_axis=(0, 1), out_axis=-1),
          (time, channels + k2 if use_corr else channels, channels * bins * 2 // self.group_factor),
          jnp.float32)
    else:
      weight = self.param('static_filter', all_pass_filter, (bins, channels, 2), jnp.float32)
    mix = self.param('mix_kernel', nn.initializers.normal(0.02), (2, channels, channels),
                     jnp.float32)
    alpha = self.param('alpha', nn.initializers.zeros, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    statistics = RunningStatistics(name='spectrum_norm')
    running = statistics(channels)

    maths = _Maths(self.kernel_size, self.group_factor, self.dtype, self.fa_impl,
                   self.spectral_impl, self.aggregation, self.correlation, self.fixed_filter)
    args = (x, weight, mix, alpha, bias) + running
    sow = self.is_mutable_collection('intermediates')  # tools.visualize; free otherwise
    fusable = (self.aggregation and use_corr and not sow and
               dtf_pallas().supported(x.shape, self.dtype, self.kernel_size, self.group_factor))
    fused_backward = fusable and dtf_pallas().supported(
        x.shape, self.dtype, self.kernel_size, self.group_factor, backward=True)

    def choice(kind):
      chosen = resolve_block_impl(self.block_impl, kind) if fusable else 'parts'
      return chosen, chosen == 'fused' and kind == 'cpu'

    def run(option, *a):
      chosen, interpret = option
      if chosen == 'fused':
        return _fused(maths, train, fused_backward, interpret, *a)
      return _parts(maths, train, *a)[:3]

    if sow:
      out, mean, var, (f_re, f_im) = _parts(maths, train, *args)
      shape = (x.shape[0], bins) + x.shape[2:]
      self.sow('intermediates', FILTER_NAME,
               jnp.stack([jnp.broadcast_to(f_re, shape), jnp.broadcast_to(f_im, shape)], -1))
    else:
      out, mean, var = per_platform(choice, run, *args)
    if train:
      statistics(channels, (mean, var, spectrum_count(x.shape)))
    return out

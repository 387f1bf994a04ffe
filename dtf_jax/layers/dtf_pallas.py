"""The DTF block as Pallas (Mosaic TPU) kernels, forward and backward: the ``'fused'`` ``block_impl``.

Semantics are those of ``dtf.DTFBlock`` with aggregation, correlation and an estimated filter (the
full block). Every step of the block but the batch norm of the spectrum is local to a location
and its ``K x K`` neighbourhood in time-adjacent frames, so a kernel program holds a tile of rows
of one clip (``T R+2p W+2p C``, zero-padded, ``p = K // 2``; the whole clip where it fits VMEM)
and walks its rows; for each row it recomputes, in VMEM, the frame-wise aggregation and
correlation of every frame, the filter estimator, the spectrum, the modulation and the complex
channel mixing (:class:`_Row`), and only what the kernel is for leaves the chip's VMEM:

- :func:`spectrum_moments` (training): per clip, the sums of ``S2 - shift`` and
  ``(S2 - shift)**2`` over bins, real and imaginary parts, rows and columns, per channel (``S2``
  the mixed spectrum; ``shift`` a per-channel guess of the mean, the running mean, against
  cancellation);
- :func:`block_output`: ``x + bias - offset + irfft(Z @ W')``, where the batch norm and ``alpha``
  are folded into the mixing weights ``W'`` (scaled output channels) and a per-frame ``offset``
  (the irfft of the mean spectrum), and the mixing is applied after the inverse DFT
  (``P_t @ W'_re + Q_t @ W'_im`` with ``P = irfft(Z)``, ``Q = irfft(iZ)``: both are linear, on
  different axes);
- :func:`block_gradient` (training): a first kernel sums what the batch norm's gradient needs
  (``d_out``, ``u = irfft^T(d_out)`` and ``u * n`` per channel, ``n`` the normalised spectrum),
  a second one recomputes the row again and takes every step back: the input's gradient (the
  neighbourhoods' share scattered into a float32 VMEM accumulator of the tile and the ``p`` rows
  above and below it, which a small in-place kernel adds to the neighbouring tiles) and the
  weights' gradients, summed over the programs into one block.

A training step reads the padded clip four times and the output's cotangent twice, and writes
the output and the input's gradient once each (about 10 passes over the feature map, where the
block's XLA parts make hundreds on TPU); an eval forward pass reads and writes once each. The
arithmetic is float32 (``Precision.HIGHEST`` for the DFT-side matmuls: filter expansion, mixing
and their transposes); the estimator runs in the block's dtype as the XLA path does (the
aggregated features rounded to it first). The kernels recompute instead of storing: about twice
the block's FLOPs forward and three times backward, a good trade on TPUs, whose FLOP/s exceed
their bytes/s 240-fold (v5e).

VMEM: the kernels ask for half the chip's (``tpu_target.compile_chip``: the TPU that programs are
compiled for; XLA keeps buffers of its own in the rest), at least 16 MiB, and hold every weight
whole, once: the estimator's features in the compute dtype (as it runs), the 0/1 filter
expansion as channel blocks of 128 (:func:`expansion_blocks`), and in the gradient kernel the
weights' gradients as one float32 block for the whole grid. A clip whose smallest row tile does
not fit beside the weights and a row step's temporaries is not taken (:func:`supported`; the
block then runs its parts). On v5e every DTF-R50 block at 16 frames fits forward and backward;
of DTF-Swin-B at 64 frames (one clip per chip), stages 1 and 2 fit forward and backward, stage 3
forward only (evaluation), stage 4 (an estimator of 19M parameters) not at all. What a kernel
holds was checked against the compiler (v5e and v4) on those shapes: beyond the blocks and the
weights, the register allocator spills a row step's values into VMEM (51 MB for the stage-3
gradient, which is why it is left to the parts).

Shapes: ``x: B T H W C``; ``kernel: T (C + K2) O`` with ``O = 2 F C / G``, ``F = T // 2 + 1``;
``mix: 2 C C`` (real, imaginary; ``C_in C_out``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dtf_jax import tpu_target
from dtf_jax.layers.aggregation_pallas import per_batch_shard
from dtf_jax.layers.spectral import dft_matrices, spectrum_count

HIGHEST = jax.lax.Precision.HIGHEST
MIB = 2 ** 20


def vmem_limit() -> int:
  """The scoped VMEM that the kernels ask for: half the chip's that programs are compiled for
  (``tpu_target.compile_chip``; XLA keeps some of the rest for its own buffers), at least the
  compiler's default 16 MiB (all of v4's; also where the chip is unknown, as when the CPU
  interprets the kernels)."""
  chip = tpu_target.compile_chip()
  return max(16 * MIB, chip.vmem_bytes // 2 if chip else 0)


def vmem_budget() -> int:
  """VMEM for a program's blocks, weights and a row step's temporaries: the limit less 4 MiB for
  what the compiler adds."""
  return vmem_limit() - 4 * MIB


LANES = 128  # a TPU vector register's lanes: the expansion's channel blocks and windows


def expansion_matrices(channels: int, bins: int, group_factor: int):
  """``E: 2F O C`` (0/1), ``E[2f + r, o, c] = [o == (c * 2F + 2f + r) // G]``: the estimator
  output ``g: ... O`` to the filter's part ``(f, r)`` (``r`` 0 real, 1 imaginary) as ``g @ E``,
  the official in-place ``G``-fold repetition (see ``dtf.expand_filter``)."""
  out = channels * bins * 2 // group_factor
  matrices = np.zeros((2 * bins, out, channels), np.float32)
  for f in range(bins):
    for r in range(2):
      matrices[2 * f + r, (np.arange(channels) * 2 * bins + 2 * f + r) // group_factor,
               np.arange(channels)] = 1.0
  return matrices


@functools.lru_cache(maxsize=None)
def expansion_blocks(channels: int, bins: int, group_factor: int, lanes: int = LANES):
  """The nonzero blocks of :func:`expansion_matrices`: ``(E, starts, padded_out)``.

  Channel block ``b`` (``lanes`` channels; all ``C`` where ``C`` is not a multiple of ``lanes``)
  reads only the estimator outputs in a ``lanes``-aligned window ``starts[b] ..
  starts[b] + width``, so ``E: nb 2F width cb`` (0/1) holds each block's part of the dense
  matrix, and ``filter[..., block b] = g[..., window b] @ E[b]`` with ``g`` zero-padded to
  ``padded_out`` columns. For DTF-Swin-B's stage 4 (``C`` 1024, ``T`` 16) this is 8 blocks of
  ``18 x 256 x 128`` instead of ``18 x 1152 x 1024``. Where blocks would be no smaller (few bins)
  ``E`` is the dense matrix: ``1 2F O C``, ``starts = (0,)``, ``padded_out = O``."""
  out = channels * bins * 2 // group_factor
  padded_out = -(-out // lanes) * lanes
  parts = np.arange(2 * bins)

  def windows(block):
    firsts = [(b * block * 2 * bins) // group_factor for b in range(channels // block)]
    lasts = [((b + 1) * block * 2 * bins - 1) // group_factor for b in range(channels // block)]
    width = -(-max(last + 1 - first // lanes * lanes for first, last in zip(firsts, lasts))
              // lanes) * lanes
    # Aligned starts at or below each block's first output, the window inside padded_out.
    return [min(first // lanes * lanes, padded_out - width) for first in firsts], width
  block = lanes if channels % lanes == 0 else channels
  starts, width = windows(block)
  if width >= padded_out:  # no smaller than the dense matrix (few bins): the dense matrix
    return expansion_matrices(channels, bins, group_factor)[None], (0,), out
  matrices = np.zeros((len(starts), 2 * bins, width, block), np.float32)
  for b, start in enumerate(starts):
    c = b * block + np.arange(block)
    rows = (c[None, :] * 2 * bins + parts[:, None]) // group_factor - start  # 2F cb
    matrices[b, parts[:, None], rows, np.arange(block)[None, :]] = 1.0
  return matrices, tuple(starts), padded_out


def _expanded(g, expand_ref, part, starts):
  """The filter's part ``part`` (``2f + r``) from the estimator output ``g: W padded_out``:
  ``W C``, channel block by channel block (exact: one 1 per column of ``E``, and ``g`` holds
  values of ``E``'s dtype)."""
  width = expand_ref.shape[2]
  blocks = [_dot(g[:, s:s + width].astype(expand_ref.dtype), expand_ref[b, part])
            for b, s in enumerate(starts)]
  return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=-1)


class _Row:
  """What the forward pass computes for one row of a clip (lists over frames ``t``, neighbours
  ``k`` and bins ``f``; maps ``W C`` and per-location values ``W 1``, float32)."""

  def __init__(self, padded_ref, kx_ref, kc_ref, expand_ref, h, *, kernel_size, time, width,
               channels, dtype, starts):
    p = kernel_size // 2
    bins = time // 2 + 1
    self.frames = [padded_ref[t, p + h, pl.ds(p, width), :].astype(jnp.float32)
                   for t in range(time)]
    # Frame t's neighbours and their logits, the query being frame max(t - 1, 0).
    self.neighbours, self.logits = [], []
    for t in range(time):
      query = self.frames[max(t - 1, 0)]
      neighbours = [padded_ref[t, h + i, pl.ds(j, width), :].astype(jnp.float32)
                    for i in range(kernel_size) for j in range(kernel_size)]
      self.neighbours.append(neighbours)
      self.logits.append([jnp.sum(query * n, axis=-1, keepdims=True) / channels
                          for n in neighbours])
    # Frame-wise aggregation: frame t gets the aggregate of frame t + 1 (the last one nothing).
    self.attention = [None]
    self.aggregated = []
    for t in range(time):
      if t + 1 < time:
        logits = self.logits[t + 1]
        top = functools.reduce(jnp.maximum, logits)
        exps = [jnp.exp(v - top) for v in logits]
        total = functools.reduce(jnp.add, exps)
        attention = [e / total for e in exps]
        self.attention.append(attention)
        agg = functools.reduce(jnp.add, [a * n for a, n in zip(attention,
                                                                self.neighbours[t + 1])])
        self.aggregated.append((self.frames[t] + agg).astype(dtype).astype(jnp.float32))
      else:
        self.aggregated.append(self.frames[t])

    # Filter estimator (in the block's dtype), then the G-fold expansion as 0/1 matmuls.
    g_feat = functools.reduce(jnp.add, [
        jnp.dot(self.aggregated[t].astype(dtype), kx_ref[t].astype(dtype),
                preferred_element_type=jnp.float32) for t in range(time)])
    g_corr = functools.reduce(jnp.add, [
        self.logits[t][k] * kc_ref[t, k:k + 1, :]
        for t in range(time) for k in range(kernel_size ** 2)])
    self.g = (g_feat.astype(dtype) + g_corr.astype(dtype)).astype(jnp.float32)

    # Spectrum (orthonormal rfft along time), modulated by the filter: Z = S F.
    (cos, minus_sin), = dft_matrices('rfft', time)
    self.spectrum, self.filter, self.modulated = [], [], []
    for f in range(bins):
      s_re = functools.reduce(jnp.add, [self.aggregated[t] * float(cos[t, f])
                                        for t in range(time)])
      s_im = functools.reduce(jnp.add, [self.aggregated[t] * float(minus_sin[t, f])
                                        for t in range(time)])
      f_re = _expanded(self.g, expand_ref, 2 * f, starts)
      f_im = _expanded(self.g, expand_ref, 2 * f + 1, starts)
      self.spectrum.append((s_re, s_im))
      self.filter.append((f_re, f_im))
      self.modulated.append((s_re * f_re - s_im * f_im, s_re * f_im + s_im * f_re))


def _precision(a):
  """Float32 operands in full precision (``HIGHEST``); 16-bit ones as they are."""
  return HIGHEST if a.dtype == jnp.float32 else None


def _dot(a, b):
  """``a @ b``, accumulated in float32 (``W K @ K N``)."""
  return jnp.dot(a, b, precision=_precision(a), preferred_element_type=jnp.float32)


def _mixed(z_re, z_im, wr, wi):
  """The complex channel mixing ``(z_re + i z_im) @ (wr + i wi)``: ``(re, im)``."""
  return _dot(z_re, wr) - _dot(z_im, wi), _dot(z_re, wi) + _dot(z_im, wr)


def _clip_rows(main_ref, halo_ref, rows_ref):
  """The padded rows of this program's tile (``T R+2p W+2p C``): the main block alone, or (row
  tiles) the main block and the next ``2p`` rows, copied together into VMEM scratch."""
  if halo_ref is None:
    return main_ref
  rows = main_ref.shape[1]
  rows_ref[:, :rows] = main_ref[...]
  rows_ref[:, rows:] = halo_ref[...]
  return rows_ref


def _split(refs, tiled, inputs, outputs):
  """A kernel's refs -> (padded rows, [inputs...], [outputs...], [scratch...]), the padded rows
  of a tile gathered into the first scratch buffer (see :func:`_clip_rows`)."""
  main_ref, halo_ref = refs[0], refs[1] if tiled else None
  rest = refs[1 + tiled:]
  ins, outs, scratch = rest[:inputs], rest[inputs:inputs + outputs], rest[inputs + outputs:]
  padded_ref = _clip_rows(main_ref, halo_ref, scratch[0] if tiled else None)
  return padded_ref, ins, outs, scratch[tiled:]


def _moments_kernel(*refs, kernel_size, time, rows, width, channels, dtype, tiled, starts):
  padded_ref, ins, (out_ref,), _ = _split(refs, tiled, 5, 1)
  kx_ref, kc_ref, expand_ref, mix_ref, shift_ref = ins
  wr, wi = mix_ref[0], mix_ref[1]
  shift = shift_ref[...]  # 1 C

  def step(h, sums):
    total, squares = sums
    row = _Row(padded_ref, kx_ref, kc_ref, expand_ref, h, kernel_size=kernel_size, time=time,
               width=width, channels=channels, dtype=dtype, starts=starts)
    for z_re, z_im in row.modulated:
      for part in _mixed(z_re, z_im, wr, wi):
        part = part - shift
        total = total + jnp.sum(part, axis=0, keepdims=True)
        squares = squares + jnp.sum(part * part, axis=0, keepdims=True)
    return total, squares

  zeros = jnp.zeros((1, channels), jnp.float32)
  total, squares = jax.lax.fori_loop(0, rows, step, (zeros, zeros))
  out_ref[0:1, :] = total
  out_ref[1:2, :] = squares


def _output_kernel(*refs, kernel_size, time, rows, width, channels, dtype, tiled, starts):
  padded_ref, ins, (out_ref,), _ = _split(refs, tiled, 5, 1)
  kx_ref, kc_ref, expand_ref, mix_ref, offset_ref = ins
  p = kernel_size // 2
  wr, wi = mix_ref[0], mix_ref[1]  # scaled by the norm's inverse std and alpha
  (real,), (imag,) = dft_matrices('irfft', time)  # F T each

  def step(h, carry):
    spectrum = _Row(padded_ref, kx_ref, kc_ref, expand_ref, h, kernel_size=kernel_size,
                    time=time, width=width, channels=channels, dtype=dtype,
                    starts=starts).modulated
    for t in range(time):
      # irfft(Z) and irfft(iZ) at t, then the mixing: irfft(Z @ W) = P @ W_re + Q @ W_im.
      p_t = functools.reduce(jnp.add, [z_re * float(real[f, t]) + z_im * float(imag[f, t])
                                       for f, (z_re, z_im) in enumerate(spectrum)])
      q_t = functools.reduce(jnp.add, [z_re * float(imag[f, t]) - z_im * float(real[f, t])
                                       for f, (z_re, z_im) in enumerate(spectrum)])
      y = _dot(p_t, wr) + _dot(q_t, wi)
      x = padded_ref[t, p + h, pl.ds(p, width), :].astype(jnp.float32)
      out_ref[t, h] = (x + y + offset_ref[t]).astype(out_ref.dtype)
    return carry

  jax.lax.fori_loop(0, rows, step, 0)


def _dot_nt(a, b):
  """``a @ b.T``, accumulated in float32 (``W K``, ``N K`` -> ``W N``)."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a),
                             preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """``a.T @ b``, accumulated in float32 (``W K``, ``W N`` -> ``K N``): sums over the row's
  locations."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_precision(a),
                             preferred_element_type=jnp.float32)


def _placed(blocks, starts, columns):
  """The per-block cotangents ``W width`` of the estimator output's windows (see
  :func:`expansion_blocks`) summed into ``W columns``."""
  total = 0.0
  for piece, start in zip(blocks, starts):
    rows, width = piece.shape
    parts = [piece]
    if start:
      parts.insert(0, jnp.zeros((rows, start), jnp.float32))
    if columns - start - width:
      parts.append(jnp.zeros((rows, columns - start - width), jnp.float32))
    total = total + (jnp.concatenate(parts, axis=-1) if len(parts) > 1 else piece)
  return total


def _normalised(row, wr, wi, mean, inv_std):
  """Per bin, the normalised mixed spectrum ``(S2 - mean) / std`` as ``(re, im)``."""
  return [tuple((part - mean) * inv_std for part in _mixed(z_re, z_im, wr, wi))
          for z_re, z_im in row.modulated]


def _cotangent_spectrum(d_out, time):
  """``u = irfft^T(d_out)`` per bin, ``(re, im)``: the cotangent of the (scaled, normalised)
  spectrum that the inverse DFT reads."""
  (real,), (imag,) = dft_matrices('irfft', time)  # F T each
  return [(functools.reduce(jnp.add, [d_out[t] * float(real[f, t]) for t in range(time)]),
           functools.reduce(jnp.add, [d_out[t] * float(imag[f, t]) for t in range(time)]))
          for f in range(real.shape[0])]


def _grad_moments_kernel(*refs, kernel_size, time, rows, width, channels, dtype, tiled, starts):
  """Per tile: sums of ``d_out`` (the bias' gradient), of ``u`` and of ``u * n`` (``n`` the
  normalised spectrum; the sum is ``alpha``'s gradient), over bins, parts and locations."""
  padded_ref, ins, (out_ref,), _ = _split(refs, tiled, 6, 1)
  dout_ref, kx_ref, kc_ref, expand_ref, mix_ref, stats_ref = ins
  wr, wi = mix_ref[0], mix_ref[1]
  mean, inv_std = stats_ref[0:1, :], stats_ref[1:2, :]

  def step(h, sums):
    d_out = [dout_ref[t, h].astype(jnp.float32) for t in range(time)]
    row = _Row(padded_ref, kx_ref, kc_ref, expand_ref, h, kernel_size=kernel_size, time=time,
               width=width, channels=channels, dtype=dtype, starts=starts)
    total = functools.reduce(jnp.add, d_out)
    u_sum, un_sum = 0.0, 0.0
    for (u_re, u_im), (n_re, n_im) in zip(_cotangent_spectrum(d_out, time),
                                          _normalised(row, wr, wi, mean, inv_std)):
      u_sum = u_sum + u_re + u_im
      un_sum = un_sum + u_re * n_re + u_im * n_im
    return tuple(acc + jnp.sum(v, axis=0, keepdims=True)
                 for acc, v in zip(sums, (total, u_sum, un_sum)))

  zeros = jnp.zeros((1, channels), jnp.float32)
  sums = jax.lax.fori_loop(0, rows, step, (zeros,) * 3)
  for i, v in enumerate(sums):
    out_ref[i:i + 1, :] = v


def _grad_kernel(*refs, kernel_size, time, rows, width, channels, dtype, tiled, starts):
  """Per tile: the gradient in the clip (its rows, and the ``p`` rows above and below that its
  neighbourhoods reach); the tile's share of the weights' gradients is added to one float32 block
  for the whole grid (its programs run in sequence)."""
  p, k2 = kernel_size // 2, kernel_size ** 2
  padded_ref, ins, outs, (acc_ref,) = _split(refs, tiled, 6, 6)
  dout_ref, kx_ref, kc_ref, expand_ref, mix_ref, stats_ref = ins
  dx_ref, above_ref, below_ref, dkx_ref, dkc_ref, dmix_ref = outs
  wr, wi = mix_ref[0], mix_ref[1]
  mean, inv_std, alpha = stats_ref[0:1, :], stats_ref[1:2, :], stats_ref[2:3, :]
  mean_d, mean_dn = stats_ref[3:4, :], stats_ref[4:5, :]  # batch means of dn and dn * n
  (cos, minus_sin), = dft_matrices('rfft', time)
  block = channels // len(starts)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when((pl.program_id(0) == 0) & (pl.program_id(1) == 0))
  def _():  # the weights' gradients: one block for the whole grid, summed over its programs
    dkx_ref[...] = jnp.zeros(dkx_ref.shape, jnp.float32)
    dkc_ref[...] = jnp.zeros(dkc_ref.shape, jnp.float32)
    dmix_ref[...] = jnp.zeros(dmix_ref.shape, jnp.float32)

  def step(h, carry):
    d_out = [dout_ref[t, h].astype(jnp.float32) for t in range(time)]
    row = _Row(padded_ref, kx_ref, kc_ref, expand_ref, h, kernel_size=kernel_size, time=time,
               width=width, channels=channels, dtype=dtype, starts=starts)
    d_agg = [0.0] * time  # cotangents of the aggregated frames (the spectrum's input)
    d_blocks = [0.0] * len(starts)  # the estimator output's cotangent, per channel block
    for f, ((u_re, u_im), (n_re, n_im)) in enumerate(zip(
        _cotangent_spectrum(d_out, time), _normalised(row, wr, wi, mean, inv_std))):
      # Batch norm (batch statistics), then the complex mixing.
      d_re = inv_std * (alpha * u_re - mean_d - n_re * mean_dn)
      d_im = inv_std * (alpha * u_im - mean_d - n_im * mean_dn)
      z_re, z_im = row.modulated[f]
      dmix_ref[0] += _dot_tn(z_re, d_re) + _dot_tn(z_im, d_im)
      dmix_ref[1] += _dot_tn(z_re, d_im) - _dot_tn(z_im, d_re)
      dz_re = _dot_nt(d_re, wr) + _dot_nt(d_im, wi)
      dz_im = _dot_nt(d_im, wr) - _dot_nt(d_re, wi)
      # Modulation Z = S F.
      (s_re, s_im), (f_re, f_im) = row.spectrum[f], row.filter[f]
      ds_re, ds_im = dz_re * f_re + dz_im * f_im, dz_im * f_re - dz_re * f_im
      df_re, df_im = dz_re * s_re + dz_im * s_im, dz_im * s_re - dz_re * s_im
      for b in range(len(starts)):
        cols = slice(b * block, (b + 1) * block)
        e_re, e_im = (expand_ref[b, 2 * f + r].astype(jnp.float32) for r in range(2))
        d_blocks[b] = d_blocks[b] + _dot_nt(df_re[:, cols], e_re) + _dot_nt(df_im[:, cols], e_im)
      for t in range(time):  # the rfft's transpose
        d_agg[t] = d_agg[t] + ds_re * float(cos[t, f]) + ds_im * float(minus_sin[t, f])
    d_g = _placed(d_blocks, starts, kx_ref.shape[-1])
    # Filter estimator (its matmul in the block's dtype, as forward).
    d_logits = []
    d_g_low = d_g.astype(kx_ref.dtype)
    for t in range(time):
      dkx_ref[t] += _dot_tn(row.aggregated[t].astype(kx_ref.dtype), d_g_low)
      d_agg[t] = d_agg[t] + _dot_nt(d_g_low, kx_ref[t])
      d_logits.append([jnp.sum(d_g * kc_ref[t, k:k + 1, :], axis=-1, keepdims=True)
                       for k in range(k2)])
      dkc_ref[t] += jnp.concatenate([jnp.sum(row.logits[t][k] * d_g, axis=0, keepdims=True)
                                     for k in range(k2)], axis=0)
    # Frame-wise aggregation: aggregated[t] = frame t + agg(frame t + 1); the output's residual.
    for t in range(time):
      acc_ref[t, p + h, pl.ds(p, width), :] += d_out[t] + d_agg[t]
      neighbour_grads = [0.0] * k2
      if t > 0:  # frame t's aggregate went to frame t - 1
        attention, d_sum = row.attention[t], d_agg[t - 1]
        d_att = [jnp.sum(d_sum * n, axis=-1, keepdims=True) for n in row.neighbours[t]]
        mean_att = functools.reduce(jnp.add, [a * d for a, d in zip(attention, d_att)])
        for k in range(k2):
          d_logits[t][k] = d_logits[t][k] + attention[k] * (d_att[k] - mean_att)
          neighbour_grads[k] = attention[k] * d_sum
      query, q = row.frames[max(t - 1, 0)], max(t - 1, 0)
      d_query = 0.0
      for k in range(k2):
        d_query = d_query + d_logits[t][k] * row.neighbours[t][k] / channels
        neighbour_grads[k] = neighbour_grads[k] + d_logits[t][k] * query / channels
      acc_ref[q, p + h, pl.ds(p, width), :] += d_query
      for k in range(k2):
        i, j = divmod(k, kernel_size)
        acc_ref[t, h + i, pl.ds(j, width), :] += neighbour_grads[k]
    return carry

  jax.lax.fori_loop(0, rows, step, 0)
  dx_ref[...] = acc_ref[:, p:p + rows, pl.ds(p, width), :].astype(dx_ref.dtype)
  above_ref[...] = acc_ref[:, 0:p, pl.ds(p, width), :]
  below_ref[...] = acc_ref[:, rows + p:rows + 2 * p, pl.ds(p, width), :]


def row_temporaries(shape, kernel_size: int, backward: bool = False) -> int:
  """VMEM bytes of the values live in one row's step (float32, TPU-tiled): the frames, their
  ``K2`` neighbours and the aggregate, the spectrum, filter and modulated spectrum per bin, the
  estimator output, the per-location logits and weights (``W 1``, a whole 128-lane tile each);
  the gradient's step about as much again. The compiler keeps them in VMEM (its register
  allocator's spill slots) beside the blocks; at 64 frames a DTF-Swin-B stage-3 gradient spills
  51 MB, beyond this count, which is why that one is left to the parts."""
  _, time, _, width, channels = shape
  k2, bins = kernel_size ** 2, time // 2 + 1
  rows8 = -(-width // 8) * 8
  full, narrow = rows8 * (-(-channels // 128) * 128) * 4, rows8 * 128 * 4
  maps, logits = time * (k2 + 2) + 6 * bins + 6, 2 * time * k2
  if backward:
    maps, logits = 2 * maps + k2, 2 * logits
  return maps * full + logits * narrow


def tile_rows(shape, itemsize: int, kernel_size: int, weights: int,
              backward: bool = False) -> int:
  """Rows per program (a divisor of ``H``): the whole clip when its blocks fit
  :func:`vmem_budget` beside ``weights`` bytes of weights and a row step's temporaries
  (:func:`row_temporaries`), else the largest multiple of ``2p`` whose blocks do (with the
  ``2p`` rows below and a VMEM copy of both); 0 if none does. Clip blocks are double-buffered and
  TPU-tiled ((8, 128), sublanes of 16 for 2-byte types); the ``backward`` kernel also holds the
  output's cotangent, the input's gradient and a float32 accumulator of it."""
  _, time, height, width, channels = shape
  p = kernel_size // 2
  lanes = -(-channels // 128) * 128
  sub = 8 * max(1, 4 // itemsize)
  row_in = time * (-(-(width + 2 * p) // sub) * sub) * lanes * itemsize
  row_out = time * (-(-width // sub) * sub) * lanes * itemsize
  row_acc = time * (-(-(width + 2 * p) // 8) * 8) * lanes * 4
  budget = vmem_budget() - weights - row_temporaries(shape, kernel_size, backward)

  def need(r, tiled):
    rows_in = (3 * (r + 2 * p) + 2 * p) if tiled else 2 * (r + 2 * p)
    extra = 4 * r * row_out + (r + 2 * p) * row_acc if backward else 0
    return rows_in * row_in + 2 * r * row_out + extra
  if need(height, False) <= budget:
    return height
  fits = [r for r in range(2 * p, height, 2 * p) if height % r == 0 and need(r, True) <= budget]
  return max(fits, default=0)


def _cost(kind, shape, kernel_size, weights, operands, outputs):
  """What one kernel computes and moves, for XLA's cost analysis (the FLOP reports)."""
  batch, time, height, width, channels = shape
  k2, bins = kernel_size ** 2, time // 2 + 1
  estimator_out, window = weights[0].shape[-1], weights[2].shape[2]
  forward = (k2 * channels * (2 * time - 1)  # correlation of every frame, aggregation of T - 1
             + time * (channels + k2) * estimator_out  # filter estimator
             + 2 * bins * window * channels  # its expansion (0/1 matmuls, per channel block)
             + 2 * bins * time * channels + 4 * bins * channels)  # rfft, modulation
  mixing = 4 * bins * channels * channels
  macs = forward + {
      'moments': mixing,
      'output': 4 * bins * time * channels + 2 * time * channels * channels,  # irfft, mixing
      'grad_moments': mixing + 2 * bins * time * channels,  # and the irfft's transpose
      # the mixing's transpose and its weights' gradient, the rest of the forward pass twice
      # more (its transposes and its weights' gradients)
      'grad': 3 * mixing + 2 * bins * time * channels + 2 * forward,
  }[kind]
  return pl.CostEstimate(
      flops=2 * macs * batch * height * width,
      transcendentals=batch * height * width * (time - 1) * k2,
      bytes_accessed=sum(a.size * a.dtype.itemsize for a in operands + outputs))


_KERNELS = {'moments': _moments_kernel, 'output': _output_kernel,
            'grad_moments': _grad_moments_kernel, 'grad': _grad_kernel}


def _call(kind, padded, tile_inputs, weights, *, kernel_size, dtype, shape, starts, interpret):
  """One kernel over the clips of ``padded`` (``B T H+2p W+2p C``), grid ``(B, H / R)``: the
  ``tile_inputs`` (``B T H W C``) in row tiles, the ``weights`` whole (``kx kc E mix ...``;
  ``starts``: the expansion's windows, see :func:`expansion_blocks`)."""
  batch, time, height, width, channels = shape
  p = kernel_size // 2
  wp = padded.shape[3]
  backward = kind.startswith('grad')
  held = sum(w.size * w.dtype.itemsize for w in weights)  # one buffer each (a whole block)
  if kind == 'grad':  # the weights' gradients, float32, one block for the grid
    held += 4 * (weights[0].size + weights[1].size + weights[3].size)
  rows = tile_rows(shape, padded.dtype.itemsize, kernel_size, held, backward)
  if not rows:
    raise ValueError(f'dtf_block_{kind}: no row tile of a {shape} clip fits VMEM')
  tiled = rows < height
  tiles = height // rows
  squeezed = pl.squeezed
  whole = lambda a: pl.BlockSpec(a.shape, lambda b, i: (0,) * a.ndim,  # noqa: E731
                                 pipeline_mode=pl.Buffered(1))  # the same block every step
  tile = pl.BlockSpec((squeezed, time, rows, width, channels), lambda b, i: (b, 0, i, 0, 0))
  per_tile = lambda *dims: (  # noqa: E731
      pl.BlockSpec((squeezed, squeezed) + dims, lambda b, i: (b, i) + (0,) * len(dims)),
      jax.ShapeDtypeStruct((batch, tiles) + dims, jnp.float32))
  if tiled:
    inputs = [pl.BlockSpec((squeezed, time, rows, wp, channels), lambda b, i: (b, 0, i, 0, 0)),
              pl.BlockSpec((squeezed, time, 2 * p, wp, channels),
                           lambda b, i: (b, 0, (i + 1) * (rows // (2 * p)), 0, 0))]
    scratch = [pltpu.VMEM((time, rows + 2 * p, wp, channels), padded.dtype)]
  else:
    inputs = [pl.BlockSpec((squeezed, time, height + 2 * p, wp, channels),
                           lambda b, i: (b, 0, 0, 0, 0))]
    scratch = []
  if kind == 'moments':
    outputs = [per_tile(2, channels)]
  elif kind == 'grad_moments':
    outputs = [per_tile(3, channels)]
  elif kind == 'output':
    outputs = [(tile, jax.ShapeDtypeStruct(shape, padded.dtype))]
  else:
    sums = [(whole(w), jax.ShapeDtypeStruct(w.shape, jnp.float32))  # kx kc mix
            for w in (weights[0], weights[1], weights[3])]
    outputs = [(tile, jax.ShapeDtypeStruct(shape, padded.dtype)),
               per_tile(time, p, width, channels), per_tile(time, p, width, channels), *sums]
    scratch.append(pltpu.VMEM((time, rows + 2 * p, wp, channels), jnp.float32))
  out_specs, out_shapes = zip(*outputs)
  operands = (padded,) + tuple(tile_inputs) + tuple(weights)
  out = pl.pallas_call(
      functools.partial(_KERNELS[kind], kernel_size=kernel_size, time=time, rows=rows,
                        width=width, channels=channels, dtype=dtype, tiled=tiled,
                        starts=starts),
      grid=(batch, tiles),
      in_specs=inputs + [tile] * len(tile_inputs) + [whole(w) for w in weights],
      out_specs=list(out_specs), out_shape=list(out_shapes), scratch_shapes=scratch,
      interpret=interpret, compiler_params=pltpu.CompilerParams(
          vmem_limit_bytes=vmem_limit(),
          # the gradient's programs add to the same weights' gradients: in sequence
          dimension_semantics=('arbitrary', 'arbitrary') if kind == 'grad' else None),
      cost_estimate=_cost(kind, shape, kernel_size, weights, operands, out_shapes),
      name=f'dtf_block_{kind}')(*([padded] * len(inputs)), *tile_inputs, *weights)
  return out


def _add_boundary_kernel(dx_ref, halo_ref, out_ref):
  out_ref[...] = (dx_ref[...].astype(jnp.float32) + halo_ref[...]).astype(out_ref.dtype)


def _add_across_tiles(dx, above, below, kernel_size, interpret):
  """``dx`` (``B T H W C``) with each tile's gradient for the ``p`` rows above and below it
  (``B tiles T p W C``) added to the neighbouring tiles' rows, in place: a kernel per boundary
  row block (2 per boundary), so only those rows are read and written."""
  batch, time, height, width, channels = dx.shape
  tiles = above.shape[1]
  p, rows = kernel_size // 2, height // tiles
  # Boundary j (1 .. tiles - 1), part s: tile j's rows above it (s = 0, image rows jR - p ..
  # jR - 1), tile j - 1's rows below it (s = 1, image rows jR .. jR + p - 1).
  halos = jnp.stack([above[:, 1:], below[:, :-1]], axis=2)  # B tiles-1 2 T p W C
  squeezed = pl.squeezed
  rows_block = pl.BlockSpec((squeezed, time, p, width, channels),
                            lambda b, j, s: (b, 0, (j + 1) * (rows // p) - 1 + s, 0, 0))
  return pl.pallas_call(
      _add_boundary_kernel, grid=(batch, tiles - 1, 2),
      in_specs=[rows_block, pl.BlockSpec((squeezed, squeezed, squeezed, time, p, width, channels),
                                         lambda b, j, s: (b, j, s, 0, 0, 0, 0))],
      out_specs=rows_block, out_shape=jax.ShapeDtypeStruct(dx.shape, dx.dtype),
      input_output_aliases={0: 0}, interpret=interpret,
      name='dtf_block_grad_boundaries')(dx, halos)


def _operands(x, kernel, kernel_size, group_factor, dtype):
  """``x`` padded in space; the weights ``(kx, kc, E)``: the estimator kernel split into features
  ``T C O'`` (in ``dtype``, as the estimator runs) and correlation ``T K2 O'`` (float32), zero
  columns added to ``O' = padded_out``, and the expansion blocks ``nb 2F width cb`` (``dtype``;
  0/1); and the blocks' ``starts`` (see :func:`expansion_blocks`)."""
  _, time, _, _, channels = x.shape
  p = kernel_size // 2
  padded = jnp.pad(x, ((0, 0), (0, 0), (p, p), (p, p), (0, 0)))
  blocks, starts, padded_out = expansion_blocks(channels, time // 2 + 1, group_factor, LANES)
  kernel = jnp.pad(kernel.astype(jnp.float32),
                   ((0, 0), (0, 0), (0, padded_out - kernel.shape[-1])))
  weights = (kernel[:, :channels].astype(dtype), kernel[:, channels:],
             jnp.asarray(blocks, dtype))
  return padded, weights, starts


def weight_bytes(shape, dtype, kernel_size: int, group_factor: int,
                 backward: bool = False) -> int:
  """VMEM bytes of the weights that a kernel holds for a clip of ``shape`` (``B T H W C``) in
  ``dtype`` (one buffer each: their block never changes), and (``backward``) of their gradients
  (float32, one block for the whole grid)."""
  _, time, _, _, channels = shape
  bins, itemsize, k2 = time // 2 + 1, jnp.dtype(dtype).itemsize, kernel_size ** 2
  blocks, _, padded_out = expansion_blocks(channels, bins, group_factor, LANES)
  features, correlation = time * channels * padded_out, time * (-(-k2 // 8) * 8) * padded_out
  mixing = 2 * channels * channels
  total = (itemsize * (features + blocks.size) + 4 * (correlation + mixing + 8 * channels))
  return total + (4 * (features + correlation + mixing) if backward else 0)


def supported(shape, dtype, kernel_size: int, group_factor: int, backward: bool = False) -> bool:
  """Whether the kernels (forward; ``backward``: its gradient too) take a clip of ``shape``:
  some row tile fits VMEM beside the weights."""
  return all(tile_rows(shape, jnp.dtype(dtype).itemsize, kernel_size,
                       weight_bytes(shape, dtype, kernel_size, group_factor, b), b) > 0
             for b in ((False, True) if backward else (False,)))


def spectrum_moments(x, kernel, mix, shift, *, kernel_size: int, group_factor: int, dtype,
                     interpret: bool = False):
  """Per clip, the sums of ``S2 - shift`` and of its square over bins, (real, imaginary), rows and
  columns: ``B 2 C`` float32 (``S2 = modulated spectrum @ mix``, before the norm). Under a mesh
  each device runs its part of the batch."""
  def moments(x, kernel, mix, shift):
    padded, weights, starts = _operands(x, kernel, kernel_size, group_factor, dtype)
    (sums,) = _call('moments', padded, (),
                    (*weights, mix.astype(jnp.float32), shift.astype(jnp.float32).reshape(1, -1)),
                    kernel_size=kernel_size, dtype=dtype, shape=x.shape, starts=starts,
                    interpret=interpret)
    return (sums.sum(axis=1),)
  return per_batch_shard(moments, 1, x, kernel, mix, shift, replicated=3)[0]


def block_output(x, kernel, mix, mean, var, alpha, bias, *, kernel_size: int, group_factor: int,
                 dtype, epsilon: float, interpret: bool = False):
  """The block's output ``B T H W C`` (``x.dtype``), the spectrum normalised with ``mean`` and
  ``var`` (``C``, batch or running statistics). Under a mesh each device runs its part of the
  batch."""
  time, channels = x.shape[1], x.shape[-1]
  scale = alpha * jax.lax.rsqrt(var + epsilon)  # C
  (real,), (imag,) = dft_matrices('irfft', time)
  # irfft of the (mean, mean) spectrum in every bin, times the scale: subtracted per frame.
  constant = jnp.asarray((real + imag).sum(axis=0), jnp.float32)  # T
  offset = bias[None] - constant[:, None] * (scale * mean)[None]  # T C

  def output(x, kernel, mix, offset):
    padded, weights, starts = _operands(x, kernel, kernel_size, group_factor, dtype)
    return tuple(_call('output', padded, (), (*weights, mix, offset), kernel_size=kernel_size,
                       dtype=dtype, shape=x.shape, starts=starts, interpret=interpret))
  return per_batch_shard(output, 1, x, kernel, mix.astype(jnp.float32) * scale,
                         offset.reshape(time, 1, channels).astype(jnp.float32), replicated=3)[0]


def block_gradient(x, kernel, mix, mean, var, alpha, d_out, *, kernel_size: int,
                   group_factor: int, dtype, epsilon: float, interpret: bool = False):
  """The gradient of the training forward pass (batch statistics ``mean``, ``var`` of the
  spectrum, which depend on the batch) for the output's cotangent ``d_out`` (``B T H W C``):
  ``(dx, d_kernel, d_mix, d_alpha, d_bias)``. Two kernels: per-tile sums that the batch norm's
  gradient needs (summed over the batch, across devices), then the gradients. The gradient a
  tile gives the ``p`` rows above and below it is added to its neighbour tiles' here."""
  count = spectrum_count(x.shape)
  inv_std = jax.lax.rsqrt(var + epsilon)
  d_out = d_out.astype(x.dtype)

  def stats_rows(*rows):
    return jnp.stack(list(rows) + [jnp.zeros_like(mean)] * (8 - len(rows))).astype(jnp.float32)

  def grad_moments(x, d_out, kernel, mix, stats):
    padded, weights, starts = _operands(x, kernel, kernel_size, group_factor, dtype)
    (sums,) = _call('grad_moments', padded, (d_out,), (*weights, mix, stats),
                    kernel_size=kernel_size, dtype=dtype, shape=x.shape, starts=starts,
                    interpret=interpret)
    return (sums.sum(axis=1),)
  mix = mix.astype(jnp.float32)
  sums = per_batch_shard(grad_moments, 1, x, d_out, kernel, mix,
                         stats_rows(mean, inv_std), replicated=3)[0].sum(axis=0)
  d_bias, u_sum, d_alpha = sums[0], sums[1], sums[2]

  def gradient(x, d_out, kernel, mix, stats):
    padded, weights, starts = _operands(x, kernel, kernel_size, group_factor, dtype)
    dx, above, below, dkx, dkc, dmix = _call(
        'grad', padded, (d_out,), (*weights, mix, stats), kernel_size=kernel_size,
        dtype=dtype, shape=x.shape, starts=starts, interpret=interpret)
    if above.shape[1] > 1:
      dx = _add_across_tiles(dx, above, below, kernel_size, interpret)
    d_kernel = jnp.concatenate([dkx, dkc], axis=1)[..., :kernel.shape[-1]]
    return dx, d_kernel[None], dmix[None]
  stats = stats_rows(mean, inv_std, alpha, alpha * u_sum / count, alpha * d_alpha / count)
  dx, d_kernel, d_mix = per_batch_shard(gradient, 3, x, d_out, kernel, mix, stats,
                                        replicated=3)
  return dx, d_kernel.sum(axis=0), d_mix.sum(axis=0), d_alpha, d_bias

"""Orthonormal real DFT along the time axis (axis 1), in three implementations.

``rfft_time(x)`` equals ``jnp.fft.rfft(x, axis=1, norm='ortho')`` and ``irfft_time(re, im, n)``
equals ``jnp.fft.irfft(re + 1j * im, n, axis=1, norm='ortho')`` (the imaginary parts of the DC and
Nyquist bins are ignored, as ``irfft`` does). All run in float32. ``impl`` (``SPECTRAL_IMPLS``):

- ``'direct'``: ``T x (T//2 + 1)`` fused multiply-adds over whole feature maps, with hand-written
  gradients (the transposed transforms). The DTF time axes are short (``T = clip_length //
  early_stride``, 4 to 16): on XLA:CPU this is several times faster than XLA's FFT, and XLA fuses
  it into one pass per transform; the same transforms as matmuls (measured, rfft then irfft of
  2x8x28x28x128, XLA:CPU) read and write twice as much (11 vs 5.5 feature-map passes forward, 20
  vs 11 with the gradient) and take longer (gradient 22 vs 16 ms).
- ``'matmul'``: one matmul per transform with the ``T x 2F`` (``2F x T``) DFT matrix, contracting
  the time axis of ``B T (H W C)`` (a major axis: no transposed copy), float32 products
  (``Precision.HIGHEST``: a TPU would otherwise round the products to bfloat16). The TPU
  compiler turns the direct form at ``T = 16`` into one pass over the float32 map per (bin,
  real/imaginary); the matmul reads the map once.
- ``'fft'``: ``jnp.fft`` (the block's specification).

``'auto'`` picks per platform from :data:`AUTO_SPECTRAL_IMPL` (what was measured best there; the
platform the program is compiled for, see ``dtf_jax.layers.platform``).

Shapes: ``x: B T ...`` real -> ``re, im: B F ...`` with ``F = T // 2 + 1``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dtf_jax.layers.platform import per_platform

# Multiplies and matmuls under this scope are the DFT's (counted as 'dtf_fft' by dtf_jax.flops).
DFT_SCOPE = 'time_dft'
SPECTRAL_IMPLS = ('auto', 'direct', 'matmul', 'fft')
# What 'auto' runs, per platform: (for T < LONG_TIME, for T >= LONG_TIME). CPU: measured (above).
# TPU: the compiled DTF block's bytes accessed (v5e, bfloat16, batch 4): at T = 4 (56x56x64) the
# direct form moves 1.05 GB forward / 2.86 GB with the gradient, the matmul 1.20 / 3.16; at T = 8
# (28x28x128) 0.97 vs 0.77 forward; at T = 16 2.48 / 4.29 vs 1.57 / 3.56; jnp.fft 1.76 (T = 4)
# and 1.98 (T = 16) forward. The GPU keeps the direct form until measured there.
AUTO_SPECTRAL_IMPL = {'cpu': ('direct', 'direct'), 'gpu': ('direct', 'direct'),
                      'tpu': ('direct', 'matmul')}
LONG_TIME = 8


def spectrum_count(shape) -> int:
  """Values per channel that the batch norm of a clip's spectrum pools (``shape``: the clips'
  ``B T H W C``): the real and imaginary parts of ``T // 2 + 1`` bins at every location."""
  batch, time, height, width = shape[:4]
  return 2 * batch * (time // 2 + 1) * height * width


def resolve_spectral_impl(impl: str, kind: str, n: int) -> str:
  """``impl`` with ``'auto'`` replaced by the choice for ``kind`` ('cpu', 'gpu', 'tpu') and a
  time axis of ``n`` samples."""
  if impl not in SPECTRAL_IMPLS:
    raise ValueError(f'spectral_impl={impl!r} is not one of {SPECTRAL_IMPLS}.')
  if impl != 'auto':
    return impl
  return AUTO_SPECTRAL_IMPL.get(kind, AUTO_SPECTRAL_IMPL['cpu'])[n >= LONG_TIME]


@functools.lru_cache(maxsize=None)
def dft_matrices(kind: str, n: int):
  """``M[p][q]``, ``(I, J)`` each: output ``q`` at ``j`` is ``sum_p sum_i input_p[i] M[p][q][i, j]``.

  ``'rfft'``: one input (``n`` samples), outputs (re, im) of ``n//2 + 1`` bins.
  ``'irfft'``: inputs (re, im) of ``n//2 + 1`` bins, one output of ``n`` samples.
  """
  bins = n // 2 + 1
  angle = 2 * np.pi * np.outer(np.arange(n), np.arange(bins)) / n  # (n, bins)
  cos, sin = np.cos(angle), np.sin(angle)
  cos[np.abs(cos) < 1e-12], sin[np.abs(sin) < 1e-12] = 0.0, 0.0  # exact zeros (e.g. sin(pi t))
  cos, sin = cos / np.sqrt(n), sin / np.sqrt(n)
  if kind == 'rfft':
    return ((cos, -sin),)
  weight = np.full((bins, 1), 2.0)  # bins 1..: both +f and -f
  weight[0] = 1.0
  if n % 2 == 0:
    weight[-1] = 1.0  # Nyquist
  return ((weight * cos.T,), (-weight * sin.T,))


def _apply(inputs, matrices):
  outputs = []
  for q in range(len(matrices[0])):
    columns = []
    for j in range(matrices[0][q].shape[1]):
      terms = [x[:, i] * np.float32(m[q][i, j])
               for x, m in zip(inputs, matrices) for i in range(m[q].shape[0])]
      columns.append(functools.reduce(jnp.add, terms))
    outputs.append(jnp.stack(columns, axis=1))
  return tuple(outputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _dft(inputs, kind, n):
  with jax.named_scope(DFT_SCOPE):
    return _apply(inputs, dft_matrices(kind, n))


def _dft_fwd(inputs, kind, n):
  return _dft(inputs, kind, n), None


def _dft_bwd(kind, n, _, cotangents):
  matrices = dft_matrices(kind, n)
  transposed = tuple(tuple(matrices[p][q].T for p in range(len(matrices)))
                     for q in range(len(matrices[0])))
  return (_apply(tuple(c.astype(jnp.float32) for c in cotangents), transposed),)


_dft.defvjp(_dft_fwd, _dft_bwd)


def _matmul(x, matrix):
  """``out[b, q, ...] = sum_p matrix[p, q] x[b, p, ...]`` in float32 (``B P ... -> B Q ...``)."""
  with jax.named_scope(DFT_SCOPE):
    out = jnp.einsum('bps,pq->bqs', x.reshape(x.shape[:2] + (-1,)),
                     jnp.asarray(matrix, jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return out.reshape(out.shape[:2] + x.shape[2:])


def _rfft(impl, x):
  n, bins = x.shape[1], x.shape[1] // 2 + 1
  if impl == 'fft':
    spectrum = jnp.fft.rfft(x, axis=1, norm='ortho')
    return jnp.real(spectrum), jnp.imag(spectrum)
  if impl == 'matmul':
    (cos, minus_sin), = dft_matrices('rfft', n)
    out = _matmul(x, np.concatenate([cos, minus_sin], axis=1))
    return out[:, :bins], out[:, bins:]
  return _dft((x,), 'rfft', n)


def _irfft(impl, re, im, n):
  if impl == 'fft':
    return jnp.fft.irfft(jax.lax.complex(re, im), n, axis=1, norm='ortho')
  if impl == 'matmul':
    (real,), (imag,) = dft_matrices('irfft', n)
    return _matmul(jnp.concatenate([re, im], axis=1), np.concatenate([real, imag], axis=0))
  (out,) = _dft((re, im), 'irfft', n)
  return out


def rfft_time(x, impl: str = 'auto'):
  """``B T ... -> (re, im)``, each ``B (T//2+1) ...``, float32; orthonormal."""
  n = x.shape[1]
  resolve_spectral_impl(impl, 'cpu', n)  # checks the name
  return per_platform(lambda kind: resolve_spectral_impl(impl, kind, n), _rfft,
                      x.astype(jnp.float32))


def irfft_time(re, im, n: int, impl: str = 'auto'):
  """``(re, im)``, each ``B (n//2+1) ...`` -> ``B n ...`` float32; orthonormal."""
  resolve_spectral_impl(impl, 'cpu', n)
  return per_platform(lambda kind: resolve_spectral_impl(impl, kind, n),
                      functools.partial(_irfft, n=n), re.astype(jnp.float32),
                      im.astype(jnp.float32))

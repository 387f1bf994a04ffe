"""Orthonormal real DFT along the time axis (axis 1), computed directly.

``rfft_time(x)`` equals ``jnp.fft.rfft(x, axis=1, norm='ortho')`` and ``irfft_time(re, im, n)``
equals ``jnp.fft.irfft(re + 1j * im, n, axis=1, norm='ortho')`` (the imaginary parts of the DC and
Nyquist bins are ignored, as ``irfft`` does). The DTF time axes are short (``T = clip_length //
early_stride``, 4 to 16), where the direct transform, written as ``T x (T//2 + 1)`` fused
multiply-adds over whole feature maps, is several times faster than XLA's FFT (which also needs
the time axis moved to the end and back). Both run in float32. Their gradients are the transposed
transforms (hand-written, so the backward pass is as cheap as the forward). XLA fuses the direct
form into one pass per transform; the same transforms as matmuls with ``T x 2F`` DFT matrices
(measured, rfft then irfft of 2x8x28x28x128, XLA:CPU) read and write twice as much (11 vs 5.5
feature-map passes forward, 20 vs 11 with the gradient) and take longer (gradient 22 vs 16 ms).

Shapes: ``x: B T ...`` real -> ``re, im: B F ...`` with ``F = T // 2 + 1``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Multiplies under this scope are the DFT's (counted as 'dtf_fft' by dtf_jax.flops).
DFT_SCOPE = 'time_dft'


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


def rfft_time(x):
  """``B T ... -> (re, im)``, each ``B (T//2+1) ...``, float32; orthonormal."""
  re, im = _dft((x.astype(jnp.float32),), 'rfft', x.shape[1])
  return re, im


def irfft_time(re, im, n: int):
  """``(re, im)``, each ``B (n//2+1) ...`` -> ``B n ...`` float32; orthonormal."""
  (out,) = _dft((re.astype(jnp.float32), im.astype(jnp.float32)), 'irfft', n)
  return out

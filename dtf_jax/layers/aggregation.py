"""The DTF block's frame-wise aggregation (FA), channels-last, in three implementations.

Shapes: ``B`` batch, ``T`` time steps, ``H W`` space, ``C`` channels, ``K`` the window
(``K2 = K * K`` neighbours). Neighbour ``k = (i, j)`` of location ``(h, w)`` is ``(h + i - K//2,
w + j - K//2)``, zero outside the frame. For frame ``t`` with query frame ``max(t - 1, 0)``:

  ``corr[t, h, w, k] = mean_c x[max(t-1, 0), h, w, c] * x[t, neighbour k of (h, w), c]`` (float32)
  ``agg[t] = sum_k softmax_k(corr[t]) * x[t, neighbour k]``
  ``out[t] = x[t] + agg[t + 1]`` for ``t < T - 1`` and ``out[T - 1] = x[T - 1]``

:func:`frame_wise_aggregation` returns ``(out, corr)`` (the filter estimator needs the logits).
The implementations (``fa_impl``) compute the same values:

- ``'scan'``: the ``K2`` dot products run as a ``lax.scan`` and the primitives have hand-written
  VJPs, so both passes hold O(1) copies of the feature map (the lean-memory path);
- ``'xla'``: the ``K2`` neighbours as slices of one padded tensor in one expression, left to XLA
  to fuse, with autodiff for the backward;
- ``'pallas'``: one kernel per frame pair (``aggregation_pallas.py``), and a backward kernel that
  recomputes the attention from ``x`` (nothing but ``x`` is kept for the backward pass).

``'auto'`` picks per platform from :data:`AUTO_FA_IMPL`, what was measured best there. The
platform is the one the program is compiled for, not JAX's default backend (a TPU program
compiled ahead of time on a CPU host gets the TPU's choice, and the Pallas kernel its TPU form;
see ``dtf_jax.layers.platform``).
"""

import functools

import einops
import jax
import jax.numpy as jnp

from dtf_jax.layers.platform import per_platform

# Multiply-adds under this scope are elementwise ones that the FLOP counter should see
# (see dtf_jax/flops.py); plain elementwise ops elsewhere are not counted.
COUNTED_SCOPE = 'counted_macs'

FA_IMPLS = ('auto', 'scan', 'xla', 'pallas')
# What 'auto' runs, per platform. Measured: CPU (benchmark_model, README). TPU: the compiled DTF
# block's bytes accessed (v5e, bfloat16, batch 4, 4 x 56 x 56 x 64, dtf_jax.tpu_target): forward
# scan 1.05 GB, xla 1.05, pallas 1.02; with the gradient scan 2.86, pallas 3.35, xla 3.60. The
# GPU keeps the scan until experiments/gpu_benchmarks.sh has compared the implementations there.
AUTO_FA_IMPL = {'cpu': 'scan', 'gpu': 'scan', 'tpu': 'scan'}


def resolve_fa_impl(impl: str, backend: str = None) -> str:
  """``impl`` with ``'auto'`` replaced by the choice for ``backend`` ('cpu', 'gpu', 'tpu';
  default: JAX's)."""
  if impl not in FA_IMPLS:
    raise ValueError(f'fa_impl={impl!r} is not one of {FA_IMPLS}.')
  if impl != 'auto':
    return impl
  return AUTO_FA_IMPL.get(backend or jax.default_backend(), 'scan')


def pad_space(x, kernel_size: int):
  """Zero padding of ``K // 2`` on ``H`` and ``W``.  ``B T H W C -> B T H+2p W+2p C``."""
  p = kernel_size // 2
  return jnp.pad(x, ((0, 0), (0, 0), (p, p), (p, p), (0, 0)))


def previous_frames(x):
  """The query frames: ``y[:, t] = x[:, max(t - 1, 0)]``.  ``B T ... -> B T ...``."""
  return jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)


def shift_to_previous_frame(x):
  """``y[:, t] = x[:, t + 1]`` for ``t < T - 1`` and ``y[:, T - 1] = 0``.  ``B T ... -> B T ...``."""
  return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


# ---------------------------------------------------------------------------------------------
# 'scan': two primitives whose VJPs are built from each other and from neighbour_scatter.
# ---------------------------------------------------------------------------------------------


def _slice_neighbour(padded, k, kernel_size, shape):
  i, j = k // kernel_size, k % kernel_size
  return jax.lax.dynamic_slice(padded, (0, 0, i, j, 0), shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def neighbour_dots(a, x, kernel_size: int):
  """``out[..., h, w, k] = sum_c a[..., h, w, c] * x[..., h+i-K//2, w+j-K//2, c]`` (zero padded).

  ``a, x: B T H W C -> B T H W K2`` (float32 accumulation).
  """
  padded = pad_space(x, kernel_size)

  def one_neighbour(_, k):
    n = _slice_neighbour(padded, k, kernel_size, x.shape)
    with jax.named_scope(COUNTED_SCOPE):
      return None, jnp.sum(a * n, axis=-1, dtype=jnp.promote_types(a.dtype, jnp.float32))

  _, out = jax.lax.scan(one_neighbour, None, jnp.arange(kernel_size ** 2))
  return einops.rearrange(out, 'k b t h w -> b t h w k')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def neighbour_sum(w, x, kernel_size: int):
  """``out[..., h, w, c] = sum_k w[..., h, w, k] * x[..., h+i-K//2, w+j-K//2, c]``.

  ``w: B T H W K2``, ``x: B T H W C -> B T H W C``.
  """
  _, _, height, width, _ = x.shape
  padded = pad_space(x, kernel_size)
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
  w_padded, g_padded = pad_space(w, kernel_size), pad_space(g, kernel_size)
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
  return neighbour_dots(previous_frames(x), x, kernel_size) / x.shape[-1]


def frame_aggregation(x, attention, kernel_size: int):
  """Attention-weighted sum over each ``K x K`` neighbourhood.

  ``x: B T H W C``, ``attention: B T H W K2`` -> ``B T H W C``. No ``K2``-fold copy of the
  feature map is built (see :func:`neighbour_sum`).
  """
  return neighbour_sum(attention.astype(x.dtype), x, kernel_size)


def _fa_scan(x, kernel_size: int):
  corr = frame_correlation(x, kernel_size)
  attention = jax.nn.softmax(corr, axis=-1)
  return x + shift_to_previous_frame(frame_aggregation(x, attention, kernel_size)), corr


# ---------------------------------------------------------------------------------------------
# 'xla': one expression over the K2 slices of the padded frames.
# ---------------------------------------------------------------------------------------------


def _fa_xla(x, kernel_size: int):
  _, _, height, width, channels = x.shape
  padded = pad_space(x, kernel_size)
  neighbours = [padded[:, :, k // kernel_size:k // kernel_size + height,
                       k % kernel_size:k % kernel_size + width, :] for k in range(kernel_size ** 2)]
  query = previous_frames(x)
  with jax.named_scope(COUNTED_SCOPE):
    corr = jnp.stack([jnp.sum(query * n, axis=-1, dtype=jnp.float32) for n in neighbours],
                     axis=-1) / channels
  attention = jax.nn.softmax(corr, axis=-1).astype(x.dtype)
  with jax.named_scope(COUNTED_SCOPE):
    aggregated = functools.reduce(
        jnp.add, [attention[..., k:k + 1] * n for k, n in enumerate(neighbours)])
  return x + shift_to_previous_frame(aggregated.astype(x.dtype)), corr


# ---------------------------------------------------------------------------------------------
# 'pallas': forward and backward kernels (aggregation_pallas.py).
# ---------------------------------------------------------------------------------------------

# The kernel's tiling per platform (see aggregation_pallas.py); the CPU interprets the TPU one.
PALLAS_TILING = {'gpu': 'row', 'tpu': 'frame', 'cpu': 'frame'}


def _pallas():
  from dtf_jax.layers import aggregation_pallas  # Pallas is imported only where it is used
  return aggregation_pallas


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _fa_pallas(x, kernel_size: int, tiling: str, interpret: bool):
  return _pallas().frame_wise_aggregation_kernel(x, kernel_size, tiling, interpret=interpret)


def _fa_pallas_fwd(x, kernel_size, tiling, interpret):
  return _fa_pallas(x, kernel_size, tiling, interpret), x


def _fa_pallas_bwd(kernel_size, tiling, interpret, x, cotangents):
  g_out, g_corr = cotangents
  return (_pallas().frame_wise_aggregation_grad(
      x, g_out.astype(x.dtype), g_corr.astype(jnp.float32), kernel_size, tiling,
      interpret=interpret),)


_fa_pallas.defvjp(_fa_pallas_fwd, _fa_pallas_bwd)


def frame_wise_aggregation(x, kernel_size: int, impl: str = 'auto'):
  """Frame-wise aggregation.  ``B T H W C -> (out B T H W C in x.dtype, corr B T H W K2 f32)``.

  ``impl``: one of :data:`FA_IMPLS` (``'auto'``: per target platform). The Pallas kernel runs
  compiled on TPU and GPU and in interpret mode (slow, for tests) on the CPU.
  """
  resolve_fa_impl(impl, 'cpu')  # checks the name

  def run(option, v):
    chosen, kind = option
    if chosen == 'scan':
      return _fa_scan(v, kernel_size)
    if chosen == 'xla':
      return _fa_xla(v, kernel_size)
    return _fa_pallas(v, kernel_size, PALLAS_TILING[kind], kind == 'cpu')

  def choice(kind):
    chosen = resolve_fa_impl(impl, kind)
    return chosen, kind if chosen == 'pallas' else None
  return per_platform(choice, run, x)

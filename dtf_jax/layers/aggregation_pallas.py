"""Frame-wise aggregation as one Pallas kernel per frame pair (the ``'pallas'`` ``fa_impl``).

Semantics and shapes are those of ``aggregation.frame_wise_aggregation``. Grid ``(B, T)``; step
``(b, s)`` holds two zero-padded frames, ``s`` and ``min(s + 1, T - 1)``, each a block of
``(H + 2p) x (W + 2p) x C`` with the channels on the minor (lane) axis, and writes

- ``out[b, s] = x[b, s] + agg[b, s + 1]`` (``x[b, s]`` alone at ``s = T - 1``), where ``agg[s+1]``
  is the softmax-weighted sum of frame ``s + 1``'s neighbours with frame ``s`` as the query;
- ``corr[b, s + 1]``, the ``K2`` logits of that softmax (float32), which is all the filter
  estimator needs from the aggregation.

``corr[b, 0]`` (frame 0 against itself) comes from a small XLA expression over frame 0 and reaches
the kernel's output through an input/output alias, so the kernel never writes that block (with
``T = 1`` that is all there is, and no kernel runs). Each
frame is read twice (as query and as neighbours) and ``out`` and ``corr`` are written once: about
3 + K2 / C passes over the feature map, where the separate XLA ops make ~20 in the forward pass.
The arithmetic is float32 whatever the input dtype. A block is a whole frame: at most
58 x 58 x 64 or 9 x 9 x 2048 values in DTF-R50 at 224², well inside a TPU core's VMEM.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dtf_jax.layers.aggregation import pad_space


def _kernel(query_ref, neighbours_ref, corr_in_ref, out_ref, corr_ref, *, kernel_size, height,
            width, channels, time):
  del corr_in_ref  # aliased to corr_ref: holds corr[:, 0] and everything not written here
  s = pl.program_id(1)
  p = kernel_size // 2
  query = query_ref[p:p + height, p:p + width, :].astype(jnp.float32)

  @pl.when(s < time - 1)
  def _():
    neighbours = [neighbours_ref[i:i + height, j:j + width, :].astype(jnp.float32)
                  for i in range(kernel_size) for j in range(kernel_size)]
    logits = jnp.stack([jnp.sum(query * n, axis=-1) for n in neighbours], axis=-1) / channels
    attention = jax.nn.softmax(logits, axis=-1)
    aggregated = functools.reduce(
        jnp.add, [attention[..., k:k + 1] * n for k, n in enumerate(neighbours)])
    corr_ref[...] = logits
    out_ref[...] = (query + aggregated).astype(out_ref.dtype)

  @pl.when(s == time - 1)
  def _():
    out_ref[...] = query.astype(out_ref.dtype)


def frame_wise_aggregation_kernel(x, kernel_size: int, interpret: bool = False):
  """``B T H W C -> (out B T H W C in x.dtype, corr B T H W K2 float32)``; forward only."""
  batch, time, height, width, channels = x.shape
  k2 = kernel_size ** 2
  padded = pad_space(x, kernel_size)
  hp, wp = padded.shape[2:4]
  first = padded[:, :1].astype(jnp.float32)  # frame 0 is its own query
  p = kernel_size // 2
  query0 = first[:, :, p:p + height, p:p + width, :]
  corr0 = jnp.stack([jnp.sum(query0 * first[:, :, i:i + height, j:j + width, :], axis=-1)
                     for i in range(kernel_size) for j in range(kernel_size)],
                    axis=-1) / channels
  if time == 1:  # no next frame: nothing to aggregate
    return x, corr0
  corr_in = jnp.zeros((batch, time, height, width, k2), jnp.float32).at[:, :1].set(corr0)

  squeezed = pl.squeezed
  frame = lambda index: pl.BlockSpec((squeezed, squeezed, hp, wp, channels), index)  # noqa: E731
  kernel = functools.partial(_kernel, kernel_size=kernel_size, height=height, width=width,
                             channels=channels, time=time)
  out, corr = pl.pallas_call(
      kernel,
      grid=(batch, time),
      in_specs=[frame(lambda b, s: (b, s, 0, 0, 0)),
                frame(lambda b, s: (b, jnp.minimum(s + 1, time - 1), 0, 0, 0)),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=[pl.BlockSpec((squeezed, squeezed, height, width, channels),
                              lambda b, s: (b, s, 0, 0, 0)),
                 pl.BlockSpec((squeezed, squeezed, height, width, k2),
                              lambda b, s: (b, jnp.minimum(s + 1, time - 1), 0, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((batch, time, height, width, k2), jnp.float32)],
      input_output_aliases={2: 1},
      interpret=interpret,
      name='dtf_frame_wise_aggregation',
  )(padded, padded, corr_in)
  return out, corr

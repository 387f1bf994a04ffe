"""Frame-wise aggregation as Pallas kernels over frame pairs (the ``'pallas'`` ``fa_impl``).

Semantics and shapes are those of ``aggregation.frame_wise_aggregation``. Step ``s`` of a kernel
reads frame ``s`` (the query) and frame ``min(s + 1, T - 1)`` (the neighbours), both zero-padded
by ``p = K // 2``, and writes

- ``out[b, s] = x[b, s] + agg[b, s + 1]`` (``x[b, s]`` alone at ``s = T - 1``), where ``agg[s+1]``
  is the softmax-weighted sum of frame ``s + 1``'s neighbours with frame ``s`` as the query;
- ``corr[b, s + 1]``, the ``K2`` logits of that softmax (float32), which is all the filter
  estimator needs from the aggregation.

Two tilings of the same computation, one per Pallas backend:

- ``'frame'`` (Mosaic, TPU): grid ``(B, T)``, a block is a whole padded frame ``(H + 2p) x
  (W + 2p) x C`` with the channels on the minor (lane) axis (block dims equal to the array's, as
  Mosaic's (8, 128) rule allows);
- ``'row'`` (Triton, GPU): grid ``(B, T, H)``, one output row per program, ``W`` padded to a power
  of two (Triton's tensor sizes) and the channels in chunks of ``CHANNEL_CHUNK``, loaded with
  masks from the whole arrays: a first loop over the chunks accumulates the ``K2`` logits, a second
  one the weighted neighbours, so that a program holds ``K2 + 1`` tiles of ``W x chunk`` values.

``corr[b, 0]`` (frame 0 against itself) comes from a small XLA expression over frame 0 and reaches
the kernel's output through an input/output alias, so the kernel never writes that block (with
``T = 1`` that is all there is, and no kernel runs). Each
frame is read twice (as query and as neighbours) and ``out`` and ``corr`` are written once: about
3 + K2 / C passes over the feature map, where the separate XLA ops make ~20 in the forward pass.
The arithmetic is float32 whatever the input dtype. A ``'frame'`` block is at most 58 x 58 x 64
or 9 x 9 x 2048 values in DTF-R50 at 224², well inside a TPU core's VMEM. The CPU runs either
tiling in interpret mode (the tests run both).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding, PartitionSpec as P


TILINGS = ('frame', 'row')
CHANNEL_CHUNK = 16


def _frame_kernel(query_ref, neighbours_ref, corr_in_ref, out_ref, corr_ref, *, kernel_size, height,
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


def _row_kernel(x_ref, corr_in_ref, out_ref, corr_ref, *, kernel_size, height, width, channels,
                time, width_pow2):
  del corr_in_ref  # aliased to corr_ref: holds corr[:, 0]
  b, s, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  p, k2 = kernel_size // 2, kernel_size ** 2
  nxt = jnp.minimum(s + 1, time - 1)
  has_next = s < time - 1
  cols = jnp.arange(width_pow2)
  chunks = pl.cdiv(channels, CHANNEL_CHUNK)

  def load(frame, row, col, c0):  # the padding covers every column of every neighbour
    mask = jnp.broadcast_to((c0 + jnp.arange(CHANNEL_CHUNK) < channels)[None, :],
                            (width_pow2, CHANNEL_CHUNK))
    return plgpu.load(x_ref.at[b, frame, row, pl.ds(col, width_pow2), pl.ds(c0, CHANNEL_CHUNK)],
                      mask=mask, other=0).astype(jnp.float32)

  def neighbours(c0):
    return [load(nxt, h + i, j, c0) for i in range(kernel_size) for j in range(kernel_size)]

  def add_logits(c, logits):
    c0 = c * CHANNEL_CHUNK
    query = load(s, h + p, p, c0)
    return tuple(acc + jnp.sum(query * n, axis=1) for acc, n in zip(logits, neighbours(c0)))

  zeros = jnp.zeros((width_pow2,), jnp.float32)
  logits = jax.lax.fori_loop(0, chunks, add_logits, (zeros,) * k2)
  logits = [acc / channels for acc in logits]
  top = functools.reduce(jnp.maximum, logits)
  exps = [jnp.exp(acc - top) for acc in logits]
  total = functools.reduce(jnp.add, exps)
  weights = [jnp.where(has_next, e / total, 0.0) for e in exps]  # the last frame adds nothing
  in_row = cols < width
  # The outputs are W wide, the tiles W' >= W: a traced start (zero) lets the masked store run
  # past W, which a static slice would refuse.
  first = h * 0
  for k in range(k2):
    plgpu.store(corr_ref.at[b, nxt, h, pl.ds(first, width_pow2), pl.ds(k, 1)],
                logits[k][:, None], mask=(in_row & has_next)[:, None])

  def write_chunk(c, carry):
    c0 = c * CHANNEL_CHUNK
    out = load(s, h + p, p, c0)
    for w, n in zip(weights, neighbours(c0)):
      out = out + w[:, None] * n
    mask = in_row[:, None] & (c0 + jnp.arange(CHANNEL_CHUNK) < channels)[None, :]
    plgpu.store(out_ref.at[b, s, h, pl.ds(first, width_pow2), pl.ds(c0, CHANNEL_CHUNK)],
                out.astype(out_ref.dtype), mask=mask)
    return carry

  jax.lax.fori_loop(0, chunks, write_chunk, 0)


@functools.lru_cache(maxsize=None)
def _batch_partitioned(kernel_size: int, tiling: str, interpret: bool):
  """The kernel as an op that XLA's partitioner splits along the batch (any other axis is
  gathered first), instead of gathering the whole batch onto every device."""
  def run(x):
    return _kernel_call(x, kernel_size, tiling, interpret)

  def batch_only(mesh, arg_shapes):
    sharding = arg_shapes[0].sharding
    spec = sharding.spec if isinstance(sharding, NamedSharding) else ()
    return NamedSharding(mesh, P(spec[0] if len(spec) else None))

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    return (batch_only(mesh, arg_shapes),) * 2

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    sharding = batch_only(mesh, arg_shapes)
    return mesh, run, (sharding, sharding), (sharding,)

  op = custom_partitioning(run)
  op.def_partition(infer_sharding_from_operands=infer, partition=partition,
                   sharding_rule='b t h w c -> b t h w c, b t h w k',
                   need_replication_factors=('t', 'h', 'w', 'c', 'k'))
  return op


def frame_wise_aggregation_kernel(x, kernel_size: int, tiling: str = 'frame',
                                  interpret: bool = False):
  """``B T H W C -> (out B T H W C in x.dtype, corr B T H W K2 float32)``; forward only.

  ``tiling``: ``'frame'`` (TPU) or ``'row'`` (GPU), see the module docstring. Under a mesh the
  kernel runs on each device's part of the batch: through ``shard_map`` where the batch axis's
  sharding is part of the type (Explicit mesh axes), else as a custom-partitioned op.
  """
  if tiling not in TILINGS:
    raise ValueError(f'tiling={tiling!r} is not one of {TILINGS}.')
  sharding = jax.typeof(x).sharding
  if not sharding.mesh.empty and sharding.spec and sharding.spec[0] is not None:
    spec = P(sharding.spec[0])
    return jax.shard_map(functools.partial(_kernel_call, kernel_size=kernel_size, tiling=tiling,
                                           interpret=interpret),
                         mesh=sharding.mesh, in_specs=spec, out_specs=(spec, spec),
                         check_vma=False)(x)
  return _batch_partitioned(kernel_size, tiling, interpret)(x)


def _kernel_call(x, kernel_size, tiling, interpret):
  """:func:`frame_wise_aggregation_kernel` on one device's data."""
  batch, time, height, width, channels = x.shape
  k2 = kernel_size ** 2
  p = kernel_size // 2
  padded = jnp.pad(x, ((0, 0), (0, 0), (p, p), (p, p), (0, 0)))  # zeros outside the frame
  hp, wp = padded.shape[2:4]
  first = padded[:, :1].astype(jnp.float32)  # frame 0 is its own query
  query0 = first[:, :, p:p + height, p:p + width, :]
  corr0 = jnp.stack([jnp.sum(query0 * first[:, :, i:i + height, j:j + width, :], axis=-1)
                     for i in range(kernel_size) for j in range(kernel_size)],
                    axis=-1) / channels
  if time == 1:  # no next frame: nothing to aggregate
    return x, corr0
  corr_in = jnp.pad(corr0, ((0, 0), (0, time - 1), (0, 0), (0, 0), (0, 0)))  # keeps sharding
  if tiling == 'row':
    width_pow2 = pl.next_power_of_2(width)
    padded = jnp.pad(padded, ((0, 0), (0, 0), (0, 0), (0, width_pow2 - width), (0, 0)))
    kernel = functools.partial(_row_kernel, kernel_size=kernel_size, height=height, width=width,
                               channels=channels, time=time, width_pow2=width_pow2)
    whole = pl.BlockSpec(memory_space=pl.ANY)
    out, corr = pl.pallas_call(
        kernel, grid=(batch, time, height), in_specs=[whole, whole], out_specs=[whole, whole],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct((batch, time, height, width, k2), jnp.float32)],
        input_output_aliases={1: 1}, interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=1),
        name='dtf_frame_wise_aggregation')(padded, corr_in)
    return out, corr

  squeezed = pl.squeezed
  frame = lambda index: pl.BlockSpec((squeezed, squeezed, hp, wp, channels), index)  # noqa: E731
  kernel = functools.partial(_frame_kernel, kernel_size=kernel_size, height=height, width=width,
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

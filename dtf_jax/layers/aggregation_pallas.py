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
The gradient (:func:`frame_wise_aggregation_grad`) keeps nothing from the forward pass but ``x``:
per frame pair it recomputes the logits and the attention, and gives the query frame ``s`` its
gradient ``dq`` and the neighbour frame ``s + 1`` its gradient ``dn`` (each location's
``a_k g + dlogit_k q / C`` added at its neighbour ``k``). The TPU tiling does both in one kernel
per frame pair (``dn`` accumulated in the output block by static shifted windows); the GPU tiling
in two row kernels, the first writing ``dq`` and the ``K2`` attention weights and logit
cotangents, the second gathering ``dn`` from them. XLA adds the residual's cotangent, ``dq``,
``dn`` shifted by one frame, and frame 0's own correlation's gradient.

The arithmetic is float32 whatever the input dtype. A ``'frame'`` block is at most 58 x 58 x 64
or 9 x 9 x 2048 values in DTF-R50 at 224² (0.9 MB in float32). Inside a frame the kernels loop
over bands of rows (:func:`band_rows`), so that only one band's ``K2`` float32 neighbour windows
and temporaries are live: compiled for TPU (v4, v5e, v5p, v6e; ``dtf_jax.tpu_target``), both
kernels fit the compiler's default 16 MiB of scoped VMEM at DTF-R50's stage 1 in bfloat16 (whole
frames, without bands: 32 MiB forward, more backward). The CPU runs either tiling in interpret
mode (the tests run both).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding, PartitionSpec as P


TILINGS = ('frame', 'row')
CHANNEL_CHUNK = 16


def band_rows(height: int, width: int, channels: int, kernel_size: int,
              backward: bool = False) -> int:
  """Rows per band of the 'frame' kernels (a divisor of ``H``): the band's float32 temporaries
  (forward: ``K2 + 4`` of ``rows x W x C``, backward ``4 K2 + 6``; TPU-tiled to multiples of
  (8, 128)) within ~4 MiB of VMEM, so that a kernel fits the 16 MiB of scoped VMEM that the TPU
  compiler gives it by default (v4 has no more)."""
  k2 = kernel_size ** 2
  row = -(-width // 8) * 8 * -(-channels // 128) * 128 * 4 * (4 * k2 + 6 if backward else k2 + 4)
  most = max(1, (2 ** 20 if backward else 4 * 2 ** 20) // row)
  return max(d for d in range(1, height + 1) if height % d == 0 and d <= most)


def _for_bands(height, rows, body):
  """``body(r0)`` for the bands ``[r0, r0 + rows)`` of ``H`` rows, in a loop (one band's
  temporaries live at a time)."""
  def step(band, carry):
    body(pl.multiple_of(band * rows, rows))
    return carry
  jax.lax.fori_loop(0, height // rows, step, 0)


def _frame_kernel(query_ref, neighbours_ref, corr_in_ref, out_ref, corr_ref, *, kernel_size, height,
                  width, channels, time, rows):
  del corr_in_ref  # aliased to corr_ref: holds corr[:, 0] and everything not written here
  s = pl.program_id(1)
  p = kernel_size // 2

  @pl.when(s < time - 1)
  def _():
    def band(r0):  # bands of rows bound the live VMEM temporaries
      query = query_ref[pl.ds(p + r0, rows), p:p + width, :].astype(jnp.float32)
      neighbours = [neighbours_ref[pl.ds(r0 + i, rows), j:j + width, :].astype(jnp.float32)
                    for i in range(kernel_size) for j in range(kernel_size)]
      logits = jnp.stack([jnp.sum(query * n, axis=-1) for n in neighbours], axis=-1) / channels
      attention = jax.nn.softmax(logits, axis=-1)
      aggregated = functools.reduce(
          jnp.add, [attention[..., k:k + 1] * n for k, n in enumerate(neighbours)])
      corr_ref[pl.ds(r0, rows)] = logits
      out_ref[pl.ds(r0, rows)] = (query + aggregated).astype(out_ref.dtype)
    _for_bands(height, rows, band)

  @pl.when(s == time - 1)
  def _():
    out_ref[...] = query_ref[p:p + height, p:p + width, :]


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


def _softmax_backward(logits, g_out_dots, g_corr):
  """Per neighbour ``k`` (lists over ``K2``): the attention ``a_k`` and ``dL/dlogit_k`` given
  ``<g_out, n_k>`` and the logits' own cotangent ``g_corr_k``."""
  top = functools.reduce(jnp.maximum, logits)
  exps = [jnp.exp(l - top) for l in logits]
  total = functools.reduce(jnp.add, exps)
  attention = [e / total for e in exps]
  mean = functools.reduce(jnp.add, [a * d for a, d in zip(attention, g_out_dots)])
  return attention, [a * (d - mean) + g for a, d, g in zip(attention, g_out_dots, g_corr)]


def _frame_backward_kernel(query_ref, neighbours_ref, g_out_ref, g_corr_ref, dq_ref, dn_ref,
                           dn_padded, *, kernel_size, height, width, channels, time, rows):
  """Step ``(b, s)``: ``dq`` (to frame ``s`` as the query) and ``dn`` (to frame ``s + 1`` as the
  neighbours) of the pair ``(s, s + 1)``; zero at ``s = T - 1``. Row bands as the forward;
  ``dn`` is accumulated in the padded float32 scratch ``dn_padded`` (``H+2p W+2p C``)."""
  s = pl.program_id(1)
  p = kernel_size // 2
  dq_ref[...] = jnp.zeros(dq_ref.shape, dq_ref.dtype)
  dn_ref[...] = jnp.zeros(dn_ref.shape, dn_ref.dtype)

  @pl.when(s < time - 1)
  def _():
    dn_padded[...] = jnp.zeros(dn_padded.shape, dn_padded.dtype)

    def band(r0):
      query = query_ref[pl.ds(p + r0, rows), p:p + width, :].astype(jnp.float32)
      g_out = g_out_ref[pl.ds(r0, rows)].astype(jnp.float32)
      g_corr = g_corr_ref[pl.ds(r0, rows)]
      neighbours = [neighbours_ref[pl.ds(r0 + i, rows), j:j + width, :].astype(jnp.float32)
                    for i in range(kernel_size) for j in range(kernel_size)]
      logits = [jnp.sum(query * n, axis=-1, keepdims=True) / channels for n in neighbours]
      dots = [jnp.sum(g_out * n, axis=-1, keepdims=True) for n in neighbours]
      attention, d_logits = _softmax_backward(
          logits, dots, [g_corr[..., k:k + 1] for k in range(kernel_size ** 2)])
      dq_ref[pl.ds(r0, rows)] = (functools.reduce(
          jnp.add, [d * n for d, n in zip(d_logits, neighbours)]) / channels).astype(dq_ref.dtype)
      for k, (a, d) in enumerate(zip(attention, d_logits)):
        i, j = k // kernel_size, k % kernel_size
        dn_padded[pl.ds(r0 + i, rows), j:j + width, :] += a * g_out + d * query / channels
    _for_bands(height, rows, band)
    dn_ref[...] = dn_padded[p:p + height, p:p + width, :].astype(dn_ref.dtype)


def _row_backward_kernel_a(x_ref, g_out_ref, g_corr_ref, dq_ref, att_ref, dlog_ref, *,
                           kernel_size, height, width, channels, time, width_pow2):
  """Row ``h`` of the pair ``(s, s + 1)``: ``dq`` (to frame ``s``), and the attention and
  logit cotangents that the neighbours' gradient (kernel B) gathers."""
  b, s, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  p, k2 = kernel_size // 2, kernel_size ** 2
  nxt = jnp.minimum(s + 1, time - 1)
  has_next = s < time - 1
  chunks = pl.cdiv(channels, CHANNEL_CHUNK)
  lanes = jnp.arange(CHANNEL_CHUNK)

  def load(ref, frame, row, col, c0):
    mask = jnp.broadcast_to((c0 + lanes < channels)[None, :], (width_pow2, CHANNEL_CHUNK))
    return plgpu.load(ref.at[b, frame, row, pl.ds(col, width_pow2), pl.ds(c0, CHANNEL_CHUNK)],
                      mask=mask, other=0).astype(jnp.float32)

  def neighbours(c0):
    return [load(x_ref, nxt, h + i, j, c0) for i in range(kernel_size) for j in range(kernel_size)]

  def add_dots(c, carry):
    logits, dots = carry
    c0 = c * CHANNEL_CHUNK
    query, g_out = load(x_ref, s, h + p, p, c0), load(g_out_ref, s, h + p, p, c0)
    nbs = neighbours(c0)
    return (tuple(acc + jnp.sum(query * n, axis=1) for acc, n in zip(logits, nbs)),
            tuple(acc + jnp.sum(g_out * n, axis=1) for acc, n in zip(dots, nbs)))

  zeros = (jnp.zeros((width_pow2,), jnp.float32),) * k2
  logits, dots = jax.lax.fori_loop(0, chunks, add_dots, (zeros, zeros))
  first = h * 0  # traced: the masked stores below run past W (see _row_kernel)
  g_corr = [plgpu.load(g_corr_ref.at[b, nxt, h, pl.ds(first, width_pow2), pl.ds(k, 1)],
                       mask=(jnp.arange(width_pow2) < width)[:, None], other=0)[:, 0]
            for k in range(k2)]
  attention, d_logits = _softmax_backward([l / channels for l in logits], list(dots), g_corr)
  attention = [jnp.where(has_next, a, 0.0) for a in attention]
  d_logits = [jnp.where(has_next, d, 0.0) for d in d_logits]
  in_row = jnp.arange(width_pow2) < width
  for k in range(k2):
    for ref, value in ((att_ref, attention[k]), (dlog_ref, d_logits[k])):
      plgpu.store(ref.at[b, s, h, pl.ds(first, width_pow2), pl.ds(k, 1)], value[:, None],
                  mask=in_row[:, None])

  def write_chunk(c, carry):
    c0 = c * CHANNEL_CHUNK
    dq = functools.reduce(jnp.add, [d[:, None] * n for d, n in zip(d_logits, neighbours(c0))])
    mask = in_row[:, None] & (c0 + lanes < channels)[None, :]
    plgpu.store(dq_ref.at[b, s, h, pl.ds(first, width_pow2), pl.ds(c0, CHANNEL_CHUNK)],
                dq / channels, mask=mask)
    return carry

  jax.lax.fori_loop(0, chunks, write_chunk, 0)


def _row_backward_kernel_b(x_ref, g_out_ref, att_ref, dlog_ref, dn_ref, *, kernel_size, width,
                           channels, width_pow2):
  """Row ``h`` of ``dn`` (to frame ``s + 1``): ``sum_k (a_k g_out + dlogit_k q / C)`` taken at
  the location whose neighbour ``k`` this is. Inputs zero-padded by ``p`` (``att``, ``dlog``
  zero at ``s = T - 1``)."""
  b, s, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k2 = kernel_size ** 2
  chunks = pl.cdiv(channels, CHANNEL_CHUNK)
  lanes = jnp.arange(CHANNEL_CHUNK)
  # Neighbour k = (i, j) of (h', w') - (i - p, j - p) is (h', w'): padded row h + K-1-i, col K-1-j.
  offsets = [(kernel_size - 1 - k // kernel_size, kernel_size - 1 - k % kernel_size)
             for k in range(k2)]
  weights = [(att_ref[b, s, h + r, pl.ds(c, width_pow2), pl.ds(k, 1)],
              dlog_ref[b, s, h + r, pl.ds(c, width_pow2), pl.ds(k, 1)])
             for k, (r, c) in enumerate(offsets)]  # each W' x 1

  def load(ref, row, col, c0):
    mask = jnp.broadcast_to((c0 + lanes < channels)[None, :], (width_pow2, CHANNEL_CHUNK))
    return plgpu.load(ref.at[b, s, row, pl.ds(col, width_pow2), pl.ds(c0, CHANNEL_CHUNK)],
                      mask=mask, other=0).astype(jnp.float32)

  first = h * 0
  in_row = jnp.arange(width_pow2) < width

  def write_chunk(c, carry):
    c0 = c * CHANNEL_CHUNK
    dn = 0.0
    for (a, d), (r, col) in zip(weights, offsets):
      dn = dn + a * load(g_out_ref, h + r, col, c0) + d * load(x_ref, h + r, col, c0) / channels
    mask = in_row[:, None] & (c0 + lanes < channels)[None, :]
    plgpu.store(dn_ref.at[b, s, h, pl.ds(first, width_pow2), pl.ds(c0, CHANNEL_CHUNK)], dn,
                mask=mask)
    return carry

  jax.lax.fori_loop(0, chunks, write_chunk, 0)


@functools.lru_cache(maxsize=None)
def _batch_partitioned(fn, rule: str, num_outputs: int):
  """``fn`` (arrays with a leading batch axis -> ``num_outputs`` of them) as an op that XLA's
  partitioner splits along the batch (any other axis is gathered first), instead of gathering
  the whole batch onto every device. ``rule``: its Shardy sharding rule."""
  def batch_only(mesh, arg_shapes):
    sharding = arg_shapes[0].sharding
    spec = sharding.spec if isinstance(sharding, NamedSharding) else ()
    return NamedSharding(mesh, P(spec[0] if len(spec) else None))

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    return (batch_only(mesh, arg_shapes),) * num_outputs

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    sharding = batch_only(mesh, arg_shapes)
    return mesh, fn, (sharding,) * num_outputs, (sharding,) * len(arg_shapes)

  op = custom_partitioning(fn)
  op.def_partition(infer_sharding_from_operands=infer, partition=partition, sharding_rule=rule,
                   need_replication_factors=('t', 'h', 'w', 'c', 'k'))
  return op


def per_batch_shard(fn, num_outputs: int, *args, rule: str = None, replicated: int = 0):
  """``fn(*args)`` run on each device's part of the batch, through ``shard_map``: over the batch
  axis's mesh axes where they are part of the type (Explicit mesh axes), else over every axis of
  the mesh set with ``jax.set_mesh`` (Auto axes; the trainer sets it) when the batch divides
  evenly. The last ``replicated`` arguments (weights) are whole on every device. Without a mesh
  the op is custom-partitioned along the batch by the Shardy ``rule`` (XLA's partitioner splits
  it on CPU and GPU; the TPU compiler has no emitter for that route, so set the mesh there); with
  weights it is left to XLA as it is."""
  sharding = jax.typeof(args[0]).sharding
  if not sharding.mesh.empty and sharding.spec and sharding.spec[0] is not None:
    spec, mesh = P(sharding.spec[0]), sharding.mesh
  else:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or args[0].shape[0] % mesh.size:
      if replicated:
        return fn(*args)
      return _batch_partitioned(fn, rule, num_outputs)(*args)
    spec = P(mesh.axis_names)
  batched = len(args) - replicated
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * batched + (P(),) * replicated,
                       out_specs=(spec,) * num_outputs, check_vma=False)(*args)


def frame_wise_aggregation_kernel(x, kernel_size: int, tiling: str = 'frame',
                                  interpret: bool = False):
  """``B T H W C -> (out B T H W C in x.dtype, corr B T H W K2 float32)``; forward only.

  ``tiling``: ``'frame'`` (TPU) or ``'row'`` (GPU), see the module docstring. Under a mesh the
  kernel runs on each device's part of the batch (see :func:`per_batch_shard`).
  """
  if tiling not in TILINGS:
    raise ValueError(f'tiling={tiling!r} is not one of {TILINGS}.')
  return per_batch_shard(_forward_fn(kernel_size, tiling, interpret), 2, x,
                         rule='b t h w c -> b t h w c, b t h w k')


def frame_wise_aggregation_grad(x, g_out, g_corr, kernel_size: int, tiling: str = 'frame',
                                interpret: bool = False):
  """The gradient of :func:`frame_wise_aggregation_kernel` in ``x`` for the cotangents ``g_out``
  (``B T H W C``) and ``g_corr`` (``B T H W K2``): ``B T H W C`` in ``x.dtype``."""
  if tiling not in TILINGS:
    raise ValueError(f'tiling={tiling!r} is not one of {TILINGS}.')
  return per_batch_shard(_backward_fn(kernel_size, tiling, interpret), 1, x, g_out, g_corr,
                         rule='b t h w c, b t h w c, b t h w k -> b t h w c')[0]


@functools.lru_cache(maxsize=None)
def _forward_fn(kernel_size, tiling, interpret):
  def forward(x):  # positional arguments only (custom_partitioning)
    return _kernel_call(x, kernel_size, tiling, interpret)
  return forward


@functools.lru_cache(maxsize=None)
def _backward_fn(kernel_size, tiling, interpret):
  def backward(x, g_out, g_corr):
    return _backward_call(x, g_out, g_corr, kernel_size, tiling, interpret)
  return backward


def _first_frame_correlation(first, kernel_size, height, width, channels):
  """``corr[:, 0]``: frame 0 (``B 1 H+2p W+2p C``, padded, float32) against itself."""
  p = kernel_size // 2
  query0 = first[:, :, p:p + height, p:p + width, :]
  return jnp.stack([jnp.sum(query0 * first[:, :, i:i + height, j:j + width, :], axis=-1)
                    for i in range(kernel_size) for j in range(kernel_size)],
                   axis=-1) / channels


def _backward_call(x, g_out, g_corr, kernel_size, tiling, interpret):
  """:func:`frame_wise_aggregation_grad` on one device's data."""
  batch, time, height, width, channels = x.shape
  k2 = kernel_size ** 2
  p = kernel_size // 2
  pad = lambda v, w=0: jnp.pad(v, ((0, 0), (0, 0), (p, p), (p, p + w), (0, 0)))  # noqa: E731
  _, first_vjp = jax.vjp(
      lambda v: _first_frame_correlation(pad(v), kernel_size, height, width, channels),
      x[:, :1].astype(jnp.float32))
  (d_first,) = first_vjp(g_corr[:, :1])
  grad = g_out.astype(jnp.float32) + jnp.pad(d_first, ((0, 0), (0, time - 1), (0, 0), (0, 0),
                                                        (0, 0)))
  if time == 1:
    return (grad.astype(x.dtype),)
  shape = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  if tiling == 'row':
    width_pow2 = pl.next_power_of_2(width)
    extra = width_pow2 - width
    whole = pl.BlockSpec(memory_space=pl.ANY)
    params = None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=1)
    weights = jax.ShapeDtypeStruct((batch, time, height, width, k2), jnp.float32)
    dq, attention, d_logits = pl.pallas_call(
        functools.partial(_row_backward_kernel_a, kernel_size=kernel_size, height=height,
                          width=width, channels=channels, time=time, width_pow2=width_pow2),
        grid=(batch, time, height), in_specs=[whole] * 3, out_specs=[whole] * 3,
        out_shape=[shape, weights, weights], interpret=interpret, compiler_params=params,
        name='dtf_frame_wise_aggregation_grad_query')(pad(x, extra), pad(g_out, extra), g_corr)
    (dn,) = pl.pallas_call(
        functools.partial(_row_backward_kernel_b, kernel_size=kernel_size, width=width,
                          channels=channels, width_pow2=width_pow2),
        grid=(batch, time, height), in_specs=[whole] * 4, out_specs=[whole],
        out_shape=[shape], interpret=interpret, compiler_params=params,
        name='dtf_frame_wise_aggregation_grad_neighbours')(
            pad(x, extra), pad(g_out, extra), pad(attention, extra), pad(d_logits, extra))
  else:
    padded = pad(x)
    hp, wp = padded.shape[2:4]
    squeezed = pl.squeezed
    block = lambda h, w, c, index: pl.BlockSpec((squeezed, squeezed, h, w, c), index)  # noqa: E731
    this = lambda b, s: (b, s, 0, 0, 0)  # noqa: E731
    after = lambda b, s: (b, jnp.minimum(s + 1, time - 1), 0, 0, 0)  # noqa: E731
    dq, dn = pl.pallas_call(
        functools.partial(_frame_backward_kernel, kernel_size=kernel_size, height=height,
                          width=width, channels=channels, time=time,
                          rows=band_rows(height, width, channels, kernel_size, backward=True)),
        grid=(batch, time),
        in_specs=[block(hp, wp, channels, this), block(hp, wp, channels, after),
                  block(height, width, channels, this), block(height, width, k2, after)],
        out_specs=[block(height, width, channels, this), block(height, width, channels, this)],
        # dq and dn in x's dtype: their double-buffered frame blocks are the kernel's largest
        # (float32 at 56x56x64 would not fit v4's 16 MiB of VMEM beside the inputs).
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)] * 2,
        scratch_shapes=[pltpu.VMEM((hp, wp, channels), jnp.float32)], interpret=interpret,
        name='dtf_frame_wise_aggregation_grad')(padded, padded, g_out, g_corr)
  # dq[s] goes to frame s (the query), dn[s] to frame s + 1 (the neighbours).
  grad = grad + dq + jnp.pad(dn[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))
  return (grad.astype(x.dtype),)


def _kernel_call(x, kernel_size, tiling, interpret):
  """:func:`frame_wise_aggregation_kernel` on one device's data: ``(out, corr)``."""
  batch, time, height, width, channels = x.shape
  k2 = kernel_size ** 2
  p = kernel_size // 2
  padded = jnp.pad(x, ((0, 0), (0, 0), (p, p), (p, p), (0, 0)))  # zeros outside the frame
  hp, wp = padded.shape[2:4]
  corr0 = _first_frame_correlation(padded[:, :1].astype(jnp.float32), kernel_size, height, width,
                                   channels)  # frame 0 is its own query
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
                             channels=channels, time=time,
                             rows=band_rows(height, width, channels, kernel_size))
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

"""Tests of the JAX DTF block (dtf_jax/layers/dtf.py) against the float64 NumPy reference.

The NumPy reference (tests/numpy_reference.py) is written literally from SPEC section 1 and uses
the official layouts (``B C T H W`` input, ``filter_g.weight [O, (C+K2)*T]``,
``complex_weight [C_out, C_in, 2]``); the helpers below map the JAX parameters onto them.
"""

import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtf_jax import tpu_target
from dtf_jax.layers import dtf_pallas
from dtf_jax.layers.aggregation import frame_aggregation, frame_correlation
from dtf_jax.layers.dtf import DTFBlock
from dtf_jax.layers.spectral import DFT_SCOPE, irfft_time, resolve_spectral_impl, rfft_time
from dtf_jax.models import create_model

sys.path.insert(0, os.path.dirname(__file__))

from numpy_reference import dtf_block_numpy  # noqa: E402

# float32 JAX vs float64 NumPy: |jax - ref| <= ATOL + RTOL * |ref| elementwise.
ATOL = 1e-4
RTOL = 1e-4


_init = jax.jit(lambda block, x: block.init(jax.random.PRNGKey(0), x), static_argnums=0)
_eval = jax.jit(lambda block, v, x: block.apply(v, x, train=False), static_argnums=0)
_train = jax.jit(lambda block, v, x: block.apply(v, x, train=True, mutable=['batch_stats']),
                 static_argnums=0)


def _report(name, actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  diff = np.abs(actual - expected)
  print(f'{name}: max abs diff {diff.max():.3g}, max |ref| {np.abs(expected).max():.3g}')
  return diff.max()


def _random_variables(block, x, seed):
  """Initialises ``block`` on ``x`` and randomises every parameter and BN statistic."""
  variables = flax.core.unfreeze(_init(block, x))
  p, s = variables['params'], variables['batch_stats']['spectrum_norm']
  rng = np.random.default_rng(seed)
  time, in_ch, out_ch = p['filter_kernel'].shape
  channels = p['alpha'].shape[0]
  p['filter_kernel'] = jnp.asarray(rng.normal(0, 1 / np.sqrt(time * in_ch), (time, in_ch, out_ch)),
                                   jnp.float32)
  p['mix_kernel'] = jnp.asarray(rng.normal(0, 1 / np.sqrt(2 * channels), (2, channels, channels)),
                                jnp.float32)
  p['alpha'] = jnp.asarray(rng.normal(0, 0.5, channels), jnp.float32)
  p['bias'] = jnp.asarray(rng.normal(0, 0.5, channels), jnp.float32)
  s['mean'] = jnp.asarray(rng.normal(0, 0.3, channels), jnp.float32)
  s['var'] = jnp.asarray(rng.uniform(0.5, 2.0, channels), jnp.float32)
  return variables


def _numpy_args(variables):
  """JAX variables -> keyword arguments of ``dtf_block_numpy`` in the official layouts."""
  p, s = variables['params'], variables['batch_stats']['spectrum_norm']
  out_ch = p['filter_kernel'].shape[-1]
  return dict(
      # [T, C+K2, O] -> [O, (C+K2)*T] (channel-major, then time)
      filter_weight=np.asarray(p['filter_kernel'], np.float64).transpose(2, 1, 0).reshape(
          out_ch, -1),
      # [2, C_in, C_out] -> [C_out, C_in, 2]
      complex_weight=np.asarray(p['mix_kernel'], np.float64).transpose(2, 1, 0),
      alpha=np.asarray(p['alpha'], np.float64),
      bias=np.asarray(p['bias'], np.float64),
      running_mean=np.asarray(s['mean'], np.float64),
      running_var=np.asarray(s['var'], np.float64),
  )


def _to_official(x):
  return np.asarray(x, np.float64).transpose(0, 4, 1, 2, 3)  # B T H W C -> B C T H W


def _random_input(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(0, 1, shape), jnp.float32)



# ---------------------------------------------------------------------------
# Forward parity with the float64 NumPy reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('time,height,width,group_factor', [
    (4, 5, 6, 16), (5, 7, 5, 16), (8, 6, 7, 16),
    # With G = 16 several bins share one estimator channel and re == im, so some wrong expansion
    # orders would go unseen: G = 2 gives every (c, f) its own channel (catches a wrong c/f
    # order), G = 1 also separates re and im (catches swapped real/imaginary parts).
    (5, 5, 6, 2), (4, 5, 5, 1)])
def test_block_matches_numpy_reference_eval(time, height, width, group_factor):
  x = _random_input((2, time, height, width, 16), seed=time * 10 + group_factor)
  block = DTFBlock(group_factor=group_factor)
  variables = _random_variables(block, x, seed=time)
  y = _eval(block, variables, x)
  ref = dtf_block_numpy(_to_official(x), **_numpy_args(variables), train=False, G=group_factor)
  ref = ref.transpose(0, 2, 3, 4, 1)
  assert y.shape == x.shape and y.dtype == jnp.float32
  _report(f'eval T={time} G={group_factor}', y, ref)
  # The block must actually do something here (alpha, bias random): not the identity.
  assert np.abs(np.asarray(y) - np.asarray(x)).max() > 0.1
  np.testing.assert_allclose(np.asarray(y), ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize('time,fa_impl,spectral_impl', [
    (4, 'auto', 'auto'), (5, 'auto', 'auto'), (8, 'auto', 'auto'), (5, 'xla', 'auto'),
    (5, 'pallas', 'auto'), (8, 'auto', 'matmul'), (5, 'auto', 'matmul'), (5, 'auto', 'fft')])
def test_block_matches_numpy_reference_train(time, fa_impl, spectral_impl):
  x = _random_input((2, time, 6, 5, 16), seed=100 + time)
  block = DTFBlock(fa_impl=fa_impl, spectral_impl=spectral_impl)
  variables = _random_variables(block, x, seed=200 + time)
  y, updates = _train(block, variables, x)
  ref, ref_mean, ref_var = dtf_block_numpy(_to_official(x), **_numpy_args(variables), train=True)
  _report(f'train T={time} out', y, ref.transpose(0, 2, 3, 4, 1))
  np.testing.assert_allclose(np.asarray(y), ref.transpose(0, 2, 3, 4, 1), atol=ATOL, rtol=RTOL)
  stats = updates['batch_stats']['spectrum_norm']
  _report(f'train T={time} running mean', stats['mean'], ref_mean)
  _report(f'train T={time} running var', stats['var'], ref_var)
  # Running stats: PyTorch momentum 0.1, unbiased variance. Same 1e-4 tolerance.
  np.testing.assert_allclose(np.asarray(stats['mean']), ref_mean, atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(np.asarray(stats['var']), ref_var, atol=ATOL, rtol=RTOL)
  # The stats did move (else the comparison above could pass for a no-op update).
  assert np.abs(np.asarray(stats['var']) - np.asarray(variables['batch_stats']['spectrum_norm']
                                                       ['var'])).max() > 1e-3
  # Train mode uses batch statistics, not the (random) running ones: the output differs from eval.
  y_eval = _eval(block, variables, x)
  assert np.abs(np.asarray(y_eval) - np.asarray(y)).max() > 1e-2


@pytest.mark.parametrize('rows', [None, 2])
def test_fused_block_matches_numpy_reference(rows, monkeypatch):
  """``block_impl='fused'`` (the Pallas kernels, interpreted on the CPU) on whole clips and on row
  tiles of 2 rows (each with the 2 rows below): eval and train outputs and the running statistics
  equal the NumPy reference (G = 2: every bin and part its own estimator channel); the gradient
  of a training step (the backward kernels; the tiles' rows above and below added across tiles)
  equals that of ``'parts'`` in the input and every parameter."""
  if rows:  # and the filter expanded in 2 channel blocks of 4 (estimator windows 0, 12)
    monkeypatch.setattr(dtf_pallas, 'tile_rows', lambda *args: rows)
    monkeypatch.setattr(dtf_pallas, 'LANES', 4)
  x = _random_input((2, 4, 4, 5, 8), seed=7)  # T = 4: a Nyquist bin
  block = DTFBlock(block_impl='fused', group_factor=2)
  variables = _random_variables(block, x, seed=8)
  official = dict(_numpy_args(variables), G=2)
  evaluate = lambda v, x: block.apply(v, x)  # noqa: E731
  train = lambda v, x: block.apply(v, x, train=True, mutable=['batch_stats'])  # noqa: E731
  jaxpr = str(jax.make_jaxpr(train)(variables, x))
  assert 'dtf_block_moments' in jaxpr and 'dtf_block_output' in jaxpr
  y = jax.jit(evaluate)(variables, x)
  ref = dtf_block_numpy(_to_official(x), **official, train=False).transpose(0, 2, 3, 4, 1)
  _report('fused eval', y, ref)
  np.testing.assert_allclose(np.asarray(y), ref, atol=ATOL, rtol=RTOL)
  y, updates = jax.jit(train)(variables, x)
  ref, ref_mean, ref_var = dtf_block_numpy(_to_official(x), **official, train=True)
  _report('fused train', y, ref.transpose(0, 2, 3, 4, 1))
  np.testing.assert_allclose(np.asarray(y), ref.transpose(0, 2, 3, 4, 1), atol=ATOL, rtol=RTOL)
  stats = updates['batch_stats']['spectrum_norm']
  np.testing.assert_allclose(np.asarray(stats['mean']), ref_mean, atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(np.asarray(stats['var']), ref_var, atol=ATOL, rtol=RTOL)

  def grads(impl):
    other = DTFBlock(block_impl=impl, group_factor=2)
    weights = jnp.arange(8.0)  # a different cotangent per channel
    loss = lambda p, x: jnp.sum(jnp.sin(other.apply(  # noqa: E731
        {**variables, 'params': p}, x, train=True, mutable=['batch_stats'])[0]) * weights)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables['params'], x)
  got, want = grads('fused'), grads('parts')
  assert 'dtf_block_grad' in str(jax.make_jaxpr(jax.grad(
      lambda x: jnp.sum(block.apply(variables, x, train=True, mutable=['batch_stats'])[0])))(x))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    scale = np.abs(np.asarray(w)).max()
    _report(f'fused gradient {jax.tree_util.keystr(path)}', g, w)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize('channels,time,group_factor,lanes', [
    (512, 16, 16, 128), (1024, 16, 16, 128), (512, 4, 16, 128), (64, 4, 16, 128), (8, 4, 2, 4),
    (24, 8, 4, 8)])
def test_expansion_blocks_hold_the_dense_expansion(channels, time, group_factor, lanes):
  """``expansion_blocks``: each channel block's matrix placed at its window gives back the dense
  0/1 expansion (the official in-place repetition), windows aligned and inside the padded output;
  where whole blocks would not be smaller (few bins) one block holds all channels."""
  bins = time // 2 + 1
  blocks, starts, padded_out = dtf_pallas.expansion_blocks(channels, bins, group_factor, lanes)
  out = channels * bins * 2 // group_factor
  dense = np.zeros((2 * bins, padded_out, channels))
  for f in range(bins):
    for r in range(2):
      for c in range(channels):
        dense[2 * f + r, (c * 2 * bins + 2 * f + r) // group_factor, c] = 1
  nb, _, width, cb = blocks.shape
  assert nb * cb == channels and padded_out >= out
  rebuilt = np.zeros_like(dense)
  for b, start in enumerate(starts):
    assert start % lanes == 0 and start + width <= padded_out
    rebuilt[:, start:start + width, b * cb:(b + 1) * cb] += blocks[b]
  np.testing.assert_array_equal(rebuilt, dense)
  if nb == 1:  # the dense matrix: blocks would be no smaller
    assert (width, padded_out) == (out, out)
  else:
    assert nb == channels // lanes and padded_out % lanes == 0 and width < padded_out
  if (channels, time) == (1024, 16):  # DTF-Swin-B stage 4: 8 blocks of 18 x 256 x 128
    assert blocks.shape == (8, 18, 256, 128) and padded_out == 1152


def test_fused_block_row_tiles_fit_the_vmem_budget(monkeypatch):
  """``tile_rows``: the whole clip where its blocks, the weights and a row step's temporaries fit
  the VMEM budget (from the chip that programs are compiled for), else the largest even divisor
  of H whose tiles (with the 2 rows below, and their VMEM copy) fit; 0 where none does."""
  monkeypatch.setattr(tpu_target, '_DESCRIBED', [])  # no TPU target: v4's 16 MiB, less 4
  assert dtf_pallas.vmem_budget() == 12 * 2 ** 20
  assert dtf_pallas.tile_rows((4, 4, 28, 28, 128), 2, 3, 0) == 28  # DTF-R50 stage 2: whole
  assert dtf_pallas.tile_rows((4, 16, 56, 56, 128), 2, 3, 0) == 0  # DTF-Swin-B stage 1
  monkeypatch.setattr(tpu_target, '_DESCRIBED', [tpu_target.parse_target('v5e:2x2')])
  budget = dtf_pallas.vmem_budget()
  assert budget == 60 * 2 ** 20  # half of v5e's 128 MiB, less 4
  shape = (4, 16, 56, 56, 128)
  temporaries = dtf_pallas.row_temporaries(shape, 3)
  row_in, row_out = 16 * 64 * 128 * 2, 16 * 56 * 128 * 2  # T = 16 rows of 58 / 56 columns
  rows = dtf_pallas.tile_rows(shape, 2, 3, 0)
  assert 0 < rows < 56 and 56 % rows == 0 and rows % 2 == 0
  assert 2 * 58 * row_in + 2 * 56 * row_out + temporaries > budget  # the whole clip does not fit
  assert (3 * (rows + 2) + 2) * row_in + 2 * rows * row_out + temporaries <= budget
  assert dtf_pallas.tile_rows((4, 16, 14, 14, 512), 2, 3, budget) == 0  # weights fill VMEM
  # DTF-Swin-B at 64 frames, one clip per chip: stage 3's estimator (4.8M parameters) fits as
  # bfloat16 with the expansion in channel blocks, forward only; stage 4's (19M) does not.
  stage3, stage4 = (1, 16, 14, 14, 512), (1, 16, 7, 7, 1024)
  assert dtf_pallas.supported(stage3, jnp.bfloat16, 3, 16)
  assert not dtf_pallas.supported(stage3, jnp.bfloat16, 3, 16, backward=True)
  assert not dtf_pallas.supported(stage4, jnp.bfloat16, 3, 16)
  assert dtf_pallas.weight_bytes(stage3, jnp.bfloat16, 3, 16) == (
      2 * 16 * 512 * 640 + 2 * 4 * 18 * 256 * 128  # features and expansion blocks, bfloat16
      + 4 * (16 * 16 * 640 + 2 * 512 * 512 + 8 * 512))  # correlation rows (9 -> 16), mixing


def test_frame_ops_match_definition():
  """frame_correlation / frame_aggregation against the SPEC formulas (loops over offsets)."""
  x = np.random.default_rng(0).normal(size=(2, 3, 5, 6, 4)).astype(np.float32)
  att = np.random.default_rng(1).uniform(size=(2, 3, 5, 6, 9)).astype(np.float32)
  xd = x.astype(np.float64)
  padded = np.pad(xd, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
  query = xd[:, [max(t - 1, 0) for t in range(3)]]
  corr = np.zeros((2, 3, 5, 6, 9))
  agg = np.zeros_like(xd)
  for i in range(3):
    for j in range(3):
      nb = padded[:, :, i:i + 5, j:j + 6]
      corr[..., i * 3 + j] = (query * nb).mean(-1)
      agg += att[..., i * 3 + j:i * 3 + j + 1] * nb
  np.testing.assert_allclose(np.asarray(frame_correlation(jnp.asarray(x), 3)), corr,
                             atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(frame_aggregation(jnp.asarray(x), jnp.asarray(att), 3)),
                             agg, atol=1e-6, rtol=1e-5)


def _naive_correlation(x, k):
  """Straightforward autodiff-able correlation (unfold), for gradient checks."""
  p = k // 2
  h, w = x.shape[2:4]
  padded = jnp.pad(x, ((0, 0), (0, 0), (p, p), (p, p), (0, 0)))
  query = jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)
  return jnp.stack([jnp.mean(query * padded[:, :, i:i + h, j:j + w], -1)
                    for i in range(k) for j in range(k)], -1)


def _naive_aggregation(x, att, k):
  p = k // 2
  h, w = x.shape[2:4]
  padded = jnp.pad(x, ((0, 0), (0, 0), (p, p), (p, p), (0, 0)))
  return sum(att[..., i * k + j:i * k + j + 1] * padded[:, :, i:i + h, j:j + w]
             for i in range(k) for j in range(k))


def test_frame_ops_gradients_match_autodiff():
  """The frame ops' gradients (hand-written VJPs, if any) equal autodiff of a naive version."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 3, 5, 6, 8)), jnp.float32)
  att = jnp.asarray(rng.uniform(size=(2, 3, 5, 6, 9)), jnp.float32)
  gc = jnp.asarray(rng.normal(size=(2, 3, 5, 6, 9)), jnp.float32)
  ga = jnp.asarray(rng.normal(size=(2, 3, 5, 6, 8)), jnp.float32)

  got = jax.grad(lambda x: jnp.sum(frame_correlation(x, 3) * gc))(x)
  want = jax.grad(lambda x: jnp.sum(_naive_correlation(x, 3) * gc))(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)

  got = jax.grad(lambda x, a: jnp.sum(frame_aggregation(x, a, 3) * ga), argnums=(0, 1))(x, att)
  want = jax.grad(lambda x, a: jnp.sum(_naive_aggregation(x, a, 3) * ga), argnums=(0, 1))(x, att)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)

  # Second order through the whole block path (softmax of the correlation feeding aggregation).
  def chain(fn_corr, fn_agg):
    def f(x):
      a = jax.nn.softmax(fn_corr(x, 3), axis=-1)
      return jnp.sum(fn_agg(x, a, 3) * ga)
    return jax.grad(f)(x)
  np.testing.assert_allclose(np.asarray(chain(frame_correlation, frame_aggregation)),
                             np.asarray(chain(_naive_correlation, _naive_aggregation)),
                             atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# Initialisation, gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('train', [False, True])
def test_identity_at_initialisation(train):
  x = _random_input((2, 4, 5, 5, 16), seed=7)
  block = DTFBlock()
  variables = _init(block, x)
  assert np.all(np.asarray(variables['params']['alpha']) == 0)
  assert np.all(np.asarray(variables['params']['bias']) == 0)
  if train:
    y, _ = _train(block, variables, x)
  else:
    y = _eval(block, variables, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))  # exact


def _leaves(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_gradients_reach_every_block_parameter():
  x = _random_input((2, 4, 5, 6, 16), seed=11)
  block = DTFBlock()
  variables = _random_variables(block, x, seed=12)
  weights = _random_input(x.shape, seed=13)

  def loss(params):
    y, _ = block.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                       train=True, mutable=['batch_stats'])
    return jnp.sum(y * weights)

  grads = _leaves(jax.grad(loss)(variables['params']))
  assert set(grads) == {'filter_kernel', 'mix_kernel', 'alpha', 'bias'}
  for name, g in grads.items():
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), name
    assert np.abs(g).max() > 1e-6, f'{name}: zero gradient'


def _random_model_variables(model, video, seed):
  """Variables of ``model`` without compiling ``init``: shapes from eval_shape, random values."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), video)
  rng = np.random.default_rng(seed)
  out = {}
  for collection in ('params', 'batch_stats'):
    flat = {}
    for path, leaf in flax.traverse_util.flatten_dict(shapes[collection]).items():
      shape, name = leaf.shape, path[-1]
      if name in ('scale', 'var'):
        value = rng.uniform(0.5, 1.5, shape)
      elif name in ('bias', 'mean', 'alpha'):
        value = rng.normal(0, 0.5 if name == 'alpha' else 0.1, shape)
      else:  # kernels: N(0, 1/fan_in)
        value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
      flat[path] = jnp.asarray(value, jnp.float32)
    out[collection] = flax.traverse_util.unflatten_dict(flat)
  return out


@pytest.mark.slow
def test_gradients_reach_every_model_parameter():
  """Tiny DTF-R50 (width 8), train mode: every parameter gets a finite, nonzero gradient,
  including all four DTF parameters of all 16 bottlenecks (alpha random, not zero)."""
  model = create_model('dtf_r50', num_classes=5, clip_length=16, width=8, dropout_rate=0.0)
  video = _random_input((2, 16, 32, 32, 3), seed=21)
  variables = _random_model_variables(model, video, seed=22)
  target = jax.random.normal(jax.random.PRNGKey(5), (2, 5))

  def loss(params):
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, video,
                            train=True, mutable=['batch_stats'])
    return jnp.sum(logits * target)

  grads = _leaves(jax.jit(jax.grad(loss))(variables['params']))
  assert len(grads) == len(_leaves(variables['params']))
  dtf_leaves = 0
  for name, g in grads.items():
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), name
    assert np.abs(g).max() > 0, f'{name}: zero gradient'
    dtf_leaves += '/temporal/' in name
  assert dtf_leaves == 16 * 4  # filter_kernel, mix_kernel, alpha, bias in 3 + 4 + 6 + 3 blocks


# ---------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------


def _sub_jaxprs(value):
  if hasattr(value, 'eqns'):
    yield value
  elif hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _dft_eqns(jaxpr, scope=''):
  """Multiplies of the time DFT (rfft_time/irfft_time), and any XLA fft op."""
  for eqn in jaxpr.eqns:
    eqn_scope = f'{scope}/{eqn.source_info.name_stack}'
    if eqn.primitive.name == 'fft' or (eqn.primitive.name == 'mul' and DFT_SCOPE in eqn_scope):
      yield eqn
    for param in eqn.params.values():
      for sub in _sub_jaxprs(param):
        yield from _dft_eqns(sub, eqn_scope)


def test_bfloat16_block_keeps_time_dft_in_float32():
  x = _random_input((2, 8, 6, 6, 16), seed=31)
  variables = _random_variables(DTFBlock(), x, seed=32)
  block16 = DTFBlock(dtype=jnp.bfloat16)
  y32 = np.asarray(_eval(DTFBlock(), variables, x), np.float64)
  y16 = _eval(block16, variables, x)
  assert y16.dtype == jnp.bfloat16
  y16 = np.asarray(y16.astype(jnp.float32), np.float64)
  xn = np.asarray(x, np.float64)
  rel = np.linalg.norm(y16 - y32) / np.linalg.norm(y32)
  rel_branch = np.linalg.norm((y16 - xn) - (y32 - xn)) / np.linalg.norm(y32 - xn)
  print(f'bf16 vs f32: relative L2 error {rel:.3g} (output), {rel_branch:.3g} (residual branch)')
  assert rel < 2e-2  # bf16 has an 8-bit mantissa (~4e-3 relative rounding per op)
  assert rel_branch < 5e-2

  jaxpr = jax.make_jaxpr(lambda v: block16.apply(variables, v, train=False))(
      x.astype(jnp.bfloat16)).jaxpr
  dft = list(_dft_eqns(jaxpr))
  # rfft of T=8: 8 inputs x 5 bins x (re, im); irfft: 5 bins x (re, im) x 8 outputs.
  assert len(dft) == 2 * (8 * 5 * 2), len(dft)
  assert all(e.primitive.name == 'mul' for e in dft)
  for e in dft:
    assert all(str(v.aval.dtype) == 'float32' for v in list(e.invars) + list(e.outvars)), e


# ---------------------------------------------------------------------------
# Memory and errors
# ---------------------------------------------------------------------------


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_frame_ops_do_not_materialise_k2_copies():
  """XLA's temporary buffers of the neighbourhood ops stay a small multiple of the input.

  The designs keep at most a zero-padded copy, the shifted query and one neighbour slice live
  (measured on CPU: correlation ~3.3x, aggregation ~1.1x the input; their joint gradient ~5.9x,
  which holds the forward residuals and the zero-padded cotangents of the backward ops),
  whereas an unfold materialising the K2 = 9 shifted copies needs >= 9x in the forward pass and
  more in the gradient; the naive unfold is measured too, as a check that the measure does see
  such copies.
  """
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 32, 32, 64)), jnp.float32)
  attention = jnp.ones((1, 4, 32, 32, 9), jnp.float32) / 9
  size = x.nbytes

  def chain_grad(fn_corr, fn_agg):
    def f(v):
      return jnp.sum(fn_agg(v, jax.nn.softmax(fn_corr(v, 3), axis=-1), 3) ** 2)
    return jax.grad(f)

  temp = dict(
      corr=_temp_bytes(lambda v: frame_correlation(v, 3), x),
      agg=_temp_bytes(lambda v, a: frame_aggregation(v, a, 3), x, attention),
      grad=_temp_bytes(chain_grad(frame_correlation, frame_aggregation), x),
      naive_corr=_temp_bytes(lambda v: _naive_correlation(v, 3), x),
      naive_grad=_temp_bytes(chain_grad(_naive_correlation, _naive_aggregation), x))
  print('temp / input size: ' + ', '.join(f'{k} {v / size:.2f}' for k, v in temp.items()))
  assert temp['naive_corr'] >= 8 * size and temp['naive_grad'] >= 8 * size
  assert temp['corr'] < 4 * size
  assert temp['agg'] < 3 * size
  assert temp['grad'] < 6.5 * size and temp['grad'] < 0.75 * temp['naive_grad']


@pytest.mark.parametrize('channels,time,ok', [
    (12, 4, False),  # 12 * 3 * 2 = 72, not a multiple of 16
    (20, 5, False),  # 20 * 3 * 2 = 120
    (8, 3, True),    # 8 * 2 * 2 = 32
    (24, 4, True)])  # 24 * 3 * 2 = 144
def test_indivisible_channels_raise(channels, time, ok):
  x = jnp.zeros((1, time, 4, 4, channels))
  init = lambda: jax.eval_shape(DTFBlock().init, jax.random.PRNGKey(0), x)  # noqa: E731
  if ok:
    init()
  else:
    with pytest.raises(ValueError, match='divisible by the group factor'):
      init()


# ---------------------------------------------------------------------------
# The time DFT (rfft_time / irfft_time) against jnp.fft
# ---------------------------------------------------------------------------


SPECTRAL = ('direct', 'matmul', 'fft')


@pytest.mark.parametrize('impl', SPECTRAL)
@pytest.mark.parametrize('n', [1, 2, 4, 5, 8, 16])
def test_time_dft_equals_numpy_fft_ortho(n, impl):
  """rfft_time / irfft_time, each implementation, equal NumPy's float64 rfft / irfft
  (norm='ortho', axis 1), including the irfft convention of ignoring the imaginary parts of the DC
  and Nyquist bins. Tolerance: 1e-5 absolute on O(1) values (float32)."""
  rng = np.random.default_rng(n)
  x = rng.normal(size=(2, n, 3, 4, 5))
  re, im = rfft_time(jnp.asarray(x, jnp.float32), impl)
  ref = np.fft.rfft(x, axis=1, norm='ortho')
  np.testing.assert_allclose(re, ref.real, atol=1e-5)
  np.testing.assert_allclose(im, ref.imag, atol=1e-5)
  bins = n // 2 + 1
  a, b = rng.normal(size=(2, 2, bins, 3, 4, 5))  # DC/Nyquist imag != 0
  np.testing.assert_allclose(
      irfft_time(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), n, impl),
      np.fft.irfft(a + 1j * b, n=n, axis=1, norm='ortho'), atol=1e-5)


def test_spectral_impl_auto_and_names():
  """'auto' is the direct form on CPU and GPU, the matmul on TPU from 8 time steps (measured);
  an unknown name is refused, naming the choices."""
  assert [resolve_spectral_impl('auto', 'cpu', n) for n in (4, 16)] == ['direct'] * 2
  assert [resolve_spectral_impl('auto', 'tpu', n) for n in (4, 7, 8, 16)] == [
      'direct', 'direct', 'matmul', 'matmul']
  assert resolve_spectral_impl('fft', 'tpu', 4) == 'fft'
  with pytest.raises(ValueError, match="spectral_impl='dft'.*'matmul'"):
    rfft_time(jnp.zeros((1, 4, 2)), 'dft')


@pytest.mark.parametrize('impl', ['direct', 'matmul'])
def test_time_dft_gradients_equal_jnp_fft_gradients(impl):
  """The gradients (hand-written VJPs of the direct form, autodiff of the matmul) equal autodiff
  through jnp.fft (1e-5)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 6, 3, 3, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(2, 4, 3, 3, 4)), jnp.float32)

  def ours(v):
    re, im = rfft_time(v, impl)
    return jnp.sum(jnp.sin(irfft_time(re * w, im * w + re, 6, impl)) * v)

  def reference(v):
    s = jnp.fft.rfft(v, axis=1, norm='ortho')
    t = s.real * w + 1j * (s.imag * w + s.real)
    return jnp.sum(jnp.sin(jnp.fft.irfft(t, n=6, axis=1, norm='ortho')) * v)

  np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(reference)(x), atol=1e-5)

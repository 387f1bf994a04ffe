"""The temporal-module registry (dtf_jax/layers/temporal.py): the paper's baselines and the DTF
ablations, each against a direct NumPy loop of what it computes.

Tiny shapes (``B=2 T=4 H=W=6 C=16``). Forward passes run eagerly (the modules are small and
share their primitives, so op-by-op execution costs less than compiling each one); init and
gradients are jitted (cheaper so).
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtf_jax import flops
from dtf_jax.layers import dtf as dtf_module
from dtf_jax.layers.aggregation import frame_wise_aggregation
from dtf_jax.layers.baselines import frame_differences, next_frame_correlation
from dtf_jax.layers.dtf import DTFBlock, modulate
from dtf_jax.layers.spectral import irfft_time, rfft_time
from dtf_jax.layers.temporal import FILTER_ESTIMATOR_NAMES, TEMPORAL_MODULES, make_temporal
from dtf_jax.models import create_model
from dtf_jax.tools import model_info

SHAPE = (2, 4, 6, 6, 16)  # B T H W C
NAMES = [n for n in TEMPORAL_MODULES if n != 'none']
# The plain DTF block's forward, gradients and bfloat16 are tested in test_dtf_block.py and
# test_models.py; here only how it differs from its variants.
NEW_NAMES = [n for n in NAMES if n != 'dtf']
RESNET_KW = dict(num_classes=10, clip_length=8, width=16, stage_sizes=(1, 1, 1, 1),
                 early_stride=1)


@pytest.fixture(scope='module')
def x():
  return jnp.asarray(np.random.default_rng(0).normal(size=SHAPE), jnp.float32)


def _module(name, dtype=jnp.float32):
  return make_temporal(name, dtype=dtype, name='temporal')


def _init(module, x):
  return flax.core.unfreeze(jax.jit(module.init)(jax.random.key(0, impl='rbg'), x))


def _randomized(variables, seed=1):
  """Every parameter replaced by N(0, 0.3^2) noise (alpha nonzero: the branch counts)."""
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.normal(0, 0.3, p.shape), jnp.float32), variables['params'])
  return dict(variables, params=params)


def _apply(module, variables, x, train=False):
  if train:
    return module.apply(variables, x, True, mutable=['batch_stats'])[0]
  return module.apply(variables, x, False)


def _rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# --------------------------------------------------------------------------------------------
# Every module: shape, identity at init, finite gradients, bfloat16
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', NEW_NAMES)
def test_module_shape_identity_gradients_bf16(name, x):
  module = _module(name)
  variables = _init(module, x)
  out = _apply(module, variables, x)
  assert out.shape == x.shape and out.dtype == jnp.float32
  if name == 'temporal_shift':
    assert 'params' not in variables  # nothing to learn, so no identity at init
  else:
    np.testing.assert_array_equal(out, x)  # zero-initialised residual scale

  variables = _randomized(variables) if 'params' in variables else variables
  params = variables.get('params', {})

  def loss(p, v):
    return jnp.sum(jnp.sin(_apply(module, dict(variables, params=p), v, train=True)))
  g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  for leaf in jax.tree_util.tree_leaves((g_params, g_x)):
    assert np.all(np.isfinite(leaf))
  assert np.abs(g_x).max() > 0

  out32 = _apply(module, variables, x)
  out16 = _apply(_module(name, jnp.bfloat16), variables, x)
  assert out16.dtype == jnp.bfloat16 and np.all(np.isfinite(out16.astype(jnp.float32)))
  assert _rel_l2(out16.astype(jnp.float32), out32) < 2e-2


def test_unknown_name_lists_the_known_ones():
  with pytest.raises(ValueError, match='dtf_1d_dynamic'):
    make_temporal('tsm', dtype=jnp.float32, name='temporal')
  with pytest.raises(ValueError, match='temporal_difference'):
    create_model('dtf_r50', temporal='tsm', **RESNET_KW)


# --------------------------------------------------------------------------------------------
# Defining properties, against loops
# --------------------------------------------------------------------------------------------

def test_temporal_shift_moves_one_eighth_each_way(x):
  out = _apply(_module('temporal_shift'), {}, x)
  xn, time, fold = np.asarray(x), SHAPE[1], SHAPE[-1] // 8
  expected = np.zeros(SHAPE, np.float32)
  for t in range(time):
    for c in range(SHAPE[-1]):
      source = t + 1 if c < fold else t - 1 if c < 2 * fold else t
      if 0 <= source < time:
        expected[:, t, ..., c] = xn[:, source, ..., c]
  np.testing.assert_array_equal(out, expected)


def test_temporal_conv_is_a_kernel3_conv_along_time(x):
  module = _module('dtf_1d')
  variables = _randomized(_init(module, x))
  p = variables['params']
  kernel, alpha = np.asarray(p['kernel']), np.asarray(p['alpha'])  # K C C
  xn = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
  y = np.zeros(SHAPE)
  for t in range(SHAPE[1]):
    for k in range(3):
      y[:, t] += xn[:, t + k] @ kernel[k]
  np.testing.assert_allclose(_apply(module, variables, x), np.asarray(x) + alpha * y,
                             rtol=1e-4, atol=1e-4)


def test_dynamic_temporal_conv_applies_the_predicted_taps(x):
  module = _module('dtf_1d_dynamic')
  variables = _randomized(_init(module, x))
  p = variables['params']
  kernel, alpha = np.asarray(p['tap_kernel'], np.float64), np.asarray(p['alpha'])  # T C (G*K)
  xn = np.asarray(x, np.float64)
  b, time, h, w, c = SHAPE
  size = module.group_size
  taps = np.zeros((b, h, w, c // size, 3))
  for t in range(time):
    taps += (xn[:, t] @ kernel[t]).reshape(b, h, w, c // size, 3)
  padded = np.pad(xn, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
  y = np.zeros(SHAPE)
  for t in range(time):
    for ch in range(c):
      for k in range(3):
        y[:, t, ..., ch] += taps[..., ch // size, k] * padded[:, t + k, ..., ch]
  np.testing.assert_allclose(_apply(module, variables, x), xn + alpha * y, rtol=1e-4, atol=1e-4)


def test_fixed_filter_modulation_is_a_circular_conv_in_time(x):
  rng = np.random.default_rng(2)
  time, bins, c = SHAPE[1], SHAPE[1] // 2 + 1, SHAPE[-1]
  filt = rng.normal(size=(bins, c)) + 1j * rng.normal(size=(bins, c))  # F C
  s_re, s_im = rfft_time(x)
  m_re, m_im = modulate(s_re, s_im, jnp.asarray(filt.real[:, None, None], jnp.float32),
                        jnp.asarray(filt.imag[:, None, None], jnp.float32))
  out = irfft_time(m_re, m_im, time)
  impulse = np.fft.irfft(filt, n=time, axis=0)  # T C, the filter's impulse response
  xn, expected = np.asarray(x, np.float64), np.zeros(SHAPE)
  for t in range(time):
    for s in range(time):
      expected[:, t] += impulse[s] * xn[:, (t - s) % time]
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_fixed_filter_block_is_a_fixed_circular_conv_with_channel_mixing(x):
  """Without FA, in eval mode with the initial norm statistics (mean 0, var 1), the whole block is
  ``x + bias + sum_c' circular_conv(x_c', h_c'c)`` with ``h = irfft(filter * mixing) * alpha``."""
  block = DTFBlock(fixed_filter=True, aggregation=False)
  variables = _randomized(_init(block, x))
  p = variables['params']
  assert set(p) == {'static_filter', 'mix_kernel', 'alpha', 'bias'}
  time = SHAPE[1]
  filt = np.asarray(p['static_filter'][..., 0]) + 1j * np.asarray(p['static_filter'][..., 1])
  mix = np.asarray(p['mix_kernel'][0]) + 1j * np.asarray(p['mix_kernel'][1])  # C_in C_out
  scale = np.asarray(p['alpha']) / np.sqrt(1 + 1e-5)
  impulse = np.fft.irfft(filt[:, :, None] * mix[None], n=time, axis=0) * scale  # T C_in C_out
  xn = np.asarray(x, np.float64)
  expected = xn + np.asarray(p['bias'])
  for t in range(time):
    for s in range(time):
      expected[:, t] += xn[:, (t - s) % time] @ impulse[s]
  np.testing.assert_allclose(_apply(block, variables, x), expected, rtol=1e-4, atol=1e-4)
  # The initial filter is all-pass (1 + 0i).
  init = _init(block, x)['params']['static_filter']
  np.testing.assert_array_equal(init[..., 0], 1.0)
  np.testing.assert_array_equal(init[..., 1], 0.0)


def test_next_frame_correlation_and_correlation_module(x):
  xn = np.asarray(x, np.float64)
  b, time, h, w, c = SHAPE
  padded = np.pad(xn, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
  expected = np.zeros((b, time, h, w, 9))
  for t in range(time - 1):
    for i in range(3):
      for j in range(3):
        expected[:, t, ..., i * 3 + j] = np.mean(
            xn[:, t] * padded[:, t + 1, i:i + h, j:j + w], axis=-1)
  corr = next_frame_correlation(x, 3)
  np.testing.assert_allclose(corr, expected, rtol=1e-5, atol=1e-5)

  module = _module('correlation')
  variables = _randomized(_init(module, x))
  p = variables['params']
  np.testing.assert_allclose(
      _apply(module, variables, x),
      xn + np.asarray(p['alpha']) * (expected @ np.asarray(p['proj']['kernel'], np.float64)),
      rtol=1e-4, atol=1e-4)


def test_temporal_difference(x):
  xn = np.asarray(x)
  d = np.asarray(frame_differences(x))
  for t in range(SHAPE[1]):
    np.testing.assert_array_equal(d[:, t], xn[:, t + 1] - xn[:, t] if t + 1 < SHAPE[1] else 0)
  module = _module('temporal_difference')
  variables = _randomized(_init(module, x))
  assert _rel_l2(_apply(module, variables, x), x) > 1e-3
  static = jnp.broadcast_to(x[:, :1], SHAPE)  # no motion: no differences, so the identity
  np.testing.assert_array_equal(_apply(module, variables, static), static)


@pytest.mark.parametrize('name, aggregated, kernel_rows', [
    ('dtf', True, 16 + 9), ('dtf_no_fa', False, 16), ('dtf_fa_only', True, 16),
    ('dtf_corr_only', False, 16 + 9)])
def test_dtf_switches(name, aggregated, kernel_rows, x, monkeypatch):
  """``aggregation=False``: the spectrum is that of ``x``; ``correlation=False``: the estimator
  kernel has ``C`` input rows per time step (``C + K2`` with the correlation)."""
  spectrum_inputs = []

  def recording_rfft(v, impl='auto'):
    spectrum_inputs.append(v)
    return rfft_time(v, impl)
  monkeypatch.setattr(dtf_module, 'rfft_time', recording_rfft)
  module = _module(name)
  variables = _init(module, x)
  assert variables['params']['filter_kernel'].shape[:2] == (SHAPE[1], kernel_rows)
  spectrum_inputs.clear()
  _apply(module, variables, x)
  (spectrum_input,) = spectrum_inputs
  expected = frame_wise_aggregation(x, 3)[0] if aggregated else x
  np.testing.assert_array_equal(spectrum_input, expected)


# --------------------------------------------------------------------------------------------
# In the backbone: build, forward, FLOPs, argument checks, model_info
# --------------------------------------------------------------------------------------------

def _resnet(name, **kwargs):
  return create_model('dtf_r50', temporal=name, **dict(RESNET_KW, **kwargs))


def _random_variables(model, video):
  """Shapes from ``eval_shape``, values random (positive running variances): no init to compile."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), video)
  rng = np.random.default_rng(0)

  def fill(path, s):
    if path[-1].key == 'var':
      return jnp.asarray(rng.uniform(0.5, 2.0, s.shape), s.dtype)
    return jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize('name', NEW_NAMES)
def test_tiny_resnet_forward_res5(name):
  """Every name in stage 4 only (the paper's ``res5`` rows); all stages are built (traced) by the
  FLOP counts below."""
  video = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 32, 32, 3)), jnp.float32)
  model = _resnet(name, dtf_stages=(4,))
  variables = _random_variables(model, video)
  blocks = sorted({k[0] for k in flax.traverse_util.flatten_dict(variables['params'])
                   if 'temporal' in k})
  assert blocks == ([] if name == 'temporal_shift' else ['stage4_block0'])
  logits = model.apply(variables, video)
  assert logits.shape == (1, 10) and np.all(np.isfinite(logits))


def _macs(name, **kwargs):
  model = _resnet(name, **kwargs)
  return flops.count_model_macs(model, jax.ShapeDtypeStruct((1, 8, 32, 32, 3), jnp.float32))[0]


@pytest.fixture(scope='module')
def macs():
  return {name: _macs(name) for name in ['none'] + NAMES}


def test_flops_of_each_variant(macs):
  c2d = macs['none']
  # Temporal module inputs, (C, H*W) per stage of the tiny ResNet (T = 8 everywhere).
  stages = [(16, 64), (32, 16), (64, 4), (128, 1)]
  for name in NAMES:
    m = macs[name]
    assert m['conv'] == c2d['conv'] and m['linear'] == c2d['linear'], name
    ours, paper = flops.total_macs(m, 'ours'), flops.total_macs(m, 'paper')
    if name == 'temporal_shift':  # no multiplies at all
      assert ours == paper == flops.total_macs(c2d, 'ours'), name
      continue
    assert ours > flops.total_macs(c2d, 'ours') and paper > flops.total_macs(c2d, 'paper'), name
    # The paper convention: no FFT or elementwise product, a complex MAC as one.
    assert paper == pytest.approx(m['conv'] + m['linear'] + m['dtf_estimator'] + m['temporal_conv']
                                  + m['dtf_mixing'] / 4, rel=1e-12), name
  assert macs['dtf_1d']['temporal_conv'] == sum(3 * c * c * 8 * hw for c, hw in stages)
  assert macs['dtf_1d_dynamic']['temporal_elementwise'] == sum(3 * c * 8 * hw for c, hw in stages)
  assert macs['correlation']['temporal_elementwise'] == sum(9 * c * 8 * hw for c, hw in stages)
  assert macs['temporal_difference']['temporal_elementwise'] == 0
  for name in ('dtf_1d', 'dtf_1d_dynamic', 'correlation', 'temporal_difference'):
    assert macs[name]['temporal_conv'] > 0
    assert all(macs[name][c] == 0 for c in flops.CATEGORIES if c.startswith('dtf_')), name
  # The ablations drop what they should.
  assert macs['dtf_no_fa']['dtf_elementwise'] == sum(4 * c * 5 * hw for c, hw in stages)
  assert macs['dtf_fa_only']['dtf_estimator'] == macs['dtf_no_fa']['dtf_estimator'] \
      < macs['dtf']['dtf_estimator'] == macs['dtf_corr_only']['dtf_estimator']
  assert macs['dtf_fixed']['dtf_estimator'] == 0
  assert macs['dtf_fixed']['dtf_elementwise'] == macs['dtf']['dtf_elementwise']


def test_group_factor_check_only_where_there_is_an_estimator():
  # Stage 1 of width 4 with 4 time steps: 4 * 3 bins * 2 = 24 is not divisible by G = 16.
  kwargs = dict(RESNET_KW, width=4, clip_length=4)
  assert set(FILTER_ESTIMATOR_NAMES) == {'dtf', 'dtf_no_fa', 'dtf_fa_only', 'dtf_corr_only'}
  for name in FILTER_ESTIMATOR_NAMES:
    with pytest.raises(ValueError, match='group factor'):
      create_model('dtf_r50', temporal=name, **kwargs)
  for name in set(NAMES) - set(FILTER_ESTIMATOR_NAMES):
    create_model('dtf_r50', temporal=name, **kwargs)


def test_model_info_temporal_and_stages(capsys):
  model_info.main(['--model', 'dtf_r50', '--temporal', 'correlation', '--dtf-stages', '4',
                   '--clip-length', '8', '--size', '32', '--num-classes', '10', '--no-compile'])
  out = capsys.readouterr().out
  assert 'temporal correlation, dtf_stages (4,)' in out.splitlines()[0]
  assert 'temporal_conv' in out and 'temporal_elementwise' in out
  with pytest.raises(SystemExit) as exit_info:
    model_info.main(['--model', 'dtf_swin_t', '--dtf-stages', '4', '--no-compile'])
  assert exit_info.value.code == 2
  assert '--dtf-stages applies to ResNet models only' in capsys.readouterr().err

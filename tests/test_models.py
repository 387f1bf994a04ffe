"""Model registry, parameter counts, forward/training behaviour, dtypes and input checks.

Heavy checks use tiny variants (ResNet ``width=8``, one bottleneck per stage; Swin with
``embed_dim=32`` at 64x64 with window 4) compiled once per module. Parameter counts of the full
models use ``jax.eval_shape`` only (nothing is allocated or compiled).

Init uses an ``rbg`` key: XLA compiles its random-bit generation several times faster on CPU than
threefry's, and the values of the initial weights do not matter here.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtf_jax.layers.norm import BatchNorm
from dtf_jax.models import create_model, list_models

RESNET_KW = dict(num_classes=10, clip_length=8, width=8, stage_sizes=(1, 1, 1, 1))
SWIN_KW = dict(num_classes=10, clip_length=8, image_size=64, window_size=4, embed_dim=32,
               depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
# family -> (dtf name, c2d name, tiny kwargs, frame size)
FAMILIES = {
    'resnet': ('dtf_r50', 'c2d_r50', RESNET_KW, 32),
    'swin': ('dtf_swin_t', 'c2d_swin_t', SWIN_KW, 64),
}
BATCH = 2


def _init_key(seed=0):
  return jax.random.key(seed, impl='rbg')


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _unflat(flat):
  return flax.traverse_util.unflatten_dict(flat)


def _n_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _temporal_blocks(params):
  """Names of the top-level blocks that own a 'temporal' submodule."""
  return sorted({path[0] for path in _flat(params) if 'temporal' in path})


def _randomize_temporal(variables, seed):
  """Nonzero DTF alpha / bias and non-trivial spectrum-norm statistics (the FFT branch counts)."""
  rng = np.random.default_rng(seed)
  out = {}
  for col, tree in variables.items():
    flat = _flat(tree)
    for path, value in flat.items():
      if 'temporal' not in path:
        continue
      if path[-1] in ('alpha', 'bias'):
        flat[path] = jnp.asarray(rng.normal(0.0, 0.5, value.shape), jnp.float32)
      elif path[-1] == 'mean':
        flat[path] = jnp.asarray(rng.normal(0.0, 0.05, value.shape), jnp.float32)
      elif path[-1] == 'var':
        flat[path] = jnp.asarray(rng.uniform(0.5, 2.0, value.shape), jnp.float32)
    out[col] = _unflat(flat)
  return out


def _rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class Built:
  """A tiny dtf model, its c2d twin, a video batch, real init and jitted forwards."""

  def __init__(self, family):
    dtf_name, c2d_name, kwargs, size = FAMILIES[family]
    self.kwargs, self.size = kwargs, size
    self.dtf = create_model(dtf_name, **kwargs)
    self.c2d = create_model(c2d_name, **kwargs)
    rng = np.random.default_rng(1)
    self.video = jnp.asarray(rng.standard_normal((BATCH, kwargs['clip_length'], size, size, 3)),
                             jnp.float32)
    self.variables = jax.jit(self.dtf.init)(_init_key(), self.video[:1])
    self.eval = jax.jit(lambda v, x: self.dtf.apply(v, x, train=False))
    self.train = jax.jit(lambda v, x, key: self.dtf.apply(
        v, x, train=True, mutable=['batch_stats'], rngs={'dropout': key}))


_BUILT = {}


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def built(request):
  if request.param not in _BUILT:
    _BUILT[request.param] = Built(request.param)
  yield _BUILT[request.param]


def teardown_module():
  _BUILT.clear()


# --------------------------------------------------------------------------------------------
# Registry and parameter counts (eval_shape only)
# --------------------------------------------------------------------------------------------

def test_list_models_exact():
  expected = {'c2d_r50', 'dtf_r50', 'c2d_r101', 'dtf_r101'}
  expected |= {f'{k}_swin_{s}' for k in ('c2d', 'dtf') for s in 'tsbl'}
  names = list_models()
  assert len(names) == len(set(names))
  assert set(names) == expected


def _param_shapes(name, clip_length, size, **kwargs):
  model = create_model(name, num_classes=400, clip_length=clip_length, **kwargs)
  video = jax.ShapeDtypeStruct((1, clip_length, size, size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), video)['params']


def _weights_cor(params, clip_length):
  """Size of the fixed ``weights_cor`` (C x T' x 3 x 3) that the official DTF blocks also store."""
  total, blocks = 0, 0
  for path, leaf in _flat(params).items():
    if path[-2:] == ('temporal', 'mix_kernel'):
      channels = leaf.shape[1]
      total += channels * (clip_length // 4) * 9
      blocks += 1
  return total, blocks


@pytest.mark.parametrize('name,clip_length,trainable,official,dtf_blocks', [
    ('c2d_r50', 16, 24_355_856, 24_355_856, 0),
    ('dtf_r50', 16, 28_815_536, 28_951_472, 16),
    ('dtf_r50', 32, None, 33_607_504, 16),
    ('dtf_r50', 64, None, 50_668_304, 16),
    ('c2d_r101', 16, 43_347_984, 43_347_984, 0),
    ('dtf_r101', 16, None, 52_067_120, 33),
    ('dtf_r101', 64, None, 93_283_088, 33),
])
def test_resnet_parameter_counts_match_official(name, clip_length, trainable, official,
                                                dtf_blocks):
  params = _param_shapes(name, clip_length, 256)
  n = _n_params(params)
  if trainable is not None:
    assert n == trainable
  extra, blocks = _weights_cor(params, clip_length)
  assert blocks == dtf_blocks
  assert n + extra == official


def test_c2d_swin_b_parameter_count():
  params = _param_shapes('c2d_swin_b', 16, 224)
  assert _n_params(params) == 87_171_400
  assert _temporal_blocks(params) == []


def test_dtf_swin_b_used_parameters_and_dtf_blocks():
  params = _param_shapes('dtf_swin_b', 64, 224)
  blocks = _temporal_blocks(params)
  assert len(blocks) == 13
  # Non-shifted blocks: block 0 of each stage (the even ones), plus both blocks of stage 4 (7x7
  # tokens = one window, so no shift).
  expected = {f'stage{s}_block{b}' for s, d in zip((1, 2, 3), (2, 2, 18)) for b in range(0, d, 2)}
  expected |= {'stage4_block0', 'stage4_block1'}
  assert set(blocks) == expected
  extra, n_dtf = _weights_cor(params, 64)
  assert n_dtf == 13
  used = _n_params(params) + extra
  assert 180.0e6 < used < 180.2e6


# --------------------------------------------------------------------------------------------
# Forward and training behaviour (tiny models)
# --------------------------------------------------------------------------------------------

def test_eval_logits_shape_dtype(built):
  logits = built.eval(built.variables, built.video)
  assert logits.shape == (BATCH, 10)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  assert not np.allclose(logits[0], logits[1])  # the two clips give different logits


def test_features_are_what_the_head_maps_to_the_logits(built):
  """``features=True``: the pooled ``B D`` float32 feature; the head applied to it (by hand, in
  float64) gives the eval logits, and the head is not created when initialising with it."""
  features = jax.jit(lambda v, x: built.dtf.apply(v, x, features=True))(built.variables,
                                                                         built.video)
  head = built.variables['params']['head']
  assert features.dtype == jnp.float32 and features.shape == (BATCH, head['kernel'].shape[0])
  by_hand = (np.asarray(features, np.float64) @ np.asarray(head['kernel'], np.float64)
             + np.asarray(head['bias'], np.float64))
  np.testing.assert_allclose(by_hand, built.eval(built.variables, built.video), rtol=1e-5,
                             atol=1e-5)
  shapes = jax.eval_shape(functools.partial(built.dtf.init, features=True), _init_key(),
                          built.video[:1])
  assert 'head' not in shapes['params']


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_c2d_logits_shape_dtype(family):
  _, c2d_name, kwargs, size = FAMILIES[family]
  model = create_model(c2d_name, **kwargs)
  video = jax.ShapeDtypeStruct((3, kwargs['clip_length'], size, size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), video)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), shapes, video)
  assert out.shape == (3, 10) and out.dtype == jnp.float32


def test_train_updates_batch_stats(built):
  logits, updates = built.train(built.variables, built.video, jax.random.PRNGKey(0))
  assert logits.shape == (BATCH, 10) and logits.dtype == jnp.float32
  assert set(updates) == {'batch_stats'}
  old, new = _flat(built.variables['batch_stats']), _flat(updates['batch_stats'])
  assert set(old) == set(new)
  for path in old:
    assert new[path].shape == old[path].shape and new[path].dtype == jnp.float32, path
  changed = [p for p in old if not np.allclose(old[p], new[p])]
  if built.dtf.__class__.__name__ == 'ResNet':
    # Every BN of the ResNet sees data in training mode.
    assert set(changed) == set(old)
  # The DTF spectrum norms are updated too (their statistics do not depend on alpha).
  spectrum = [p for p in old if 'spectrum_norm' in p]
  assert spectrum and all(p in changed for p in spectrum)
  # PyTorch momentum: new = 0.9 * old + 0.1 * batch; running var starts at 1 and moves.
  var_paths = [p for p in spectrum if p[-1] == 'var']
  for p in var_paths:
    assert not np.allclose(new[p], 1.0)


def test_dropout_depends_on_rng_and_eval_is_deterministic(built):
  v, x = built.variables, built.video
  a, _ = built.train(v, x, jax.random.PRNGKey(1))
  b, _ = built.train(v, x, jax.random.PRNGKey(2))
  a2, _ = built.train(v, x, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, a2)
  assert not np.allclose(a, b, rtol=1e-4, atol=1e-6)
  e1 = built.eval(v, x)  # no dropout rng is passed in eval mode
  np.testing.assert_array_equal(e1, built.eval(v, x))
  assert not np.allclose(a, e1, rtol=1e-4, atol=1e-6)


def test_dtf_at_init_is_identity(built):
  """With alpha = bias = 0 (init) the DTF model equals the C2D model on the shared weights."""
  for path, value in _flat(built.variables['params']).items():
    if 'temporal' in path and path[-1] in ('alpha', 'bias'):
      assert np.all(np.asarray(value) == 0), path
  c2d_vars = {col: _unflat({p: v for p, v in _flat(tree).items() if 'temporal' not in p})
              for col, tree in built.variables.items()}
  c2d_vars = {col: tree for col, tree in c2d_vars.items() if tree}  # Swin: no batch_stats left
  # The shared parameter paths are exactly the C2D model's.
  c2d_shapes = jax.eval_shape(built.c2d.init, jax.random.PRNGKey(0), built.video[:1])
  assert set(c2d_vars) == set(c2d_shapes)
  for col in c2d_shapes:
    expected = {p: (s.shape, s.dtype) for p, s in _flat(c2d_shapes[col]).items()}
    got = {p: (v.shape, v.dtype) for p, v in _flat(c2d_vars[col]).items()}
    assert got == expected
  assert _temporal_blocks(built.variables['params'])

  c2d_logits = jax.jit(lambda v, x: built.c2d.apply(v, x))(c2d_vars, built.video)
  dtf_logits = built.eval(built.variables, built.video)
  scale = float(np.max(np.abs(c2d_logits)))
  np.testing.assert_allclose(dtf_logits, c2d_logits, rtol=1e-5, atol=1e-5 * scale)
  # Sanity: the comparison is sensitive to the DTF branch once alpha is nonzero.
  perturbed = built.eval(_randomize_temporal(built.variables, 0), built.video)
  assert _rel_l2(perturbed, c2d_logits) > 1e-3


def test_dtf_stages_only_stage4():
  kwargs = dict(RESNET_KW, stage_sizes=(2, 2, 2, 2))
  video = jax.ShapeDtypeStruct((1, 8, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(create_model('dtf_r50', dtf_stages=(4,), **kwargs).init,
                          jax.random.PRNGKey(0), video)['params']
  assert _temporal_blocks(params) == ['stage4_block0', 'stage4_block1']
  params = jax.eval_shape(create_model('dtf_r50', dtf_stages=[2, 4], **kwargs).init,
                          jax.random.PRNGKey(0), video)['params']
  assert _temporal_blocks(params) == ['stage2_block0', 'stage2_block1', 'stage4_block0',
                                      'stage4_block1']
  params = jax.eval_shape(create_model('dtf_r50', **kwargs).init, jax.random.PRNGKey(0),
                          video)['params']
  assert len(_temporal_blocks(params)) == 8
  params = jax.eval_shape(create_model('c2d_r50', **kwargs).init, jax.random.PRNGKey(0),
                          video)['params']
  assert _temporal_blocks(params) == []
  params = jax.eval_shape(create_model('c2d_swin_t', **SWIN_KW).init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 8, 64, 64, 3), jnp.float32))['params']
  assert _temporal_blocks(params) == []


def test_tiny_swin_dtf_blocks_are_the_unshifted_ones():
  params = jax.eval_shape(create_model('dtf_swin_t', **SWIN_KW).init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 8, 64, 64, 3), jnp.float32))['params']
  # 64 px / patch 4 = 16x16 tokens: stages at 16, 8 (shifted odd blocks), 4 and 2 (one window,
  # no shift, so both blocks carry DTF).
  assert _temporal_blocks(params) == [
      'stage1_block0', 'stage2_block0', 'stage3_block0', 'stage3_block1', 'stage4_block0',
      'stage4_block1']


# --------------------------------------------------------------------------------------------
# bfloat16
# --------------------------------------------------------------------------------------------

BF16_REL_L2 = 5e-2


def test_bfloat16_close_to_float32(built):
  """Same variables (DTF branch active), bf16 compute: logits within 5e-2 relative L2."""
  variables = _randomize_temporal(built.variables, 1)
  model16 = built.dtf.clone(dtype=jnp.bfloat16)
  ref = built.eval(variables, built.video)
  out = jax.jit(lambda v, x: model16.apply(v, x, train=False))(variables, built.video)
  assert out.dtype == jnp.float32
  err = _rel_l2(out, ref)
  print(f'bf16 vs f32 relative L2 error: {err:.2e}')
  assert err < BF16_REL_L2
  assert err > 0  # bf16 is really used


def test_bfloat16_params_stay_float32_and_compute_is_bf16(built):
  model16 = built.dtf.clone(dtype=jnp.bfloat16)
  video = jax.ShapeDtypeStruct(built.video.shape, jnp.float32)
  shapes = jax.eval_shape(model16.init, jax.random.PRNGKey(0), video)
  for col in ('params', 'batch_stats'):
    for path, leaf in _flat(shapes[col]).items():
      assert leaf.dtype == jnp.float32, (col, path)
  logits, updates = jax.eval_shape(
      lambda v, x: model16.apply(v, x, train=True, mutable=['batch_stats'],
                                 rngs={'dropout': jax.random.PRNGKey(0)}), shapes, video)
  assert logits.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(updates))
  # The heavy ops (convs / matmuls outside the head and the DTF spectrum) run in bfloat16.
  jaxpr = jax.make_jaxpr(lambda v, x: model16.apply(v, x))(shapes, video)
  dtypes = [eqn.invars[0].aval.dtype for eqn in jaxpr.jaxpr.eqns
            if eqn.primitive.name in ('conv_general_dilated', 'dot_general')]
  bf16 = sum(d == jnp.bfloat16 for d in dtypes)
  assert bf16 >= 0.7 * len(dtypes), dtypes


# --------------------------------------------------------------------------------------------
# Rematerialisation (remat)
# --------------------------------------------------------------------------------------------

# family -> (name, tiny kwargs, frame size): the smallest models with a DTF block and dropout /
# stochastic depth on (dtf_swin_t: drop_path_rate 0.2; the ResNets: dropout 0.5). fa_impl 'xla'
# compiles in half the time of the 'scan' default (remat wraps either the same way).
REMAT_CASES = {
    'resnet': ('dtf_r50', dict(RESNET_KW, stage_sizes=(1, 1), dtf_stages=(2,), fa_impl='xla'), 32),
    'swin': ('dtf_swin_t', dict(num_classes=10, clip_length=8, image_size=32, window_size=4,
                                embed_dim=16, depths=(2,), num_heads=(1,), fa_impl='xla'), 32),
}


def _checkpoints(jaxpr) -> int:
  """Rematerialised calls (``jax.checkpoint``'s equations) at the top level of ``jaxpr``."""
  return sum(eqn.primitive.name in ('remat2', 'checkpoint') for eqn in jaxpr.jaxpr.eqns)


@pytest.mark.parametrize('family', sorted(REMAT_CASES))
def test_remat_same_variables_gradients_and_batch_stats(family):
  """remat 'block' and 'dtf' wrap what they name, keep the variable tree of 'none' (checkpoints
  and pretrained weights load either way) and give its gradients and batch statistics (float32,
  train=True, dropout / stochastic depth on, the DTF branch active)."""
  name, kwargs, size = REMAT_CASES[family]
  video = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, size, size, 3)),
                      jnp.float32)
  models = {r: create_model(name, remat=r, **kwargs) for r in ('none', 'block', 'dtf')}
  variables = _randomize_temporal(jax.jit(models['none'].init)(_init_key(), video[:1]), 0)
  signature = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
  blocks = {'block': sum(kwargs.get('stage_sizes', kwargs.get('depths'))),
            'dtf': len(_temporal_blocks(variables['params'])), 'none': 0}
  grads = {}
  for remat, model in models.items():
    assert signature(jax.eval_shape(model.init, _init_key(), video[:1])) == signature(variables)

    def loss(params, model=model):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, video, train=True,
          mutable=['batch_stats'], rngs={'dropout': jax.random.key(2, impl='rbg')})
      return jnp.sum(logits * jnp.arange(logits.shape[-1])), updates
    assert _checkpoints(jax.make_jaxpr(loss)(variables['params'])) == blocks[remat], remat
    grads[remat] = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  assert blocks['dtf'] > 0
  for remat in ('block', 'dtf'):
    flat, ref = _flat(grads[remat][0]), _flat(grads['none'][0])
    assert flat.keys() == ref.keys()
    for path in ref:  # relative to each leaf's size (some DTF gradients are tiny)
      np.testing.assert_allclose(flat[path], ref[path], rtol=1e-5,
                                 atol=1e-5 * float(np.abs(ref[path]).max()) + 1e-12,
                                 err_msg=f'{remat} {path}')
    for path, value in _flat(grads['none'][1]).items():
      np.testing.assert_allclose(_flat(grads[remat][1])[path], value, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Batch norm (PyTorch semantics)
# --------------------------------------------------------------------------------------------

def test_batch_norm_pytorch_semantics():
  x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, (4, 3, 5, 6)), jnp.float32)
  bn = BatchNorm()
  variables = bn.init(jax.random.PRNGKey(0), x, train=False)
  y, upd = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  xn = np.asarray(x, np.float64).reshape(-1, 6)
  mean, var = xn.mean(0), xn.var(0)
  np.testing.assert_allclose(upd['batch_stats']['mean'], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(upd['batch_stats']['var'], 0.9 + 0.1 * xn.var(0, ddof=1), rtol=1e-5)
  np.testing.assert_allclose(y, ((xn - mean) / np.sqrt(var + 1e-5)).reshape(x.shape), atol=1e-4)
  y_eval = bn.apply({'params': variables['params'], **upd}, x, train=False)
  ref = (xn - 0.1 * mean) / np.sqrt(0.9 + 0.1 * xn.var(0, ddof=1) + 1e-5)
  np.testing.assert_allclose(y_eval, ref.reshape(x.shape), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Input and argument errors
# --------------------------------------------------------------------------------------------

def _shape_apply(model, shape):
  video = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), video)


def test_wrong_clip_length():
  for name, kwargs, size in (('dtf_r50', RESNET_KW, 32), ('dtf_swin_t', SWIN_KW, 64)):
    model = create_model(name, **kwargs)
    with pytest.raises(ValueError, match=r'expected clip length 8.*got 16 frames'):
      _shape_apply(model, (1, 16, size, size, 3))


def test_clip_length_not_multiple_of_early_stride():
  with pytest.raises(ValueError, match=r'clip_length=6 is not allowed: .* a multiple of 4'):
    create_model('dtf_r50', **dict(RESNET_KW, clip_length=6))
  model = create_model('dtf_r50', **RESNET_KW).clone(clip_length=6)  # built around the check
  with pytest.raises(ValueError, match=r'clip length 6 is not a multiple of early_stride 4'):
    _shape_apply(model, (1, 6, 32, 32, 3))


def test_swin_wrong_spatial_size():
  model = create_model('dtf_swin_t', **SWIN_KW)
  with pytest.raises(ValueError, match=r'expected 64x64 frames.*got 32x32'):
    _shape_apply(model, (1, 8, 32, 32, 3))
  with pytest.raises(ValueError, match=r'expected 64x64 frames.*got 64x48'):
    _shape_apply(model, (1, 8, 64, 48, 3))


@pytest.mark.parametrize('image_size', [60, 66])
def test_swin_image_size_that_does_not_fit_windows(image_size):
  # 60 px -> 15x15 tokens (not a multiple of window 4); 66 px is not a multiple of the patch.
  model = create_model('dtf_swin_t', **dict(SWIN_KW, image_size=image_size))
  with pytest.raises(ValueError, match=rf'image size {image_size} does not fit patch 4, window 4'):
    _shape_apply(model, (1, 8, image_size, image_size, 3))


def test_resnet_too_small():
  model = create_model('dtf_r50', **RESNET_KW)
  with pytest.raises(ValueError, match=r'at least 32x32.*got 16x64'):
    _shape_apply(model, (1, 8, 16, 64, 3))


@pytest.mark.parametrize('shape', [(1, 8, 32, 32, 1), (1, 8, 32, 32, 4), (8, 32, 32, 3),
                                   (1, 1, 8, 32, 32, 3)])
def test_wrong_channels_or_ndim(shape):
  for name, kwargs in (('dtf_r50', RESNET_KW), ('c2d_swin_t', dict(SWIN_KW, image_size=32))):
    model = create_model(name, **kwargs)
    with pytest.raises(ValueError, match=r'expected a video B T H W 3, got shape ' +
                       str(shape).replace('(', r'\(').replace(')', r'\)')):
      _shape_apply(model, shape)


def test_unknown_model_lists_known_ones():
  with pytest.raises(ValueError, match=r"Unknown model 'dtf_r18'") as info:
    create_model('dtf_r18', num_classes=10, clip_length=8)
  for name in list_models():
    assert name in str(info.value)


def test_unknown_kwarg_lists_allowed_ones():
  with pytest.raises(ValueError, match=r"Unknown argument\(s\) \['depth'\].*dtf_r50") as info:
    create_model('dtf_r50', num_classes=10, clip_length=8, depth=3)
  for allowed in ('stage_sizes', 'width', 'dtf_stages', 'dtype', 'dropout_rate'):
    assert allowed in str(info.value)
  with pytest.raises(ValueError, match=r"Unknown argument\(s\) \['width'\]") as info:
    create_model('dtf_swin_t', num_classes=10, clip_length=8, width=8)
  for allowed in ('image_size', 'embed_dim', 'window_size', 'depths', 'num_heads'):
    assert allowed in str(info.value)


def test_model_specs_in_the_registry():
  from dtf_jax.models import model_spec, size_kwargs  # pylint: disable=import-outside-toplevel
  assert model_spec('dtf_swin_b') == model_spec('c2d_swin_t')
  assert model_spec('dtf_swin_b').size_argument == 'image_size'
  assert model_spec('dtf_r101').family == 'resnet' and model_spec('dtf_r50').size_argument is None
  assert size_kwargs('dtf_swin_b', 192) == {'image_size': 192} and size_kwargs('c2d_r50', 192) == {}
  model = create_model('c2d_swin_t', num_classes=3, clip_length=4, image_size=64)
  assert model_spec(model).family == 'swin' and model_spec(model).classifier == 'head'
  with pytest.raises(ValueError, match="Unknown model 'dtf_r18'"):
    model_spec('dtf_r18')


@pytest.mark.parametrize('kernel, strides, padding, shape', [
    ((4, 7, 7), (4, 2, 2), ((3, 3), (3, 3)), (2, 8, 18, 18, 3)),  # the stem: 4 frames folded
    ((1, 3, 3), (1, 2, 2), ((1, 1), (1, 1)), (2, 3, 9, 9, 5)),    # strided 3x3
    ((2, 4, 4), (2, 4, 4), ((0, 0), (0, 0)), (1, 4, 8, 8, 3)),    # Swin's tubelet embedding
])
def test_frame_conv_is_the_3d_conv(kernel, strides, padding, shape):
  """FrameConv (2D convolutions of B*T' images) has flax's 3D Conv's variables and values."""
  from dtf_jax.layers.conv import FrameConv  # pylint: disable=import-outside-toplevel
  x = jnp.asarray(np.random.RandomState(0).randn(*shape).astype(np.float32))
  conv3d = flax.linen.Conv(6, kernel, strides, padding=((0, 0),) + padding, use_bias=True)
  frames = FrameConv(6, kernel, strides, padding, use_bias=True)
  variables = conv3d.init(jax.random.PRNGKey(1), x)
  variables['params']['bias'] = jnp.arange(6.0)
  same_init = frames.init(jax.random.PRNGKey(1), x)
  np.testing.assert_array_equal(same_init['params']['kernel'], variables['params']['kernel'])
  np.testing.assert_allclose(frames.apply(variables, x), conv3d.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='time stride'):
    FrameConv(6, (2, 3, 3), (1, 1, 1)).init(jax.random.PRNGKey(0), x)

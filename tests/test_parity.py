"""Official-weights parity: PyTorch reference modules (official state-dict keys) -> converter ->
dtf_jax models, plus the converter's strictness and the ``convert_torch`` command-line tool.

The references (tests/torch_reference.py) are randomised with ``randomize_`` and a calibration
input, so that every parameter, ``alpha1`` and every BN statistic are non-trivial while the
activations of deep networks stay O(1). Everything is float32 on both sides.
"""

import copy
import hashlib
import json
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dtf_jax.convert import ConversionError, convert_official_state_dict, convert_with_report
from dtf_jax.convert.official import UNUSED_OFFICIAL
from dtf_jax.models import create_model
from dtf_jax.pretrained import load_pretrained
from dtf_jax.tools import convert_torch

sys.path.insert(0, os.path.dirname(__file__))

from torch_reference import (  # noqa: E402
    ReferenceResNet, ReferenceSwin, randomize_, swin_block_info)

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

# Logit tolerance: max |jax - torch| < LOGIT_TOL * max(1, max |torch logits|).
LOGIT_TOL = 1e-3
# Running statistics after one train-mode step: same rule per tensor.
STATS_TOL = 1e-3

TINY_SWIN = dict(image_size=64, window_size=4, embed_dim=32, depths=(2, 2, 2, 2),
                 num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
TINY_SWIN_CLIP, TINY_SWIN_CLASSES = 8, 10
# The frame-wise aggregation implementation of the models under test ('auto' unless set, e.g.
# by experiments/gpu_benchmarks.sh, which runs these tests once per implementation).
FA_IMPL = os.environ.get('DTF_TEST_FA_IMPL', 'auto')


def _video(shape, seed):
  """Random ``B C T H W`` torch video (float32)."""
  return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _to_jax(video):
  return jnp.asarray(video.numpy().transpose(0, 2, 3, 4, 1))  # B C T H W -> B T H W C


def _clone_sd(model):
  """A state dict that owns its memory (``state_dict()`` shares the module's tensors)."""
  return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _flat(tree):
  return {'/'.join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _assert_trees_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _logit_diff(name, jax_logits, torch_logits):
  jax_logits, torch_logits = np.asarray(jax_logits), torch_logits.detach().numpy()
  diff = np.abs(jax_logits - torch_logits).max()
  scale = max(1.0, np.abs(torch_logits).max())
  print(f'{name}: max abs logit diff {diff:.3g} (max |logit| {np.abs(torch_logits).max():.3g}, '
        f'logit std {torch_logits.std():.3g})')
  # The comparison is meaningful only if the logits differ between classes and samples.
  assert torch_logits.std() > 0.05
  assert diff < LOGIT_TOL * scale, (diff, scale)
  return diff


def _compare_stats(name, jax_stats, torch_stats, before):
  """Every running statistic of the JAX update vs torch's after one train step."""
  got, want, old = _flat(jax_stats), _flat(torch_stats), _flat(before)
  assert sorted(got) == sorted(want)
  worst = 0.0
  for k in want:
    diff = np.abs(got[k] - want[k]).max()
    worst = max(worst, diff / max(1.0, np.abs(want[k]).max()))
    assert diff < STATS_TOL * max(1.0, np.abs(want[k]).max()), (k, diff)
  moved = max(np.abs(want[k] - old[k]).max() for k in want)
  print(f'{name}: worst scaled running-stat diff {worst:.3g} ({len(want)} tensors; the stats '
        f'moved by up to {moved:.3g})')
  assert moved > 1e-2  # the step did update them
  return got


# ---------------------------------------------------------------------------
# Fixtures: randomised references and their converted variables
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def dtf_r50():
  """The real DTF-R50 (full widths, 400 classes, 16 frames) at 64x64, randomised."""
  video = _video((2, 3, 16, 64, 64), seed=0)
  ref = randomize_(ReferenceResNet(dropout=0.0), seed=1, calib_input=video).eval()
  sd = _clone_sd(ref)
  variables = convert_official_state_dict('dtf_r50', sd, num_classes=400, clip_length=16)
  model = create_model('dtf_r50', num_classes=400, clip_length=16, dropout_rate=0.0,
                       fa_impl=FA_IMPL)
  return ref, sd, model, variables, video


def _tiny_swin(dtf: bool, seed: int):
  video = _video((2, 3, TINY_SWIN_CLIP, 64, 64), seed=seed)
  ref = ReferenceSwin(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4,
                      img_size=64, clip_length=TINY_SWIN_CLIP, num_classes=TINY_SWIN_CLASSES,
                      dtf=dtf)
  ref = randomize_(ref, seed=seed + 1, calib_input=video).eval()
  name = 'dtf_swin_t' if dtf else 'c2d_swin_t'
  model = create_model(name, num_classes=TINY_SWIN_CLASSES, clip_length=TINY_SWIN_CLIP,
                       fa_impl=FA_IMPL, **TINY_SWIN)
  return ref, _clone_sd(ref), model, video


def _convert_swin(name, sd, **kw):
  return convert_official_state_dict(name, sd, num_classes=TINY_SWIN_CLASSES,
                                     clip_length=TINY_SWIN_CLIP, **TINY_SWIN, **kw)


def _convert_swin_with_report(name, sd):
  return convert_with_report(name, sd, num_classes=TINY_SWIN_CLASSES, clip_length=TINY_SWIN_CLIP,
                             source='dtf', **TINY_SWIN)


@pytest.fixture(scope='module')
def dtf_swin():
  return _tiny_swin(dtf=True, seed=10)


_jit_apply = jax.jit(lambda model, v, x: model.apply(v, x, train=False), static_argnums=0)
_jit_train = jax.jit(lambda model, v, x: model.apply(v, x, train=True, mutable=['batch_stats']),
                     static_argnums=0)


# ---------------------------------------------------------------------------
# DTF-R50 / C2D-R50
# ---------------------------------------------------------------------------


def test_dtf_r50_parity_eval(dtf_r50):
  ref, _, model, variables, video = dtf_r50
  with torch.no_grad():
    want = ref.eval()(video)
  _logit_diff('dtf_r50 eval', _jit_apply(model, variables, _to_jax(video)), want)
  # The DTF branches are active: alpha is random (it is zero at init).
  alphas = [np.abs(v).max() for k, v in _flat(variables['params']).items() if k.endswith('alpha')]
  assert len(alphas) == 16 and min(alphas) > 0.1


def test_dtf_r50_parity_train(dtf_r50):
  ref, _, model, variables, video = dtf_r50
  ref = copy.deepcopy(ref).train()
  with torch.no_grad():
    want = ref(video)
  logits, updates = _jit_train(model, variables, _to_jax(video))
  _logit_diff('dtf_r50 train', logits, want)
  after = convert_official_state_dict('dtf_r50', _clone_sd(ref), num_classes=400, clip_length=16)
  got = _compare_stats('dtf_r50 train', updates['batch_stats'], after['batch_stats'],
                       variables['batch_stats'])
  # Named spot checks (also covered above): stem BN and a DTF spectrum norm.
  bn = ref.layer1[0].dtf_blk.norm1.norm
  for ours, theirs in (('stem_bn/mean', ref.bn1.running_mean), ('stem_bn/var', ref.bn1.running_var),
                       ('stage1_block0/temporal/spectrum_norm/mean', bn.running_mean),
                       ('stage1_block0/temporal/spectrum_norm/var', bn.running_var)):
    np.testing.assert_allclose(got[ours], theirs.numpy(), atol=STATS_TOL, rtol=STATS_TOL,
                               err_msg=ours)


def test_c2d_r50_parity_eval():
  video = _video((2, 3, 16, 64, 64), seed=3)
  ref = randomize_(ReferenceResNet(dtf_stages=(), dropout=0.0), seed=4, calib_input=video).eval()
  variables = convert_official_state_dict('c2d_r50', _clone_sd(ref), num_classes=400,
                                          clip_length=16)
  model = create_model('c2d_r50', num_classes=400, clip_length=16)
  with torch.no_grad():
    want = ref(video)
  _logit_diff('c2d_r50 eval', _jit_apply(model, variables, _to_jax(video)), want)


# ---------------------------------------------------------------------------
# DTF-Swin / C2D-Swin (tiny)
# ---------------------------------------------------------------------------


def test_dtf_swin_parity_eval_and_train(dtf_swin):
  ref, sd, model, video = dtf_swin
  variables = _convert_swin('dtf_swin_t', sd)
  with torch.no_grad():
    want = ref.eval()(video)
  _logit_diff('dtf_swin tiny eval', _jit_apply(model, variables, _to_jax(video)), want)

  ref = copy.deepcopy(ref).train()
  with torch.no_grad():
    want = ref(video)
  logits, updates = _jit_train(model, variables, _to_jax(video))
  _logit_diff('dtf_swin tiny train', logits, want)
  after = _convert_swin('dtf_swin_t', _clone_sd(ref))
  _compare_stats('dtf_swin tiny train', updates['batch_stats'], after['batch_stats'],
                 variables['batch_stats'])


@pytest.mark.parametrize('fa_impl', ['xla', 'pallas'])
def test_dtf_swin_parity_other_fa_impls(dtf_swin, fa_impl):
  """Every frame-wise aggregation implementation gives the reference's logits (train mode, so
  the spectrum norm uses the batch statistics of the aggregated features)."""
  ref, sd, model, video = dtf_swin
  variables = _convert_swin('dtf_swin_t', sd)
  with torch.no_grad():
    want = copy.deepcopy(ref).train()(video)
  logits, _ = _jit_train(model.clone(fa_impl=fa_impl), variables, _to_jax(video))
  _logit_diff(f'dtf_swin tiny train, fa_impl {fa_impl}', logits, want)


def test_c2d_swin_parity_eval():
  ref, sd, model, video = _tiny_swin(dtf=False, seed=20)
  variables = _convert_swin('c2d_swin_t', sd)
  assert 'batch_stats' not in variables or not variables['batch_stats']
  with torch.no_grad():
    want = ref(video)
  _logit_diff('c2d_swin tiny eval', _jit_apply(model, variables, _to_jax(video)), want)


def _unused_swin_keys(ref, sd):
  """Official keys that the DTF-Swin owns but never uses: every ``conv`` and the DTF blocks of
  blocks with an effective shift > 0."""
  unused = set()
  for prefix, shift in swin_block_info(ref):
    unused |= {k for k in sd if k.startswith(prefix + 'conv.')}
    if shift > 0:
      unused |= {k for k in sd if k.startswith(prefix + 'dtf_block.')}
  return unused


def test_swin_report_lists_unused_tensors(dtf_swin):
  ref, sd, _, _ = dtf_swin
  _, report = _convert_swin_with_report('dtf_swin_t', sd)
  unused = _unused_swin_keys(ref, sd)
  # Tiny Swin at 64x64, window 4: stages have 16, 8, 4, 2 tokens per side; only the odd blocks of
  # stages 1-2 are shifted. 8 conv weights + 2 shifted DTF blocks.
  assert sum(k.endswith('.conv.weight') for k in unused) == 8
  assert {k.split('.dtf_block.')[0] for k in unused if '.dtf_block.' in k} == \
      {'layers.0.blocks.1', 'layers.1.blocks.1'}
  skipped = report.ignored_keys(UNUSED_OFFICIAL)
  assert skipped and any(k.endswith('.conv.weight') for k in skipped)
  # (num_batches_tracked counters of unused DTF blocks are listed as step counters instead.)
  assert set(skipped) == {k for k in unused if not k.endswith('num_batches_tracked')}
  # Every official key is accounted for exactly once, each with its shape.
  accounted = [k for k, *_ in report.loaded] + [k for k, *_ in report.ignored]
  assert sorted(accounted) == sorted(sd)
  assert all(tuple(sd[k].shape) == s for k, s, _ in report.ignored)
  assert not report.initialised  # an official checkpoint fills every variable
  text = report.format()
  assert f'ignored ({len(report.ignored)})' in text
  assert any(line.strip().startswith('layers.0.blocks.1.conv.weight') for line in text.splitlines())


def test_unused_official_tensors_do_not_matter(dtf_swin):
  ref, sd, model, video = dtf_swin
  unused = _unused_swin_keys(ref, sd)
  gen = torch.Generator().manual_seed(99)
  perturbed = dict(sd)
  for k in unused:
    if not k.endswith(('num_batches_tracked', 'weights_cor')):
      perturbed[k] = torch.randn(sd[k].shape, generator=gen) * 3 + 1
  # The reference really ignores them ...
  ref2 = copy.deepcopy(ref).eval()
  ref2.load_state_dict(perturbed)
  with torch.no_grad():
    np.testing.assert_array_equal(ref2(video).numpy(), ref.eval()(video).numpy())
  # ... and so does the conversion: identical variables.
  _assert_trees_equal(_convert_swin('dtf_swin_t', perturbed), _convert_swin('dtf_swin_t', sd))
  # Whereas a used DTF tensor (unshifted block) changes the logits.
  used = dict(sd)
  used['layers.0.blocks.0.dtf_block.alpha1'] = sd['layers.0.blocks.0.dtf_block.alpha1'] + 1.0
  x = _to_jax(video)
  diff = np.abs(np.asarray(_jit_apply(model, _convert_swin('dtf_swin_t', used), x))
                - np.asarray(_jit_apply(model, _convert_swin('dtf_swin_t', sd), x))).max()
  assert diff > 1e-3


# ---------------------------------------------------------------------------
# State-dict handling and strictness (tiny DTF-Swin state dict)
# ---------------------------------------------------------------------------


def test_state_dict_wrappers_prefixes_and_numpy(dtf_swin):
  _, sd, _, _ = dtf_swin
  base = _convert_swin('dtf_swin_t', sd)
  module_sd = {'module.' + k: v for k, v in sd.items()}
  numpy_sd = {k: v.numpy() for k, v in sd.items()}
  for variant in ({'state_dict': sd}, module_sd, {'state_dict': module_sd}, numpy_sd,
                  {'model': numpy_sd}):
    _assert_trees_equal(_convert_swin('dtf_swin_t', variant), base)
  # float64 tensors are accepted and converted to float32.
  double = _convert_swin('dtf_swin_t', {k: v.double() if v.is_floating_point() else v
                                        for k, v in sd.items()})
  assert all(v.dtype == np.float32 for v in _flat(double['params']).values())
  for k, v in _flat(double['params']).items():
    np.testing.assert_allclose(v, _flat(base['params'])[k], rtol=1e-7, atol=0, err_msg=k)


def test_converted_variables_do_not_alias_torch_memory(dtf_swin):
  """Editing the torch tensors after conversion must not change the (immutable) JAX arrays."""
  _, sd, _, _ = dtf_swin
  sd = {k: v.clone() for k, v in sd.items()}
  variables = _convert_swin('dtf_swin_t', sd)
  before = np.array(variables['params']['head']['bias'])
  sd['fc.bias'].add_(1.0)  # e.g. torch training continues in place
  np.testing.assert_array_equal(np.asarray(variables['params']['head']['bias']), before)


def _conversion_error(sd, name='dtf_swin_t'):
  with pytest.raises(ConversionError) as info:
    _convert_swin(name, sd)
  return str(info.value)


def test_missing_key_is_named(dtf_swin):
  _, sd, _, _ = dtf_swin
  for key, target in (('layers.0.blocks.0.attn.qkv.weight', 'params/stage1_block0/attn/qkv/kernel'),
                      ('layers.0.blocks.0.dtf_block.alpha1', 'params/stage1_block0/temporal/alpha'),
                      ('layers.2.blocks.1.dtf_block.norm1.norm.running_var',
                       'batch_stats/stage3_block1/temporal/spectrum_norm/var')):
    broken = {k: v for k, v in sd.items() if k != key}
    message = _conversion_error(broken)
    # Named by the official key and by the dtf_jax variable it would fill.
    assert 'missing' in message and f'{key} (for {target}' in message, message


def test_unknown_key_is_named(dtf_swin):
  _, sd, _, _ = dtf_swin
  for key in ('layers.0.blocks.0.attn.extra.weight', 'head2.weight',
              'layers.0.blocks.0.dtf_block.something'):
    message = _conversion_error(dict(sd, **{key: torch.zeros(3)}))
    assert 'unexpected' in message and key in message, message


def test_misshaped_key_is_named_with_both_shapes(dtf_swin):
  _, sd, _, _ = dtf_swin
  message = _conversion_error(dict(sd, **{'fc.weight': torch.zeros(11, 256)}))
  # Given and needed shapes in the official (PyTorch) layout, and the dtf_jax target.
  assert 'mis-shaped' in message and 'fc.weight' in message, message
  assert '(11, 256)' in message and '(10, 256)' in message, message
  assert 'params/head/kernel (256, 10)' in message and 'missing' not in message, message
  key = 'layers.0.blocks.0.dtf_block.filter_g.weight'
  message = _conversion_error(dict(sd, **{key: torch.zeros(sd[key].shape[0] + 1,
                                                           *sd[key].shape[1:])}))
  assert key in message and 'mis-shaped' in message, message


def test_all_problems_in_one_error(dtf_swin):
  _, sd, _, _ = dtf_swin
  broken = {k: v for k, v in sd.items() if k != 'norm.weight'}
  broken['bogus.weight'] = torch.zeros(1)
  broken['fc.bias'] = torch.zeros(11)
  broken['layers.1.blocks.0.dtf_block.weights_cor'] = \
      sd['layers.1.blocks.0.dtf_block.weights_cor'] * 2
  message = _conversion_error(broken)
  for needle in ('params/norm/scale', 'bogus.weight', 'fc.bias', '(11,)', '(10,)',
                 'layers.1.blocks.0.dtf_block.weights_cor'):
    assert needle in message, (needle, message)


def test_fixed_tensors_are_verified(dtf_swin):
  _, sd, _, _ = dtf_swin
  key = 'layers.3.blocks.1.dtf_block.weights_cor'  # stage 4: unshifted, its DTF block is used
  message = _conversion_error(dict(sd, **{key: torch.full_like(sd[key], 0.5)}))
  assert key in message and '1/C' in message, message
  key = 'layers.0.blocks.0.attn.relative_position_index'
  message = _conversion_error(dict(sd, **{key: sd[key].flip(0)}))
  assert key in message, message
  key = 'layers.0.blocks.1.attn_mask'
  message = _conversion_error(dict(sd, **{key: torch.zeros_like(sd[key])}))
  assert key in message, message


def test_dtf_state_dict_into_c2d_model_fails(dtf_r50):
  _, sd, _, _, _ = dtf_r50
  with pytest.raises(ConversionError) as info:
    convert_official_state_dict('c2d_r50', sd, num_classes=400, clip_length=16)
  message = str(info.value)
  assert 'unexpected' in message and 'layer1.0.dtf_blk.alpha1' in message, message[:2000]
  assert 'layer4.2.dtf_blk.filter_g.weight' in message
  # And the other way round: a DTF model needs the DTF tensors.
  c2d_sd = {k: v for k, v in sd.items() if '.dtf_blk.' not in k}
  with pytest.raises(ConversionError, match='stage1_block0/temporal/alpha'):
    convert_official_state_dict('dtf_r50', c2d_sd, num_classes=400, clip_length=16)


# ---------------------------------------------------------------------------
# convert_torch command-line tool
# ---------------------------------------------------------------------------


class NotATensor:
  """A pickled custom object: weights-only loading must refuse it."""

  def __init__(self):
    self.payload = 'arbitrary code could live here'


def _cli_args(src, out):
  args = ['--model', 'dtf_swin_t', '--clip-length', str(TINY_SWIN_CLIP), '--num-classes',
          str(TINY_SWIN_CLASSES), '--input', str(src), '--output', str(out)]
  for key, value in TINY_SWIN.items():
    args += ['--model-arg', f'{key}={value!r}'.replace(' ', '')]
  return args


def test_convert_cli_round_trip(dtf_swin, tmp_path, capsys):
  ref, sd, model, video = dtf_swin
  src, out = tmp_path / 'official.pth', tmp_path / 'out'
  torch.save(ref.state_dict(), src)
  convert_torch.main(_cli_args(src, out))
  printed = capsys.readouterr().out
  assert f'layers.0.blocks.1.conv.weight (32, 32, 1, 3): {UNUSED_OFFICIAL}' in printed
  assert 'Wrote' in printed

  meta = json.loads((out / 'meta.json').read_text())
  assert meta['model'] == 'dtf_swin_t'
  assert meta['source']['kind'] == 'dtf' and meta['source']['layout'] == 'official'
  assert meta['source']['sha256'] == hashlib.sha256(src.read_bytes()).hexdigest()
  assert meta['kwargs']['num_classes'] == TINY_SWIN_CLASSES
  assert meta['kwargs']['clip_length'] == TINY_SWIN_CLIP
  for key, value in TINY_SWIN.items():
    assert meta['kwargs'][key] == (list(value) if isinstance(value, tuple) else value), key

  loaded_model, loaded = load_pretrained(str(out))
  direct = _convert_swin('dtf_swin_t', sd)
  _assert_trees_equal(loaded, direct)
  assert loaded_model == model
  x = _to_jax(video)
  np.testing.assert_array_equal(np.asarray(_jit_apply(loaded_model, loaded, x)),
                                np.asarray(_jit_apply(model, direct, x)))

  # A second run refuses to overwrite without --overwrite.
  with pytest.raises(SystemExit, match='holds converted weights; pass --overwrite'):
    convert_torch.main(_cli_args(src, out))
  convert_torch.main(_cli_args(src, out) + ['--overwrite'])


def test_convert_cli_missing_input(tmp_path):
  missing = tmp_path / 'nope.pth'
  with pytest.raises(SystemExit) as info:
    convert_torch.main(_cli_args(missing, tmp_path / 'out'))
  assert 'not found' in str(info.value.code) and str(missing) in str(info.value.code)
  assert not (tmp_path / 'out').exists()


def test_convert_cli_refuses_pickled_objects(dtf_swin, tmp_path):
  _, sd, _, _ = dtf_swin
  src = tmp_path / 'evil.pth'
  torch.save({'state_dict': sd, 'extra': NotATensor()}, src)
  with pytest.raises(SystemExit) as info:
    convert_torch.main(_cli_args(src, tmp_path / 'out'))
  message = str(info.value.code)
  assert 'weights-only' in message and str(src) in message, message
  assert not (tmp_path / 'out').exists()


def test_convert_cli_reports_conversion_errors(dtf_swin, tmp_path):
  ref, _, _, _ = dtf_swin
  src = tmp_path / 'official.pth'
  torch.save(ref.state_dict(), src)
  args = _cli_args(src, tmp_path / 'out')
  args[args.index('--num-classes') + 1] = '11'
  with pytest.raises(SystemExit) as info:
    convert_torch.main(args)
  assert 'fc.weight' in str(info.value.code) and 'mis-shaped' in str(info.value.code)
  with pytest.raises(SystemExit) as info:
    convert_torch.main(_cli_args(src, tmp_path / 'out2') + ['--model-arg', 'image_size'])
  assert 'KEY=VALUE' in str(info.value.code)
  assert not (tmp_path / 'out').exists() and not (tmp_path / 'out2').exists()

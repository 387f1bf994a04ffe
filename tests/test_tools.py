"""FLOP counter against analytic formulas and the published GFLOPs; model_info and benchmark_model
CLIs; pretrained save / load round trip.

FLOP counts trace the full-size models with ``jax.eval_shape`` parameters and ``ShapeDtypeStruct``
inputs (nothing is compiled). The CLI and checkpoint tests use small inputs / tiny models.
"""

import json
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtf_jax import flops, pretrained
from dtf_jax.models import create_model
from dtf_jax.pretrained import load_pretrained, read_meta, save_pretrained
from dtf_jax.tools import benchmark_model, model_info

R50 = (3, 4, 6, 3)


# --------------------------------------------------------------------------------------------
# Analytic MAC formulas (B = 1)
# --------------------------------------------------------------------------------------------

def resnet_blocks(frames, size, stages=R50, width=64, early_stride=4):
  """(stage, T, planes, input channels, input res, output res, stride) of every bottleneck."""
  steps = frames // early_stride
  res = size // 2 // 2  # stem stride 2, max-pool stride 2
  cin = width
  for s, n in enumerate(stages):
    planes = width * 2 ** s
    for b in range(n):
      stride = 2 if (s > 0 and b == 0) else 1
      yield s + 1, steps, planes, cin, res, res // stride, stride
      cin, res = planes * 4, res // stride


def c2d_resnet_conv_macs(frames, size, stages=R50, width=64, early_stride=4):
  """MACs of every convolution of a C2D ResNet (v1.5) at ``frames x size x size``."""
  steps = frames // early_stride
  stem_res = size // 2
  # Stem: [early_stride, 7, 7] kernel on 3 channels, per output position and output channel.
  macs = steps * stem_res * stem_res * width * (3 * early_stride * 7 * 7)
  for _, t, planes, cin, res_in, res_out, stride in resnet_blocks(frames, size, stages, width,
                                                               early_stride):
    macs += t * res_in ** 2 * cin * planes            # conv1 1x1 (stride 1, input resolution)
    macs += t * res_out ** 2 * planes * planes * 9    # conv2 3x3, stride on this conv (v1.5)
    macs += t * res_out ** 2 * planes * planes * 4    # conv3 1x1 -> 4 * planes
    if stride != 1 or cin != planes * 4:
      macs += t * res_out ** 2 * cin * planes * 4     # projection shortcut 1x1 (strided)
  return macs


def dtf_resnet_macs(frames, size, stages=R50, width=64, kernel=3, group=16,
                    dtf_stages=(1, 2, 3, 4)):
  """Per-category MACs of the DTF blocks (after conv2: C = planes at the conv2 output res)."""
  k2 = kernel * kernel
  out = dict(dtf_estimator=0, dtf_mixing=0, dtf_elementwise=0, dtf_fft=0)
  for stage, t_steps, c, _, _, res, _ in resnet_blocks(frames, size, stages, width):
    if stage not in dtf_stages:
      continue
    big_t, bins, hw = t_steps, t_steps // 2 + 1, res * res
    out['dtf_estimator'] += hw * (c + k2) * big_t * (c * bins * 2 // group)
    out['dtf_mixing'] += 4 * c * c * bins * hw
    out['dtf_elementwise'] += 2 * k2 * c * big_t * hw + 4 * c * bins * hw
    out['dtf_fft'] += 2 * (2 * big_t * bins * c * hw)
  return out


def count(name, frames, size, num_classes=400, **kwargs):
  model = create_model(name, num_classes=num_classes, clip_length=frames, **kwargs)
  return flops.count_model_macs(model, jax.ShapeDtypeStruct((1, frames, size, size, 3),
                                                            jnp.float32))[0]


# --------------------------------------------------------------------------------------------
# FLOP counter
# --------------------------------------------------------------------------------------------

def test_c2d_r50_macs_match_analytic_and_paper():
  macs = count('c2d_r50', 16, 256)
  assert macs['conv'] == c2d_resnet_conv_macs(16, 256)
  assert macs['linear'] == 2048 * 400
  for c in flops.CATEGORIES:
    if c not in ('conv', 'linear'):
      assert macs[c] == 0, c
  paper = flops.total_macs(macs, 'paper') / 1e9
  assert abs(paper - 23) / 23 < 0.05, paper
  assert flops.total_macs(macs, 'ours') == flops.total_macs(macs, 'paper')


def test_c2d_r101_conv_macs_match_analytic():
  assert count('c2d_r101', 16, 256)['conv'] == c2d_resnet_conv_macs(16, 256, (3, 4, 23, 3))


def test_dtf_r50_macs_match_analytic():
  macs = count('dtf_r50', 16, 256)
  assert macs['conv'] == c2d_resnet_conv_macs(16, 256)  # DTF adds no convolution
  assert macs['linear'] == 2048 * 400
  assert macs['attention'] == 0
  expected = dtf_resnet_macs(16, 256)
  for category in ('dtf_estimator', 'dtf_mixing', 'dtf_elementwise'):
    assert macs[category] == expected[category], (category, macs[category], expected[category])
  # Conventions: 'ours' counts everything once; 'paper' a complex MAC as 1 and no FFT/elementwise.
  assert flops.total_macs(macs, 'ours') == sum(macs.values())
  paper = macs['conv'] + macs['linear'] + macs['dtf_estimator'] + macs['dtf_mixing'] / 4
  assert flops.total_macs(macs, 'paper') == pytest.approx(paper, rel=1e-12)
  assert abs(paper / 1e9 - 25) / 25 < 0.05, paper / 1e9




def test_dtf_r50_fft_macs_match_analytic():
  assert count('dtf_r50', 16, 256)['dtf_fft'] == dtf_resnet_macs(16, 256)['dtf_fft']


def test_fft_macs_direct_real_dft():
  x = jax.ShapeDtypeStruct((2, 8, 5), jnp.float32)  # 10 transforms of length 8 along axis 1
  macs = flops.count_macs(lambda a: jnp.fft.rfft(a, axis=1), x)
  assert macs['dtf_fft'] == 10 * 2 * 8 * 5
  y = jax.ShapeDtypeStruct((2, 5, 5), jnp.complex64)  # 10 inverse transforms to length 8
  macs = flops.count_macs(lambda a: jnp.fft.irfft(a, n=8, axis=1), y)
  assert macs['dtf_fft'] == 10 * 2 * 8 * 5


def test_dtf_r50_stage4_only_and_32_frames_macs():
  macs = count('dtf_r50', 16, 256, dtf_stages=(4,))
  expected = dtf_resnet_macs(16, 256, dtf_stages=(4,))
  for category in ('dtf_estimator', 'dtf_mixing', 'dtf_elementwise'):
    assert macs[category] == expected[category], category
  # Stage 4 alone: 3 blocks, C = 512 at 8x8, T' = 4, F = 3.
  assert expected['dtf_mixing'] == 3 * 4 * 512 * 512 * 3 * 8 * 8
  macs = count('dtf_r50', 32, 256)
  expected = dtf_resnet_macs(32, 256)
  for category in ('dtf_estimator', 'dtf_mixing', 'dtf_elementwise'):
    assert macs[category] == expected[category], category


def swin_macs(frames, size, embed_dim, depths, window=7, patch=4, early_stride=4, mlp_ratio=4,
              num_classes=400):
  """conv / linear / attention MACs of a C2D Swin (B = 1)."""
  steps = frames // early_stride
  res = size // patch
  dim = embed_dim
  out = dict(conv=steps * res * res * dim * (3 * early_stride * patch * patch), linear=0,
             attention=0)
  for s, depth in enumerate(depths):
    tokens = steps * res * res
    win = min(window, res)
    # qkv (3 d^2) + proj (d^2) + mlp (2 * ratio * d^2) per token; q.k and attn.v per token.
    out['linear'] += depth * tokens * (4 + 2 * mlp_ratio) * dim * dim
    out['attention'] += depth * 2 * tokens * win * win * dim
    if s < len(depths) - 1:
      out['linear'] += steps * (res // 2) ** 2 * (4 * dim) * (2 * dim)  # patch merging
      res, dim = res // 2, dim * 2
  out['linear'] += steps * dim * num_classes  # per-step classifier
  return out


def test_c2d_swin_b_macs_match_analytic():
  macs = count('c2d_swin_b', 64, 224)
  expected = swin_macs(64, 224, 128, (2, 2, 18, 2))
  for category, value in expected.items():
    assert macs[category] == value, (category, macs[category], value)


def test_dtf_swin_b_paper_gflops():
  macs = count('dtf_swin_b', 64, 224)
  paper = flops.total_macs(macs, 'paper') / 1e9
  assert abs(paper - 266) / 266 < 0.05, paper
  # The backbone part is the C2D one; DTF adds the estimator, mixing, FFT and elementwise terms.
  expected = swin_macs(64, 224, 128, (2, 2, 18, 2))
  assert macs['conv'] == expected['conv'] and macs['attention'] == expected['attention']
  assert macs['linear'] == expected['linear']
  for c in ('dtf_estimator', 'dtf_mixing', 'dtf_fft', 'dtf_elementwise'):
    assert macs[c] > 0
  # DTF on Swin-B: 13 blocks; mixing = 4 C^2 F h w per block over T' = 16 steps (F = 9 bins).
  res_dims = [(56, 128)] + [(28, 256)] + [(14, 512)] * 9 + [(7, 1024)] * 2
  assert macs['dtf_mixing'] == sum(4 * c * c * 9 * r * r for r, c in res_dims)


# --------------------------------------------------------------------------------------------
# model_info
# --------------------------------------------------------------------------------------------

def _line(out, prefix):
  lines = [l for l in out.splitlines() if l.strip().startswith(prefix)]
  assert lines, f'no line starting with {prefix!r} in:\n{out}'
  return lines[0]


def test_model_info_no_compile(capsys):
  model_info.main(['--model', 'c2d_r50', '--clip-length', '4', '--size', '64',
                   '--num-classes', '10', '--no-compile'])
  out = capsys.readouterr().out
  assert 'c2d_r50: 4 frames x 64x64, 10 classes, float32' in out
  # 400 -> 10 classes removes 390 x (2048 + 1) head parameters.
  assert _line(out, 'trainable parameters:') == \
      f'trainable parameters: {24_355_856 - 390 * 2049:,}'
  gflops = (c2d_resnet_conv_macs(4, 64) + 2048 * 10) / 1e9
  assert _line(out, 'GFLOPs per view (ours convention):').endswith(f': {gflops:.2f}')
  assert _line(out, 'GFLOPs per view (paper convention):').endswith(f': {gflops:.2f}')
  assert f'conv {c2d_resnet_conv_macs(4, 64) / 1e9:.3f}' in _line(out, 'MACs by category')
  assert 'XLA compile time' not in out and 'XLA memory' not in out
  assert 'fixed weights_cor' not in out  # C2D has no DTF block


@pytest.mark.parametrize('name,frames,official', [('dtf_r50', 16, 28_951_472),
                                                   ('dtf_r50', 64, 50_668_304),
                                                   pytest.param('dtf_r101', 64, 93_283_088,
                                                                marks=pytest.mark.slow)])
def test_model_info_official_parameter_totals(capsys, name, frames, official):
  """Trainable parameters + the fixed weights_cor equal the official nn.Parameter counts."""
  model_info.main(['--model', name, '--clip-length', str(frames), '--size', '64', '--no-compile'])
  out = capsys.readouterr().out
  assert _line(out, '+ fixed weights_cor').endswith(f': {official:,}')


def test_model_info_paper_convention_first_for_dtf(capsys):
  model_info.main(['--model', 'dtf_r50', '--clip-length', '8', '--size', '64',
                   '--num-classes', '10', '--convention', 'paper', '--no-compile'])
  out = capsys.readouterr().out
  lines = [l for l in out.splitlines() if l.startswith('GFLOPs per view')]
  assert [l.split('(')[1].split(' ')[0] for l in lines] == ['paper', 'ours']
  values = [float(l.rsplit(':', 1)[1]) for l in lines]
  assert values[0] < values[1]  # paper counts the DTF path partly
  assert 'dtf_mixing' in _line(out, 'MACs by category')


def test_model_info_compile_reports_time_and_memory(capsys):
  model_info.main(['--model', 'c2d_r50', '--clip-length', '4', '--size', '32',
                   '--num-classes', '10'])
  out = capsys.readouterr().out
  compile_line = _line(out, 'XLA compile time (forward, batch 1):')
  assert float(re.search(r': ([\d.]+) s', compile_line).group(1)) > 0
  mem_line = _line(out, 'XLA memory (forward, batch 1,')
  match = re.search(r'peak ([\d.]+) MiB = arguments ([\d.]+) \+ temporaries ([\d.]+) \+ output '
                    r'([\d.]+) - aliased 0.0 MiB', mem_line)
  assert match, mem_line
  peak, arguments, temporaries, output = map(float, match.groups())
  params = 24_355_856 - 390 * 2049
  assert arguments >= params * 4 / 2 ** 20 - 0.1  # float32 parameters are arguments
  assert peak >= arguments
  assert peak == pytest.approx(arguments + temporaries + output, abs=0.2)


def test_model_info_train_step_memory_and_remat(monkeypatch, capsys):
  """--train compiles the trainer's step (parameters and SGD momentum donated) of a tiny dtf_r50;
  remat 'block' keeps a fraction of the activations that 'none' keeps for the backward pass."""
  from dtf_jax.train import config as train_config  # pylint: disable=import-outside-toplevel

  def tiny_create_model(name, **kwargs):
    return create_model(name, **dict(kwargs, width=8, stage_sizes=(1, 1), dtf_stages=(2,),
                                     fa_impl='xla'))
  monkeypatch.setattr(model_info, 'create_model', tiny_create_model)
  monkeypatch.setattr(train_config, 'create_model', tiny_create_model)
  saved = {}
  for remat in ('none', 'block'):
    model_info.main(['--model', 'dtf_r50', '--clip-length', '8', '--size', '64', '--num-classes',
                     '10', '--batch', '2', '--train', '--remat', remat] +
                    (['--no-compile'] if remat == 'none' else []))
    out = capsys.readouterr().out
    line = _line(out, f'activations kept for the backward pass (batch 2, remat {remat},')
    saved[remat] = float(re.search(r': ([\d.]+) MiB$', line).group(1))
  assert 0 < saved['block'] < saved['none'] / 2, saved
  params = int(_line(out, 'trainable parameters:').split(':')[1].replace(',', ''))
  assert _line(out, 'XLA compile time (train step, batch 2 per device, remat block):')
  mem_line = _line(out, 'XLA memory (train step, batch 2 per device, remat block,')
  match = re.search(r'peak ([\d.]+) MiB = arguments ([\d.]+) \+ temporaries ([\d.]+) \+ output '
                    r'([\d.]+) - aliased ([\d.]+) MiB', mem_line)
  assert match, mem_line
  peak, arguments, temporaries, output, aliased = map(float, match.groups())
  state = 2 * params * 4 / 2 ** 20  # float32 parameters and their momentum
  assert arguments >= state - 0.1 and aliased >= state - 0.1  # the state is donated
  assert peak == pytest.approx(arguments + temporaries + output - aliased, abs=0.3)


# --------------------------------------------------------------------------------------------
# benchmark_model (CLI smoke test on tiny models)
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_benchmark_model_compare_cli(monkeypatch, capsys):
  """main() with --compare on tiny ResNets (create_model patched to add tiny-size kwargs).

  The real sizes are too slow for a unit test on CPU (dtf_r50 vs c2d_r50 at 4 frames x 32 px takes
  about two minutes, mostly compiling); this checks the CLI flow, not timings. The ``rbg`` PRNG
  (faster to compile on CPU than threefry) is the default during the run.
  """
  calls, timers = [], []

  def tiny_create_model(name, **kwargs):
    calls.append((name, dict(kwargs)))
    return create_model(name, width=8, stage_sizes=(1, 1, 1, 1), dtf_stages=(4,), **kwargs)

  class RecordingTimer(benchmark_model.ModelTimer):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      timers.append(self)

  monkeypatch.setattr(benchmark_model, 'create_model', tiny_create_model)
  monkeypatch.setattr(benchmark_model, 'ModelTimer', RecordingTimer)
  with jax.default_prng_impl('rbg'):
    benchmark_model.main(['--model', 'dtf_r50', '--compare', 'c2d_r50', '--clip-length', '8',
                          '--size', '32', '--batch', '2', '--num-classes', '10', '--repeats', '1',
                          '--warmup', '0', '--peak-tflops', '0.25', '--fa-impl', 'xla,scan'])
  out = capsys.readouterr().out
  # --model once per --fa-impl, then --compare.
  assert [(c[0], c[1]['fa_impl']) for c in calls] == [('dtf_r50', 'xla'), ('dtf_r50', 'scan'),
                                                      ('c2d_r50', 'xla')]
  for _, kwargs in calls:
    assert kwargs['num_classes'] == 10 and kwargs['clip_length'] == 8
    assert jnp.dtype(kwargs['dtype']) == jnp.float32
    assert kwargs['remat'] == 'none'
  assert 'batch 2 x 8 frames x 32x32, float32, fa_impl xla,scan, remat none' in out
  names = ['dtf_r50[xla]', 'dtf_r50[scan]', 'c2d_r50']
  assert [t.name for t in timers] == names
  assert out.count(' compile time: forward') == 3
  for name in names:
    line = _line(out, f'{name}: forward')
    assert re.fullmatch(rf'{re.escape(name)}: forward [\d.]+ ms/clip, forward\+backward [\d.]+ '
                        r'ms/clip', line)
  for name in names[:2]:
    for what in ('forward', 'forward+backward'):
      line = _line(out, f'time ratio {name} / c2d_r50 ({what}):')
      assert float(line.rsplit(':', 1)[1]) > 0
  # XLA's cost analysis: every call reads at least the video and every parameter once; DTF adds
  # traffic to the same network; the printed ratio is that of the two models' figures.
  for timer in timers:
    floor = timer.video.nbytes + sum(x.nbytes for x in jax.tree.leaves(timer.variables))
    line = _line(out, f'{timer.name} XLA cost per clip:')
    printed = [float(x) for x in re.findall(r'([\d.]+) GiB accessed', line)]
    assert printed == [pytest.approx(timer.cost[w]['bytes'] / 2 / 2 ** 30, abs=6e-4)
                       for w in ('forward', 'forward+backward')], line
    assert all(timer.cost[w]['bytes'] >= floor and timer.cost[w]['flops'] > 0
               for w in timer.calls)
  for dtf in timers[:2]:
    for what in ('forward', 'forward+backward'):
      assert dtf.cost[what]['bytes'] > timers[2].cost[what]['bytes']
      line = _line(out, f'bytes-accessed ratio {dtf.name} / c2d_r50 ({what}):')
      assert float(line.rsplit(':', 1)[1]) == pytest.approx(
          dtf.cost[what]['bytes'] / timers[2].cost[what]['bytes'], abs=1e-3)

  # MFU = XLA's FLOPs / median time / the peak given, from the figures the line prints, which
  # are the measured ones.
  assert _line(out, 'peak ') == 'peak 0.25 TFLOP/s (--peak-tflops)'
  for timer in timers:
    line = _line(out, f'{timer.name} MFU:')
    found = re.findall(r'(forward|forward\+backward) ([\d.e+-]+)% \(([\d.e+-]+) GFLOP / '
                       r'([\d.e+-]+) ms per clip\)', line)
    assert [f[0] for f in found] == ['forward', 'forward+backward'], line
    for what, mfu, gflop, ms in found:
      assert float(gflop) == pytest.approx(timer.cost[what]['flops'] / 2 / 1e9, rel=1e-3)
      assert float(ms) == pytest.approx(timer.times[what][0] / 2 * 1e3, rel=1e-3)
      assert float(mfu) == pytest.approx(100 * float(gflop) / float(ms) / 0.25, rel=6e-3)
      assert float(mfu) == pytest.approx(100 * timer.mfu(what, 0.25), rel=6e-3)

  # One timed run per measurement; the forward+backward call gives a gradient for every
  # parameter (the DTF ones included) and new batch statistics.
  dtf_timer = timers[0]
  assert all(len(t) == 1 for timer in timers for t in timer.times.values())
  grads, updates = dtf_timer.calls['forward+backward'](*dtf_timer.args['forward+backward'])
  params = dtf_timer.variables['params']
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
  zero = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]
          if not np.any(np.asarray(g))]
  # alpha = 0 at init blocks the gradient of the spectral branch's parameters (and only those).
  assert all('temporal' in p and 'alpha' not in p for p in zero), zero
  assert np.any(np.asarray(grads['stage4_block0']['temporal']['alpha']))
  assert set(updates) == {'batch_stats'}


def test_benchmark_model_peak_of_device_kinds(monkeypatch):
  """Data-sheet peaks by jax's device kind (exact, then the longest prefix); --peak-tflops wins."""
  kind = ['NVIDIA H200']
  monkeypatch.setattr(benchmark_model.jax, 'devices',
                      lambda: [type('Device', (), {'device_kind': kind[0]})()])
  monkeypatch.setattr(benchmark_model.jax, 'default_backend', lambda: 'gpu')
  assert benchmark_model.device_peak('bfloat16') == (
      989.0, 'NVIDIA H200, data sheet, dense bfloat16')
  for kind[0], bf16 in (('NVIDIA A100-SXM4-40GB', 312.0), ('NVIDIA A100-PCIE-40GB', 312.0),
                        ('TPU v4', 275.0), ('TPU v5 lite', 197.0), ('TPU v5', 459.0),
                        ('TPU v6 lite', 918.0)):
    assert benchmark_model.device_peak('bfloat16')[0] == bf16, kind
  assert benchmark_model.device_peak('float32', 2.5) == (2.5, '--peak-tflops')


# --------------------------------------------------------------------------------------------
# pretrained
# --------------------------------------------------------------------------------------------

TINY_DTF = dict(num_classes=10, clip_length=8, width=8, stage_sizes=(1, 1, 1, 1), dtf_stages=(4,),
                dtype=jnp.float32)


def _random_variables(model, shape, seed):
  """Variables of ``model`` with random values (DTF alpha nonzero), without running init."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct(shape, jnp.float32))
  rng = np.random.default_rng(seed)
  out = {}
  for col, tree in shapes.items():
    flat = flax.traverse_util.flatten_dict(tree)
    for path, leaf in flat.items():
      if path[-1] == 'var':
        value = rng.uniform(0.5, 2.0, leaf.shape)
      elif path[-1] == 'scale':
        value = 1 + 0.1 * rng.standard_normal(leaf.shape)
      else:
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
      flat[path] = jnp.asarray(value, jnp.float32)
    out[col] = flax.traverse_util.unflatten_dict(flat)
  return out


def test_pretrained_round_trip(tmp_path):
  model = create_model('dtf_r50', **TINY_DTF)
  shape = (2, 8, 32, 32, 3)
  variables = _random_variables(model, shape, 0)
  video = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
  forward = jax.jit(lambda m, v, x: m.apply(v, x, train=False), static_argnums=0)
  expected = forward(model, variables, video)

  path = save_pretrained(str(tmp_path / 'ckpt'), 'dtf_r50', TINY_DTF, variables)
  assert os.path.isabs(path) and os.path.exists(os.path.join(path, 'meta.json'))
  assert not os.path.exists(os.path.join(path, 'meta.json.tmp'))

  loaded_model, loaded = load_pretrained(path)
  assert type(loaded_model) is type(model)
  for field in ('num_classes', 'clip_length', 'width', 'stage_sizes', 'dtf_stages', 'temporal'):
    assert getattr(loaded_model, field) == getattr(model, field), field
  assert jnp.dtype(loaded_model.dtype) == jnp.float32
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(variables)
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(variables)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  got = forward(loaded_model, loaded, video)  # (dtype comes back from JSON as 'float32')
  np.testing.assert_array_equal(got, expected)

  # Overrides replace arguments that keep the parameter shapes.
  override_model, _ = load_pretrained(path, dropout_rate=0.1)
  assert override_model.dropout_rate == 0.1 and override_model.width == 8

  # meta.json that disagrees with the arrays is refused, naming what does not fit.
  meta_path = os.path.join(path, 'meta.json')
  meta = json.loads(open(meta_path).read())
  with open(meta_path, 'w') as f:
    json.dump(dict(meta, model='c2d_r50'), f)
  with pytest.raises(ValueError, match=r'\(c2d_r50\): the arrays do not fit the model: \d+ '
                                       r'unexpected \(batch_stats/stage4_block0/temporal'):
    load_pretrained(path)
  with pytest.raises(ValueError, match=r'params/head/kernel: \(\d+, 10\) for \(\d+, 6\)'):
    load_pretrained(path, num_classes=6)


def test_pretrained_refuses_to_overwrite(tmp_path):
  model = create_model('dtf_r50', **TINY_DTF)
  first = _random_variables(model, (1, 8, 32, 32, 3), 0)
  second = _random_variables(model, (1, 8, 32, 32, 3), 1)
  directory = str(tmp_path / 'ckpt')
  save_pretrained(directory, 'dtf_r50', TINY_DTF, first)
  with pytest.raises(FileExistsError, match='overwrite'):
    save_pretrained(directory, 'dtf_r50', TINY_DTF, second)
  _, kept = load_pretrained(directory)
  np.testing.assert_array_equal(kept['params']['head']['kernel'], first['params']['head']['kernel'])
  # A replacement that fails half way (here: an array that cannot be read) keeps the old copy.
  class Unreadable:
    shape, dtype = (3,), np.float32

    def __array__(self, *args, **kwargs):
      raise RuntimeError('disk full')
  broken = {'params': dict(second['params'], extra=Unreadable())}
  with pytest.raises(RuntimeError, match='disk full'):
    save_pretrained(directory, 'dtf_r50', TINY_DTF, broken, overwrite=True)
  _, kept = load_pretrained(directory)
  np.testing.assert_array_equal(kept['params']['head']['kernel'], first['params']['head']['kernel'])
  save_pretrained(directory, 'dtf_r50', TINY_DTF, second, overwrite=True)
  _, replaced = load_pretrained(directory)
  np.testing.assert_array_equal(replaced['params']['head']['kernel'],
                                second['params']['head']['kernel'])
  assert sorted(os.listdir(directory)) == ['meta.json', read_meta(directory)['variables']]


_KILLED_SAVE = r"""
import sys, time
import numpy as np
from dtf_jax import pretrained
target, source, point = sys.argv[1:4]
_, variables = pretrained.load_pretrained(source)
meta = pretrained.read_meta(source)

def stop(where):
  print(where, flush=True)
  time.sleep(600)  # the test kills the process here

if point == 'writing':  # orbax reads this array while writing variables.next
  class Slow:
    shape, dtype = (3,), np.float32
    def __array__(self, *args, **kwargs):
      stop('STOPPED')
  variables['params']['extra'] = Slow()
else:  # 'switched': meta.json names the new arrays, the old ones are not removed yet
  write_json = pretrained.storage.write_json
  def paused(*args, **kwargs):
    write_json(*args, **kwargs)
    stop('STOPPED')
  pretrained.storage.write_json = paused
pretrained.save_pretrained(target, meta['model'], meta['kwargs'], variables, overwrite=True)
"""


@pytest.mark.parametrize('point, kept', [('writing', 'first'), ('switched', 'second')])
def test_pretrained_overwrite_survives_kill_9(tmp_path, point, kept):
  # A real process replacing the weights is killed (SIGKILL) while writing the new arrays, and
  # just after meta.json switched to them: the directory loads the old copy, then the new one;
  # the next save cleans up.
  import signal  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  model = create_model('dtf_r50', **TINY_DTF)
  copies = {name: _random_variables(model, (1, 8, 32, 32, 3), seed)
            for seed, name in enumerate(('first', 'second', 'third'))}
  directory, source = str(tmp_path / 'ckpt'), str(tmp_path / 'source')
  save_pretrained(directory, 'dtf_r50', TINY_DTF, copies['first'])
  save_pretrained(source, 'dtf_r50', TINY_DTF, copies['second'])
  proc = subprocess.Popen([sys.executable, '-c', _KILLED_SAVE, directory, source, point],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    lines = []
    for line in proc.stdout:
      lines.append(line)
      if line.strip() == 'STOPPED':
        break
    assert lines and lines[-1].strip() == 'STOPPED', ''.join(lines)[-3000:]
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  _, loaded = load_pretrained(directory)
  np.testing.assert_array_equal(loaded['params']['head']['kernel'],
                                copies[kept]['params']['head']['kernel'])
  save_pretrained(directory, 'dtf_r50', TINY_DTF, copies['third'], overwrite=True)
  _, loaded = load_pretrained(directory)
  np.testing.assert_array_equal(loaded['params']['head']['kernel'],
                                copies['third']['params']['head']['kernel'])
  assert sorted(os.listdir(directory)) == ['meta.json', read_meta(directory)['variables']]


def test_meta_json_cannot_reach_outside_its_directory(tmp_path):
  model = create_model('dtf_r50', **TINY_DTF)
  variables = _random_variables(model, (1, 8, 32, 32, 3), 0)
  victim = save_pretrained(str(tmp_path / 'victim'), 'dtf_r50', TINY_DTF, variables)
  path = save_pretrained(str(tmp_path / 'user' / 'ckpt'), 'dtf_r50', TINY_DTF, variables)
  meta = json.loads(open(os.path.join(path, 'meta.json')).read())
  for name in ('../../victim/variables', '../victim', '/abs/variables', 'variables/../../x', '..'):
    with open(os.path.join(path, 'meta.json'), 'w') as f:
      json.dump(dict(meta, variables=name), f)
    with pytest.raises(pretrained.MetaError, match=rf'"variables" must name a variables\* '
                                                   rf'folder in {path}, not'):
      load_pretrained(path)
  assert os.path.exists(os.path.join(victim, 'variables'))


def test_load_pretrained_without_meta(tmp_path):
  (tmp_path / 'variables').mkdir()
  with pytest.raises(FileNotFoundError, match=r'meta\.json'):
    load_pretrained(str(tmp_path))

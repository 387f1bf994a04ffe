"""Compiling for TPU on this host (dtf_jax.tpu_target, the pod preflight, model tools' --target).

The ``tpu_compile`` group (``pytest -m tpu_compile``) compiles tiny DTF ResNet and DTF Swin train and eval steps for a v5e:2x2
mesh with fsdp 2, once per ``fa_impl``, with the TPU compiler (libtpu, the ``[tpu]`` extra of the
test install); where libtpu is missing those tests skip, saying so. The rest (target names, the
roofline, the HLO byte report, the preflight's search for a step that fits) needs no libtpu.
"""

import jax
import ml_collections
import numpy as np
import pytest

from configs import base, quickstart
from dtf_jax import tpu_target
from dtf_jax.layers import aggregation
from dtf_jax.layers import dtf
from dtf_jax.layers.dtf import DTFBlock
from dtf_jax.train import preflight
from dtf_jax.train.sharding import param_spec

NO_LIBTPU = tpu_target.libtpu_available()


def tpu_compile(test):
  """The ``tpu_compile`` group (``pytest -m tpu_compile``): skipped, saying why, without libtpu."""
  return pytest.mark.tpu_compile(pytest.mark.skipif(NO_LIBTPU is not None,
                                                    reason=str(NO_LIBTPU))(test))
TARGET = 'v5e:2x2'


# ---------------------------------------------------------------------------------------------
# Without libtpu.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('text,generation,topology,slices,chips', [
    ('v5e:2x2', 'v5e', (2, 2), 1, 4), ('v5e:16x16', 'v5e', (16, 16), 1, 256),
    ('v5p:4x4x4', 'v5p', (4, 4, 4), 1, 64), ('v4:2x2x1', 'v4', (2, 2, 1), 1, 4),
    ('v6e:8x8,slices=2', 'v6e', (8, 8), 2, 128)])
def test_parse_target(text, generation, topology, slices, chips):
  t = tpu_target.parse_target(text)
  assert (t.generation, t.topology, t.slices, t.num_chips) == (generation, topology, slices, chips)
  assert t.name == text


@pytest.mark.parametrize('text,match', [
    ('v5e', 'GENERATION:TOPOLOGY'), ('v7:2x2', 'GENERATION'), ('v5e:2x2x1', '2 dimensions'),
    ('v4:2x2', '3 dimensions'), ('v5e:0x2', '>= 1'), ('v5e:2x2,slices=0', '>= 1')])
def test_parse_target_errors(text, match):
  with pytest.raises(ValueError, match=match):
    tpu_target.parse_target(text)


def test_roofline_and_peak():
  chip = tpu_target.CHIPS['v5e']
  stats = tpu_target.CompiledStats(compile_s=1.0, flops=197e12, bytes_accessed=819e9 * 3,
                                   argument_bytes=10, temp_bytes=20, output_bytes=7, alias_bytes=5)
  assert stats.peak_bytes == 32
  assert stats.roofline_s(chip) == pytest.approx(3.0)  # memory-bound: 3 s of HBM traffic, 1 s of FLOPs
  stats.flops = 197e12 * 4
  assert stats.roofline_s(chip) == pytest.approx(4.0)


_HLO = '''HloModule m

%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]{1,0:T(8,128)}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,128]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %f = f32[8,128]{1,0:T(8,128)} fusion(%x), kind=kLoop, calls=%c
  ROOT %t = (s32[], f32[8,128]{1,0:T(8,128)}) tuple(%i, %f)
}

%cond (p: (s32[], f32[8,128])) -> pred[] {
  %p = (s32[], f32[8,128]{1,0:T(8,128)}) parameter(0)
  %n = s32[] constant(5)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: bf16[4,3,64]) -> f32[8,128] {
  %a = bf16[4,3,64]{2,1,0:T(8,128)(2,1)} parameter(0)
  %c = f32[4,3,64]{2,1,0:T(8,128)} convert(%a)
  %z = f32[8,128]{1,0:T(8,128)} broadcast(%c), dimensions={}
  %w = (s32[], f32[8,128]{1,0:T(8,128)}) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[8,128]{1,0:T(8,128)} get-tuple-element(%w), index=1
}
'''


def test_byte_movers_pads_tiles_and_counts_loop_trips():
  top, total = tpu_target.byte_movers(_HLO)
  found = {what: (moved, count) for moved, count, what in top}
  # bf16[4,3,64] tiled (16, 128): 4 x 16 x 128 x 2 bytes; f32[4,3,64] tiled (8, 128): 4 x 8 x 128 x 4.
  assert found['convert -> f32[4,3,64]'] == (4 * 16 * 128 * 2 + 4 * 8 * 128 * 4, 1)
  # The loop body's fusion reads and writes f32[8,128] (4 KiB each), 5 trips.
  assert found['fusion(kLoop) -> f32[8,128]'] == (5 * 2 * 8 * 128 * 4, 5)
  assert total == sum(moved for moved, _, _ in top)


def _fake_compile(peaks):
  """A ``preflight._compile`` whose steps have the peak ``peaks[(what, remat, accum)]``."""
  tried = []

  def fake(what, config, lower):
    del lower
    key = (what, config.model.remat, config.grad_accum_steps)
    tried.append(key)
    stats = tpu_target.CompiledStats(1.0, 1e12, 1e9, 0, peaks.get(key, 2 ** 40), 0, 0)
    return preflight.StepResult(what, config.model.remat, config.grad_accum_steps, stats)
  return fake, tried


def test_preflight_names_the_first_variant_that_fits(monkeypatch, capsys):
  """The search order (more remat first, then accumulation) and the exit code, without
  compiling: each step's peak is made up."""
  monkeypatch.setattr(tpu_target, 'target_devices', lambda target: jax.devices() * 4)
  monkeypatch.setattr(preflight, 'setup', lambda config, **_: config)
  monkeypatch.setattr(preflight, 'train_step_lowering', lambda s: None)
  monkeypatch.setattr(preflight, 'eval_step_lowering', lambda s: None)
  config = quickstart.get_config()
  gib = 2 ** 30
  fake, tried = _fake_compile({('eval', 'none', 1): gib, ('train', 'block', 2): 15 * gib})
  monkeypatch.setattr(preflight, '_compile', fake)
  assert preflight.preflight(config, TARGET) == 1
  assert tried == [('train', 'none', 1), ('eval', 'none', 1), ('train', 'dtf', 1),
                   ('train', 'block', 1), ('train', 'none', 2), ('train', 'dtf', 2),
                   ('train', 'block', 2)]
  out = capsys.readouterr().out
  assert 'it fits with --config.model.remat=block --config.grad_accum_steps=2' in out
  assert 'DOES NOT FIT' in out and '16.00 GiB' in out

  fake, tried = _fake_compile({('eval', 'none', 1): gib, ('train', 'none', 1): 15 * gib})
  monkeypatch.setattr(preflight, '_compile', fake)
  assert preflight.preflight(config, TARGET) == 0
  assert tried == [('train', 'none', 1), ('eval', 'none', 1)]
  assert 'both steps fit' in capsys.readouterr().out
  # Accumulation stops where the micro-batch no longer splits over the chips (32 / 4 < 16).
  assert [(c.model.remat, c.grad_accum_steps) for c in preflight.alternatives(config, 16)] == [
      ('dtf', 1), ('block', 1), ('none', 2), ('dtf', 2), ('block', 2)]


def test_compile_only_bad_target_is_one_line(tmp_path):
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, 'main.py', '--config=configs/quickstart.py',
                         '--compile_only=v9:2x2'], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "main.py: error: TPU target 'v9:2x2': expected GENERATION:TOPOLOGY[,slices=N] with "
      'GENERATION one of v4, v5e, v5p, v6e, e.g. v5e:2x2, v5e:16x16, v5p:4x4x4, '
      'v5e:16x16,slices=2']


# ---------------------------------------------------------------------------------------------
# With libtpu: the trainer's steps compiled for v5e:2x2, fsdp 2.
# ---------------------------------------------------------------------------------------------


def tiny_config(family: str, fa_impl: str, block_impl: str = 'auto') -> ml_collections.ConfigDict:
  """A tiny run: 4 frames of 32² (T = 4 in every DTF block), global batch 8 (2 per chip),
  bfloat16, fsdp 2; DTF ResNet with two stages of one bottleneck (both with DTF), or DTF Swin with
  one stage of two blocks (the unshifted one with DTF). Small, to keep compile times short."""
  if family == 'resnet':
    c = quickstart.get_config()
    c.model.update(stage_sizes=(1, 1), dtf_stages=(1, 2), width=16)
  else:
    c = base.swin_config('dtf_swin_t')
    c.model.update(embed_dim=32, depths=(2,), num_heads=(2,), window_size=4, early_stride=1)
    c.data.num_classes = 8
  c.model.fa_impl = fa_impl
  c.model.block_impl = block_impl
  c.compute_dtype = 'bfloat16'
  c.data.clip_length, c.data.size, c.data.eval_size = 4, 32, 32
  c.batch_size = c.eval_batch_size = 8
  c.mesh.fsdp = 2
  return c


def _state_bytes_per_chip(s, fsdp: int) -> int:
  """The train state's bytes on one chip, from its shapes and ``param_spec`` (not from XLA)."""
  total = 0
  for leaf in jax.tree.leaves(s.abstract_state):
    size = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    total += size // fsdp if param_spec(leaf.shape, fsdp) != jax.sharding.PartitionSpec() else size
  return total


_COMPILED = {}


def _compiled(family, fa_impl, block_impl):
  """``(setup, train StepResult, eval StepResult)``, compiled once per test session."""
  key = (family, fa_impl, block_impl)
  if key not in _COMPILED:
    config = tiny_config(family, fa_impl, block_impl)
    devices = tpu_target.target_devices(tpu_target.parse_target(TARGET))
    s = preflight.setup(config, with_train_data=False, devices=devices)
    train = preflight._compile('train', config, preflight.train_step_lowering(s))
    evaluation = preflight._compile('eval', config, preflight.eval_step_lowering(s))
    _COMPILED[key] = (s, train, evaluation)
  return _COMPILED[key]


@tpu_compile
def test_preflight_tiny_resnet(monkeypatch, capsys):
  """The preflight of the tiny run compiles both steps for v5e:2x2 and prints their figures per
  chip (the same as the compiled programs'), and passes. Its two programs are kept for
  :func:`test_train_and_eval_steps_compile_for_tpu_mesh`."""
  config = tiny_config('resnet', 'auto')
  results, compile_step = [], preflight._compile

  def recorded(*args):
    results.append(compile_step(*args))
    return results[-1]
  monkeypatch.setattr(preflight, '_compile', recorded)
  assert preflight.preflight(config, TARGET) == 0
  out = capsys.readouterr().out
  train, evaluation = results
  lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(('train', 'eval'))}
  assert f'{train.stats.bytes_accessed / 1e9:.2f} GB accessed' in lines['train']
  assert f'{evaluation.stats.bytes_accessed / 1e9:.2f} GB accessed' in lines['eval']
  assert 'of 16.00 GiB (fits)' in lines['train'] and 'both steps fit' in out
  devices = tpu_target.target_devices(tpu_target.parse_target(TARGET))
  _COMPILED[('resnet', 'auto', 'auto')] = (preflight.setup(config, with_train_data=False, devices=devices),
                                   train, evaluation)


@tpu_compile
@pytest.mark.parametrize('family', ['resnet', 'swin'])
@pytest.mark.parametrize('fa_impl,block_impl', [('auto', 'auto'), ('xla', 'parts'),
                                                ('pallas', 'parts')])
def test_train_and_eval_steps_compile_for_tpu_mesh(family, fa_impl, block_impl):
  """Each step compiles for 4 TPU v5e chips; the train step's arguments on a chip are the
  fsdp-sharded state and that chip's quarter of the batch, the state donated (aliased); the
  Pallas kernels are Mosaic kernels (not interpreted): 'auto' is the TPU's choice, the fused DTF
  block (forward and backward kernels), and with the block's parts, the Pallas aggregation where
  ``fa_impl`` chooses it."""
  s, train, evaluation = _compiled(family, fa_impl, block_impl)
  chip = tpu_target.CHIPS['v5e']
  for step in (train, evaluation):
    assert step.stats is not None and step.fits(chip), step.error
    assert step.stats.flops > 0 and step.stats.bytes_accessed > 0
  # TPU tiles pad small arrays: the logical bytes are a lower bound.
  sharded = _state_bytes_per_chip(s, 2)
  video = 2 * 4 * 32 * 32 * 3 * 4  # 2 clips per chip, float32
  assert sharded + video <= train.stats.argument_bytes
  assert sharded <= train.stats.alias_bytes <= train.stats.argument_bytes - video
  # The largest parameter is split over the 'fsdp' axis in the compiled program: half on a chip.
  state_shardings, _ = train.stats.compiled.input_shardings[0]
  leaves = jax.tree.leaves(s.abstract_state.params)
  shards = jax.tree.leaves(state_shardings.params)
  largest = max(range(len(leaves)), key=lambda i: leaves[i].size)
  shard_shape = shards[largest].shard_shape(leaves[largest].shape)
  assert np.prod(shard_shape) * 2 == leaves[largest].size, (leaves[largest].shape, shard_shape)
  train_hlo, eval_hlo = (step.stats.compiled.as_text() for step in (train, evaluation))
  if dtf.resolve_block_impl(block_impl, 'tpu') == 'fused':
    for kernel in ('dtf_block_moments', 'dtf_block_output', 'dtf_block_grad_moments',
                   'dtf_block_grad'):
      assert kernel in train_hlo, kernel
    assert 'dtf_block_output' in eval_hlo and 'dtf_block_moments' not in eval_hlo
    assert 'dtf_frame_wise_aggregation' not in train_hlo + eval_hlo
  else:
    chosen = aggregation.resolve_fa_impl(fa_impl, 'tpu')
    for hlo in (train_hlo, eval_hlo):
      assert 'dtf_block_' not in hlo
      assert ('dtf_frame_wise_aggregation' in hlo) == (chosen == 'pallas'), (fa_impl, chosen)


@tpu_compile
@pytest.mark.parametrize('axis_type,mesh_shape', [('explicit', (2, 2)), ('auto', (4, 1))])
def test_pallas_aggregation_compiles_per_shard_on_tpu_mesh(axis_type, mesh_shape):
  """The Pallas frame-wise aggregation, forward and gradient, compiled for v5e:2x2 on a
  ('data', 'fsdp') mesh: fsdp 2 with Explicit axes, fsdp 1 with Auto axes and the mesh set (as the
  trainer runs; its fsdp-2 steps are compiled above): a Mosaic kernel on each chip's videos, no
  all-gather of the batch."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  devices = tpu_target.target_devices(tpu_target.parse_target(TARGET))
  kind = AxisType.Explicit if axis_type == 'explicit' else AxisType.Auto
  mesh = jax.make_mesh(mesh_shape, ('data', 'fsdp'), axis_types=(kind, kind), devices=devices)
  x = jax.ShapeDtypeStruct((8, 4, 16, 16, 32), jax.numpy.bfloat16,
                           sharding=NamedSharding(mesh, P(('data', 'fsdp'))))

  def loss(v):
    out, corr = aggregation.frame_wise_aggregation(v, 3, 'pallas')
    return jax.numpy.sum(out.astype('float32') ** 2) + jax.numpy.sum(corr)
  with jax.set_mesh(mesh):
    hlo = ''.join(jax.jit(f).lower(x).compile().as_text()
                  for f in (lambda v: aggregation.frame_wise_aggregation(v, 3, 'pallas'),
                            jax.grad(loss)))
  assert hlo.count('tpu_custom_call') >= 2  # the forward and the backward kernel
  assert 'all-gather' not in hlo


@tpu_compile
@pytest.mark.parametrize('axis_type,mesh_shape', [('explicit', (2, 2)), ('auto', (4, 1))])
def test_fused_dtf_block_compiles_per_shard_on_tpu_mesh(axis_type, mesh_shape):
  """The fused DTF block's training step (statistics and output kernels, then the gradient's two)
  compiled for v5e:2x2 on the meshes above: Mosaic kernels on each chip's videos, the batch never
  gathered (the statistics and the weights' gradients are summed across chips: all-reduces)."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  devices = tpu_target.target_devices(tpu_target.parse_target(TARGET))
  kind = AxisType.Explicit if axis_type == 'explicit' else AxisType.Auto
  mesh = jax.make_mesh(mesh_shape, ('data', 'fsdp'), axis_types=(kind, kind), devices=devices)
  block = DTFBlock(dtype=jax.numpy.bfloat16, block_impl='fused')
  x = jax.ShapeDtypeStruct((8, 4, 16, 16, 32), jax.numpy.bfloat16,
                           sharding=NamedSharding(mesh, P(('data', 'fsdp'))))
  variables = jax.eval_shape(block.init, jax.random.PRNGKey(0), x)
  variables = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())),
      variables)
  def loss(v, x):
    out, _ = block.apply(v, x, train=True, mutable=['batch_stats'])
    return jax.numpy.sum(out.astype('float32') ** 2)
  with jax.set_mesh(mesh):
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables, x).compile().as_text()
  for kernel in ('dtf_block_moments', 'dtf_block_output', 'dtf_block_grad_moments',
                 'dtf_block_grad'):
    assert kernel in hlo, kernel
  assert 'all-gather' not in hlo

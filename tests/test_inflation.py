"""ImageNet -> video inflation: torchvision ResNets and timm / official-layout Swin into the C2D and
DTF models, file formats, and the convert_torch command line.

The key names and shapes come from the real libraries (torchvision, timm) with random weights.
Inflation must keep the 2D network: a clip of identical frames through the inflated model gives
the 2D network's logits on that frame (DTF blocks start as the identity, the stem / patch
embedding sums to the 2D kernel over time). Everything is float32.
"""

import hashlib
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dtf_jax import convert
from dtf_jax.convert.official import NEW_DTF, NEW_HEAD
from dtf_jax.models import create_model
from dtf_jax.pretrained import load_pretrained, read_meta
from dtf_jax.tools import convert_torch


def _import_vision_libraries():
  """torchvision and timm with the CPU torch wheel: the PyPI torchvision is built for CUDA torch
  and registers its C ops against schemas that the CPU build lacks; declaring them first lets it
  import (the models used here need no C op)."""
  if 'torchvision' not in sys.modules:
    lib = torch.library.Library('torchvision', 'DEF')  # pylint: disable=unused-variable
    lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    _import_vision_libraries.lib = lib  # keep the registration alive
  import timm  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel
  return torchvision, timm


torchvision, timm = _import_vision_libraries()
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

# Identical-frame logits: max |jax - torch| < TOL * max |torch logits|.
TOL = 1e-4
CLIP = 8          # frames; early_stride 4 -> 2 time steps in the DTF blocks
RESNET_SIZE = 64  # frames of the ResNet tests (any size works for a ResNet)

_apply = jax.jit(lambda model, v, x: model.apply(v, x, train=False), static_argnums=0)


def _identical_frames(frame):
  """torch ``1 3 H W`` frame -> jax ``1 CLIP H W 3`` clip of that frame."""
  return jnp.asarray(np.repeat(frame.numpy().transpose(0, 2, 3, 1)[:, None], CLIP, axis=1))


def _check_logits(name, got, want):
  got, want = np.asarray(got), want.numpy()
  diff = np.abs(got - want).max()
  scale = np.abs(want).max()
  print(f'{name}: max |logit diff| {diff:.3g}, max |logit| {scale:.3g} (relative '
        f'{diff / scale:.2g})')
  assert want.std() > 0.1  # logits that differ between classes: the comparison means something
  assert diff < TOL * scale, (diff, scale)
  return diff / scale


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_trees_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# torchvision ResNet


def _calibrated_resnet(depth: int, seed: int):
  """A torchvision ResNet with random weights, random BN affine parameters and BN statistics
  measured on random images (so activations stay O(1) through the network), in eval mode."""
  torch.manual_seed(seed)
  net = getattr(torchvision.models, f'resnet{depth}')(weights=None)
  for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.momentum = None  # cumulative average over the calibration pass
      m.reset_running_stats()
      with torch.no_grad():
        m.weight.uniform_(0.7, 1.3)
        m.bias.normal_(0.0, 0.1)
  net.train()
  with torch.no_grad():
    net(torch.randn(8, 3, RESNET_SIZE, RESNET_SIZE))
  return net.eval()


@pytest.fixture(scope='module')
def resnet50():
  net = _calibrated_resnet(50, seed=0)
  frame = torch.randn(1, 3, RESNET_SIZE, RESNET_SIZE, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    logits = net(frame)
  return {k: v.detach().clone() for k, v in net.state_dict().items()}, frame, logits


@pytest.mark.parametrize('name', ['c2d_r50', 'dtf_r50'])
def test_resnet50_inflation_keeps_the_2d_network(resnet50, name):
  sd, frame, want = resnet50
  model = create_model(name, num_classes=1000, clip_length=CLIP, dropout_rate=0.0)
  for stem in ('center', 'average'):
    variables, report = convert.convert_with_report(
        name, sd, num_classes=1000, clip_length=CLIP, source='imagenet_resnet', stem_init=stem,
        keep_head=True)
    _check_logits(f'{name} ({stem})', _apply(model, variables, _identical_frames(frame)), want)
    kernel = np.asarray(variables['params']['stem_conv']['kernel'])  # T kh kw I O
    torch_kernel = sd['conv1.weight'].numpy().transpose(2, 3, 1, 0)
    if stem == 'center':
      np.testing.assert_array_equal(kernel[2], torch_kernel)
      assert not kernel[[0, 1, 3]].any()
    else:
      np.testing.assert_allclose(kernel, np.broadcast_to(torch_kernel / 4, kernel.shape),
                                 rtol=1e-6)
    assert report.source == 'imagenet_resnet' and report.layout == 'torchvision'
    assert len(report.loaded) == sum(not k.endswith('num_batches_tracked') for k in sd)
    assert report.ignored_keys('BN step counter')
    dtf = [t for t, _, why in report.initialised if why == NEW_DTF]
    assert len(report.initialised) == len(dtf)  # the head was kept
    assert bool(dtf) == (name == 'dtf_r50')
  if name == 'dtf_r50':  # DTF blocks start as the identity: alpha 0
    assert not np.asarray(variables['params']['stage3_block2']['temporal']['alpha']).any()


def test_resnet_head_dropped_and_wrong_model_reported_key_by_key(resnet50):
  sd, _, _ = resnet50
  model = create_model('dtf_r50', num_classes=400, clip_length=16)
  loaded, report = convert.map_state_dict(model, sd, source='auto')
  assert report.source == 'imagenet_resnet'
  assert 'head/kernel' not in loaded['params']
  assert ('params/head/kernel', (2048, 400), NEW_HEAD) in report.initialised
  assert ('fc.weight', (1000, 2048), 'ImageNet-1K head (1000 classes) dropped: the model gets a '
          'new one') in report.ignored
  # --keep-head with another class count: the key and both shapes.
  with pytest.raises(convert.ConversionError, match=r'fc.weight: shape \(1000, 2048\), the model '
                     r'needs \(400, 2048\)'):
    convert.map_state_dict(model, sd, keep_head=True)
  # A ResNet-101 file into a ResNet-50: every extra block named.
  r101 = {k: v for k, v in torchvision.models.resnet101(weights=None).state_dict().items()}
  with pytest.raises(convert.ConversionError) as info:
    convert.map_state_dict(model, r101)
  message = str(info.value)
  assert f'{17 * 15} unexpected' in message  # layer3.6 .. 22: 3 convs and 3 x 4 BN tensors
  assert 'layer3.22.conv3.weight (1024, 256, 1, 1)' in message
  # A ResNet file into a Swin, and the wrong --source.
  with pytest.raises(convert.ConversionError, match='is a resnet checkpoint .* the model is a swin'):
    convert.map_state_dict(create_model('dtf_swin_t', num_classes=400, clip_length=8), sd)
  with pytest.raises(convert.ConversionError, match="source='dtf', but the file is a resnet "
                     "checkpoint of source 'imagenet_resnet'"):
    convert.map_state_dict(model, sd, source='dtf')


def test_resnet101_converts_completely():
  sd = torchvision.models.resnet101(weights=None).state_dict()
  model = create_model('dtf_r101', num_classes=400, clip_length=16)
  loaded, report = convert.map_state_dict(model, sd, source='imagenet_resnet')
  assert len(report.loaded) == sum(not k.endswith(('num_batches_tracked', 'fc.weight', 'fc.bias'))
                                   for k in sd)
  assert len(loaded['params']) + len(loaded['batch_stats']) == len(report.loaded)
  # 33 bottlenecks with a DTF block, 4 params + 2 statistics each, and the new head.
  assert len([1 for _, _, why in report.initialised if why == NEW_DTF]) == 33 * 6
  np.testing.assert_array_equal(loaded['params']['stage3_block22/conv2/kernel'][0],
                                sd['layer3.22.conv2.weight'].numpy().transpose(2, 3, 1, 0))


# ---------------------------------------------------------------------------------------------
# Swin (timm and official layouts)


def _randomised_swin(seed: int, **kwargs):
  """A timm Swin with random weights and non-trivial norms and biases, in eval mode."""
  torch.manual_seed(seed)
  net = timm.models.swin_transformer.SwinTransformer(**kwargs).eval()
  with torch.no_grad():
    for _, p in net.named_parameters():
      if p.ndim == 1:
        p.add_(torch.randn_like(p) * 0.1)
  return net


def _official_layout(net):
  """The timm model's state dict in the official Swin-Transformer layout: downsample at the end
  of a stage, ``head`` for ``head.fc``, the buffers stored, wrapped in ``{'model': ...}``."""
  out = {}
  for key, value in net.state_dict().items():
    key = re.sub(r'^layers\.(\d+)\.downsample\.',
                 lambda m: f'layers.{int(m.group(1)) - 1}.downsample.', key)
    out[key.replace('head.fc.', 'head.')] = value.detach().clone()
  for name, buffer in net.named_buffers():
    if name.endswith(('relative_position_index', 'attn_mask')) and buffer is not None:
      out[name] = buffer.clone()
  return {'model': out}


@pytest.fixture(scope='module')
def swin_tiny():
  net = _randomised_swin(0, img_size=224, window_size=7, embed_dim=96, depths=(2, 2, 6, 2),
                         num_heads=(3, 6, 12, 24))
  frame = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    logits = net(frame)
  return net, frame, logits


@pytest.mark.parametrize('name', ['c2d_swin_t', 'dtf_swin_t'])
def test_swin_inflation_keeps_the_2d_network(swin_tiny, name):
  net, frame, want = swin_tiny
  timm_sd = net.state_dict()
  official_sd = _official_layout(net)
  assert any(k.endswith('attn_mask') for k in official_sd['model'])
  model = create_model(name, num_classes=1000, clip_length=CLIP, patch_norm=True,
                       drop_path_rate=0.0)
  for stem in ('center', 'average'):
    variables, report = convert.convert_with_report(
        name, timm_sd, num_classes=1000, clip_length=CLIP, source='imagenet_swin',
        stem_init=stem, keep_head=True, drop_path_rate=0.0)
    assert report.layout == 'timm' and not report.ignored
    _check_logits(f'{name} ({stem})', _apply(model, variables, _identical_frames(frame)), want)
    # The official layout gives the same variables; its buffers are verified, not loaded.
    official, official_report = convert.convert_with_report(
        name, official_sd, num_classes=1000, clip_length=CLIP, source='auto', stem_init=stem,
        keep_head=True, drop_path_rate=0.0)
    assert official_report.layout == 'official'
    _assert_trees_equal(official, variables)
    reasons = {why for _, _, why in official_report.ignored}
    assert reasons == {'buffer the model computes (verified equal)'}, reasons
    # The verification is real: a corrupted buffer is an error.
    bad = {'model': dict(official_sd['model'])}
    bad['model']['layers.0.blocks.1.attn_mask'] = bad['model']['layers.0.blocks.1.attn_mask'] + 1
    with pytest.raises(convert.ConversionError, match='layers.0.blocks.1.attn_mask: differs'):
      convert.map_state_dict(model, bad, source='imagenet_swin')


def test_swin_patch_norm_drop_is_reported(swin_tiny):
  net, _, _ = swin_tiny
  sd = net.state_dict()
  model = create_model('dtf_swin_t', num_classes=400, clip_length=CLIP)  # patch_norm=False
  loaded, report = convert.map_state_dict(model, sd)
  assert not any(p.startswith('patch_embed_norm') for p in loaded['params'])
  dropped = report.ignored_keys('patch-embedding norm dropped')
  assert sorted(dropped) == ['patch_embed.norm.bias', 'patch_embed.norm.weight']
  _, kept = convert.map_state_dict(create_model('dtf_swin_t', num_classes=400, clip_length=CLIP,
                                                patch_norm=True), sd)
  assert not kept.ignored_keys('patch-embedding norm')
  assert any(n.startswith('patch-embedding norm loaded') for n in kept.notes)
  assert 'patch-embedding norm dropped (patch_norm=False)' in report.notes
  assert ('head.fc.weight', (1000, 768), 'ImageNet-1K head (1000 classes) dropped: the model '
          'gets a new one') in kept.ignored
  # A model with a patch norm needs one in the file.
  no_norm = {k: v for k, v in sd.items() if not k.startswith('patch_embed.norm')}
  with pytest.raises(convert.ConversionError, match='patch_embed.norm.weight'):
    convert.map_state_dict(create_model('dtf_swin_t', num_classes=400, clip_length=CLIP,
                                        patch_norm=True), no_norm)


def _torch_resize_table(table, window):
  """Bicubic resize of a relative position bias table as the Swin repository loads it."""
  rows, heads = table.shape
  side = int(rows ** 0.5)
  maps = table.permute(1, 0).reshape(1, heads, side, side)
  out = F.interpolate(maps, size=(2 * window - 1, 2 * window - 1), mode='bicubic',
                      align_corners=False)
  return out.reshape(heads, -1).permute(1, 0).numpy()


@pytest.fixture(scope='module')
def swin_window12():
  """A small Swin at 384², window 12 (like swin_*_patch4_window12_384), random weights."""
  net = _randomised_swin(5, img_size=384, window_size=12, embed_dim=32, depths=(2, 2, 2, 2),
                         num_heads=(1, 2, 4, 8))
  return net


def test_window_interpolation_matches_torch_bicubic(swin_window12):
  sd = _official_layout(swin_window12)
  model = create_model('c2d_swin_t', num_classes=400, clip_length=CLIP, image_size=224,
                       window_size=7, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                       patch_norm=True)
  loaded, report = convert.map_state_dict(model, sd)
  assert 'relative position bias tables resized bicubically from window 12 to 7' in report.notes
  for s, heads in zip(range(4), (1, 2, 4, 8)):
    for b in range(2):
      table = sd['model'][f'layers.{s}.blocks.{b}.attn.relative_position_bias_table']
      assert tuple(table.shape) == (23 * 23, heads)
      got = loaded['params'][f'stage{s + 1}_block{b}/attn/relative_position_bias_table']
      np.testing.assert_allclose(got, _torch_resize_table(table, 7), rtol=1e-5, atol=1e-6)
  # The 384² buffers do not fit 224² windows: ignored, the model computes its own.
  recomputed = [k for k, _, why in report.ignored if why.startswith('buffer recomputed')]
  assert len(recomputed) == 8 + 3  # every relative_position_index, the shifted blocks' masks
  assert sorted(set(k for k, *_ in report.ignored) - set(recomputed)) == ['head.bias', 'head.weight']


def test_safetensors_and_pth_give_the_same_variables(swin_window12, tmp_path):
  import safetensors.torch  # pylint: disable=import-outside-toplevel
  sd = swin_window12.state_dict()
  safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()},
                              str(tmp_path / 'model.safetensors'))
  torch.save({'model': sd}, tmp_path / 'model.pth')
  from_safetensors = convert.read_state_dict(str(tmp_path / 'model.safetensors'))
  from_pth = convert.read_state_dict(str(tmp_path / 'model.pth'))
  assert sorted(from_safetensors) == sorted(from_pth) == sorted(sd)
  for k, v in from_pth.items():
    np.testing.assert_array_equal(v, from_safetensors[k], err_msg=k)
    np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)
  kwargs = dict(num_classes=400, clip_length=CLIP, image_size=384, window_size=12, embed_dim=32,
                depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
  a = convert.convert_state_dict('c2d_swin_t', from_pth, source='imagenet_swin', **kwargs)
  b = convert.convert_state_dict('c2d_swin_t', from_safetensors, source='imagenet_swin', **kwargs)
  _assert_trees_equal(a, b)


class _Payload:
  """Unpickling this would create a file: what a malicious checkpoint could do instead."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_malicious_pickle_is_refused_and_nothing_runs(swin_window12, tmp_path):
  marker = str(tmp_path / 'code_ran')
  src = tmp_path / 'evil.pth'
  torch.save({'model': swin_window12.state_dict(), 'extra': _Payload(marker)}, src)
  with pytest.raises(convert.CheckpointReadError, match='weights-only'):
    convert.read_state_dict(str(src))
  assert not os.path.exists(marker)
  with pytest.raises(SystemExit) as info:
    convert_torch.main(['--source', 'imagenet_swin', '--model', 'c2d_swin_t', '--clip-length',
                        '8', '--num-classes', '4', '--input', str(src), '--output',
                        str(tmp_path / 'out')])
  assert 'weights-only' in str(info.value.code) and str(src) in str(info.value.code)
  assert not os.path.exists(marker) and not os.path.exists(tmp_path / 'out')
  # The file really carries code: an unrestricted load would have run it.
  torch.load(src, weights_only=False)
  assert os.path.exists(marker)


def test_unknown_layout_is_an_error_saying_what_was_found():
  with pytest.raises(ValueError, match=r'unknown checkpoint layout \(2 tensors, e.g. '
                     r'backbone.weight \(3, 3\), classifier.bias \(5,\)\)'):
    convert.detect_source({'backbone.weight': (3, 3), 'classifier.bias': (5,)})
  with pytest.raises(ValueError, match='ambiguous'):
    convert.detect_source({'conv1.weight': (64, 3, 7, 7), 'patch_embed.proj.weight': (96, 3, 4, 4),
                           'layer1.0.conv1.weight': (64, 64, 1, 1)})


# ---------------------------------------------------------------------------------------------
# convert_torch


def test_convert_cli_imagenet_resnet(resnet50, tmp_path, capsys):
  import safetensors.torch  # pylint: disable=import-outside-toplevel
  sd, frame, want = resnet50
  src = tmp_path / 'resnet50.safetensors'
  safetensors.torch.save_file(sd, str(src))
  labels = tmp_path / 'classes.txt'
  labels.write_text('\n'.join(f'class {i}' for i in range(1000)))
  out = tmp_path / 'c2d_r50'
  convert_torch.main(['--source', 'auto', '--model', 'c2d_r50', '--clip-length', str(CLIP),
                      '--num-classes', '1000', '--input', str(src), '--output', str(out),
                      '--stem-init', 'average', '--keep-head', '--class-names', str(labels),
                      '--model-arg', 'dropout_rate=0.0'])
  printed = capsys.readouterr().out
  assert 'imagenet_resnet checkpoint (torchvision layout): 267 arrays loaded' in printed
  assert 'conv1.weight (64, 3, 7, 7) -> params/stem_conv/kernel (4, 7, 7, 3, 64)' in printed
  assert 'bn1.num_batches_tracked (): BN step counter' in printed
  meta = read_meta(str(out))
  assert meta['source']['kind'] == 'imagenet_resnet'
  assert meta['source']['stem_init'] == 'average' and meta['source']['keep_head'] is True
  assert meta['source']['sha256'] == hashlib.sha256(src.read_bytes()).hexdigest()
  assert meta['class_names'][:2] == ['class 0', 'class 1'] and len(meta['class_names']) == 1000
  model, variables = load_pretrained(str(out))
  _check_logits('c2d_r50 via convert_torch', _apply(model, variables, _identical_frames(frame)),
                want)
  with open(out / 'meta.json') as f:
    assert json.load(f)['kwargs']['dropout_rate'] == 0.0

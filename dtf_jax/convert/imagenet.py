"""ImageNet checkpoints for inflation: layout detection, key names, stem inflation, window resizing.

Layouts (PyTorch key names) understood, besides the official DTF one (``official.py``):

  torchvision ResNet   ``conv1``, ``bn1``, ``layerN.M.conv1..3`` / ``bn1..3``, ``downsample.0/1``,
                       ``fc``; 2D kernels ``O I kh kw``. The names are those of the official
                       C2D/DTF-ResNet, whose kernels carry a time axis.
  Swin, official       ``{'model': ...}``, ``patch_embed.proj`` / ``.norm``, ``layers.i.blocks.j``,
                       ``layers.i.downsample`` at the END of stage ``i``, ``norm``, ``head``;
                       buffers ``relative_position_index`` and ``attn_mask`` stored.
  Swin, timm           ``layers.i.downsample`` at the START of stage ``i`` (stages 1..3),
                       ``head.fc``; no buffers stored.

Every function here maps names or numpy arrays; nothing needs PyTorch.
"""

import re
from typing import Dict, Mapping, Tuple

import einops
import numpy as np

SOURCES = ('dtf', 'imagenet_resnet', 'imagenet_swin')
STEM_INITS = ('center', 'average')


def detect_source(shapes: Mapping[str, Tuple[int, ...]]) -> Tuple[str, str, str]:
  """Key names and shapes of a state dict -> ``(source, family, layout)``.

  ``source`` in :data:`SOURCES`; ``family`` ``'resnet'`` or ``'swin'``; ``layout`` ``'official'``,
  ``'torchvision'`` or ``'timm'``. Raises ``ValueError`` saying what was found when the layout is
  unknown or ambiguous."""
  keys = set(shapes)
  resnet_stem = shapes.get('conv1.weight')
  swin_embed = shapes.get('patch_embed.proj.weight')
  dtf_keys = sorted(k for k in keys if '.dtf_blk.' in k or '.dtf_block.' in k)
  if resnet_stem is not None and swin_embed is not None:
    raise ValueError('ambiguous checkpoint: it has both a ResNet stem (conv1.weight) and a Swin '
                     'patch embedding (patch_embed.proj.weight)')
  if resnet_stem is not None and any(k.startswith('layer1.') for k in keys):
    if len(resnet_stem) == 5 or dtf_keys:
      return 'dtf', 'resnet', 'official'
    if len(resnet_stem) == 4:
      return 'imagenet_resnet', 'resnet', 'torchvision'
  if swin_embed is not None and any(k.startswith('layers.0.blocks.') for k in keys):
    if len(swin_embed) == 5 or dtf_keys:
      return 'dtf', 'swin', 'official'
    if len(swin_embed) == 4:
      official = 'layers.0.downsample.reduction.weight' in keys or 'head.weight' in keys
      return 'imagenet_swin', 'swin', 'official' if official else 'timm'
  examples = ', '.join(f'{k} {tuple(shapes[k])}' for k in sorted(keys)[:6])
  raise ValueError(
      f'unknown checkpoint layout ({len(keys)} tensors, e.g. {examples}); expected a torchvision '
      f'ResNet (conv1.weight 4-D, layer1.0.conv1.weight, ...), an ImageNet Swin (official or timm: '
      f'patch_embed.proj.weight 4-D, layers.0.blocks.0...) or an official DTF/C2D checkpoint '
      f'(5-D stem, dtf_blk / dtf_block tensors)')


def to_official_name(key: str, layout: str) -> str:
  """An ImageNet Swin key -> the official DTF-Swin name (``fc`` head, downsample at stage end).
  torchvision ResNet names are already the official ones."""
  if layout == 'timm':
    key = re.sub(r'^layers\.(\d+)\.downsample\.',
                 lambda m: f'layers.{int(m.group(1)) - 1}.downsample.', key)
    return re.sub(r'^head\.fc\.', 'fc.', key)
  return re.sub(r'^head\.', 'fc.', key) if layout == 'official' else key


def from_official_name(key: str, layout: str, family: str) -> str:
  """Inverse of :func:`to_official_name`, to name a missing tensor the way the file would."""
  if family != 'swin' or layout not in ('official', 'timm'):
    return key
  if layout == 'timm':
    key = re.sub(r'^layers\.(\d+)\.downsample\.',
                 lambda m: f'layers.{int(m.group(1)) + 1}.downsample.', key)
    return re.sub(r'^fc\.', 'head.fc.', key)
  return re.sub(r'^fc\.', 'head.', key)


def inflate_kernel(kernel: np.ndarray, time: int, mode: str) -> np.ndarray:
  """2D kernel ``O I kh kw`` -> ``O I time kh kw``.

  ``center``: the 2D kernel at time index ``time // 2``, zeros elsewhere (the released code);
  ``average``: the 2D kernel / ``time`` at every index (I3D). Either way a clip of identical
  frames gives the 2D response."""
  if mode not in STEM_INITS:
    raise ValueError(f'stem init must be one of {STEM_INITS}, got {mode!r}')
  out = np.zeros(kernel.shape[:2] + (time,) + kernel.shape[2:], np.float32)
  if mode == 'center':
    out[:, :, time // 2] = kernel
  else:
    out[:] = kernel[:, :, None] / time
  return out


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 for fraction ``t``."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """``size_out x size_in`` matrix of 1-D bicubic resampling, as PyTorch's
  ``interpolate(mode='bicubic', align_corners=False)`` (a = -0.75, edge taps clamped)."""
  src = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
  base = np.floor(src).astype(np.int64)
  weights = _cubic_weights(src - base)
  matrix = np.zeros((size_out, size_in), np.float64)
  for tap in range(4):
    np.add.at(matrix, (np.arange(size_out), np.clip(base + tap - 1, 0, size_in - 1)),
              weights[:, tap])
  return matrix


def resize_relative_position_table(table: np.ndarray, rows: int) -> np.ndarray:
  """Swin relative position bias table ``((2w-1)^2, heads)`` -> ``(rows, heads)`` for another
  window, by bicubic interpolation of each head's ``(2w-1) x (2w-1)`` map (as the Swin and timm
  repositories load checkpoints of other windows)."""
  side_in, side_out = int(round(table.shape[0] ** 0.5)), int(round(rows ** 0.5))
  if side_in ** 2 != table.shape[0] or side_out ** 2 != rows:
    raise ValueError(f'relative position tables must be square maps, got {table.shape[0]} -> '
                     f'{rows} rows')
  matrix = bicubic_matrix(side_in, side_out)
  maps = einops.rearrange(table, '(i j) h -> h i j', i=side_in).astype(np.float64)
  resized = np.einsum('oi,hij,pj->hop', matrix, maps, matrix)
  return einops.rearrange(resized, 'h o p -> (o p) h').astype(np.float32)


def window_of_table(rows: int) -> int:
  """Window size ``w`` of a ``((2w-1)^2, heads)`` table."""
  return (int(round(rows ** 0.5)) + 1) // 2


def head_description(num_classes: int) -> str:
  """'ImageNet-1K head (1000 classes)' and the like, for reports."""
  names: Dict[int, str] = {1000: 'ImageNet-1K', 21841: 'ImageNet-22K', 21843: 'ImageNet-22K'}
  return f'{names.get(num_classes, "ImageNet")} head ({num_classes} classes)'

"""C2D ResNet (ResNet-50/101 v1.5 on frames) with a pluggable temporal module: DTF-Net.

Every convolution is spatial (``1 x k x k``) except the stem, whose ``[early_stride, 7, 7]`` kernel
with the same time stride folds ``early_stride`` frames into one time step. The temporal module
(the DTF block for DTF-Net) sits right after the ``1 x 3 x 3`` conv of every bottleneck of the
stages in ``dtf_stages``. Input ``B T H W 3`` float, output logits ``B num_classes`` (float32).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dtf_jax.layers.conv import FrameConv
from dtf_jax.layers.norm import BatchNorm
from dtf_jax.models.common import (DropPath, ModelArgumentError, check_remat, check_video,
                                   make_temporal_remat, nan_where_not_finite, remat_class)

# Kaiming normal, fan_out, as the official models initialise their convolutions.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class Bottleneck(nn.Module):
  """1x1 -> 1x3x3 (stride) -> [temporal] -> 1x1, with a projection shortcut when shapes change.

  ``B T H W C_in -> B T H/s W/s 4*planes``.
  """
  planes: int
  stride: int
  temporal: str
  drop_path_rate: float
  dtype: Any
  fa_impl: str = 'auto'
  spectral_impl: str = 'auto'
  block_impl: str = 'auto'
  remat: str = 'none'  # 'dtf': the temporal module is rematerialised (see ResNet)

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, k, s, name: FrameConv(  # noqa: E731
        f, (1, k, k), (1, s, s), padding=((k // 2, k // 2), (k // 2, k // 2)),
        kernel_init=conv_init, dtype=self.dtype, name=name)
    norm = lambda name, **kw: BatchNorm(dtype=self.dtype, name=name, **kw)  # noqa: E731

    out = nn.relu(norm('bn1')(conv(self.planes, 1, 1, 'conv1')(x), train))
    out = conv(self.planes, 3, self.stride, 'conv2')(out)
    temporal = make_temporal_remat(self.temporal, self.remat, dtype=self.dtype, name='temporal',
                                   fa_impl=self.fa_impl, spectral_impl=self.spectral_impl,
                                   block_impl=self.block_impl)
    if temporal is not None:
      out = temporal(out, train)
    out = nn.relu(norm('bn2')(out, train))
    out = norm('bn3')(conv(self.planes * 4, 1, 1, 'conv3')(out), train)
    out = DropPath(self.drop_path_rate)(out, train)

    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.planes * 4:
      shortcut = conv(self.planes * 4, 1, self.stride, 'downsample_conv')(x)
      shortcut = norm('downsample_bn')(shortcut, train)
    return nn.relu(out + shortcut)


class ResNet(nn.Module):
  """C2D / DTF ResNet.  ``B T H W 3 -> B num_classes``.

  Attributes:
    stage_sizes: bottlenecks per stage, ``(3, 4, 6, 3)`` for ResNet-50, ``(3, 4, 23, 3)`` for 101.
    num_classes: classifier outputs.
    clip_length: input frames ``T``; the temporal module sees ``T // early_stride`` steps.
    early_stride: time kernel and stride of the stem.
    temporal: temporal module name (``'dtf'``, ``'none'`` for C2D, or a baseline or ablation of
      ``dtf_jax.layers.temporal.TEMPORAL_MODULES``).
    dtf_stages: stages (1-4) whose bottlenecks carry the temporal module (whichever it is).
    width: channels of the stem and of stage 1 (64 for the real models; smaller for tests).
    dropout_rate: dropout before the classifier.
    drop_path_rate: stochastic depth, linearly increasing over blocks (0 in the official models).
    dtype: compute dtype (parameters stay float32).
    fa_impl: implementation of the DTF block's frame-wise aggregation (``'auto'``, ``'scan'``,
      ``'xla'``, ``'pallas'``; see ``dtf_jax.layers.aggregation``); the same values in each.
    spectral_impl: implementation of the DTF block's time DFTs (``'auto'``, ``'direct'``,
      ``'matmul'``, ``'fft'``; see ``dtf_jax.layers.spectral``); the same values in each.
    block_impl: how the DTF block runs (``'auto'``, ``'parts'``, ``'fused'``: Pallas TPU kernels,
      forward and backward; see ``dtf_jax.layers.dtf.BLOCK_IMPLS``); the same values in each.
    remat: what the backward pass recomputes instead of keeping from the forward pass
      (``dtf_jax.models.common.REMAT_OPTIONS``): ``'none'``, ``'block'`` (each bottleneck) or
      ``'dtf'`` (each temporal module). Same values, gradients and variable names in each.
  """
  stage_sizes: Sequence[int]
  num_classes: int
  clip_length: int
  early_stride: int = 4
  temporal: str = 'dtf'
  dtf_stages: Sequence[int] = (1, 2, 3, 4)
  width: int = 64
  dropout_rate: float = 0.5
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  fa_impl: str = 'auto'
  spectral_impl: str = 'auto'
  block_impl: str = 'auto'
  remat: str = 'none'

  @nn.compact
  def __call__(self, video, train: bool = False, features: bool = False):
    """``video B T H W 3`` -> logits ``B num_classes`` (float32), or with ``features=True`` the
    pooled feature ``B D`` (float32) that the head maps to the logits (before dropout).

    Initialise with ``features=False``: ``features=True`` does not create the head.
    """
    check_video(video, model=type(self).__name__, clip_length=self.clip_length,
                early_stride=self.early_stride)
    check_remat(self.remat, type(self).__name__)
    if min(video.shape[2:4]) < 32:
      raise ModelArgumentError(
          f'ResNet: frames must be at least 32x32 (total stride 32), got '
          f'{video.shape[2]}x{video.shape[3]}.')
    bad_stages = [s for s in self.dtf_stages if s not in range(1, len(self.stage_sizes) + 1)]
    if bad_stages:
      raise ModelArgumentError(
          f'ResNet: dtf_stages {tuple(self.dtf_stages)} must be in 1..'
          f'{len(self.stage_sizes)}.')

    x = video.astype(self.dtype)
    x = FrameConv(self.width, (self.early_stride, 7, 7), (self.early_stride, 2, 2),
                  padding=((3, 3), (3, 3)), kernel_init=conv_init, dtype=self.dtype,
                  name='stem_conv')(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name='stem_bn')(x, train))
    x = nn.max_pool(x, (1, 3, 3), (1, 2, 2), padding=[(0, 0), (1, 1), (1, 1)])

    num_blocks = sum(self.stage_sizes)
    index = 0
    block = remat_class(Bottleneck, self.remat, when='block')
    for s, size in enumerate(self.stage_sizes):
      for b in range(size):
        x = block(
            planes=self.width * 2 ** s,
            stride=2 if (s > 0 and b == 0) else 1,
            temporal=self.temporal if (s + 1) in self.dtf_stages else 'none',
            drop_path_rate=self.drop_path_rate * index / max(num_blocks - 1, 1),
            dtype=self.dtype,
            fa_impl=self.fa_impl,
            spectral_impl=self.spectral_impl,
            block_impl=self.block_impl,
            remat=self.remat,
            name=f'stage{s + 1}_block{b}')(x, train)
        index += 1

    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))
    if features:
      return nan_where_not_finite(video, x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nan_where_not_finite(video, nn.Dense(self.num_classes, dtype=jnp.float32,
                                                name='head')(x))

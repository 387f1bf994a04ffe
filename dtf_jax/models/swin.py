"""C2D Swin Transformer on tubelets, with DTF blocks: DTF-Transformer.

A tubelet conv ``(early_stride, patch, patch)`` (no patch norm unless ``patch_norm``) turns ``B T H W 3`` into
``T' = T // early_stride`` token maps that the Swin stages process as independent images
(``B*T'`` of them). The temporal module (DTF) runs inside every block whose effective window shift
is 0, after the attention residual and before the MLP, on the tokens reshaped to ``B T' h w C``.
The classifier is applied per time step and the logits are averaged over time.
Output logits ``B num_classes`` (float32).
"""

from typing import Any, Optional, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dtf_jax.layers.conv import FrameConv
from dtf_jax.layers.shapes import rearrange_keep_batch
from dtf_jax.models.common import (DropPath, ModelArgumentError, check_remat, check_video,
                                   make_temporal_remat, nan_where_not_finite, remat_class)

dense_init = nn.initializers.truncated_normal(0.02)


def effective_window(resolution: int, window_size: int, shift: int):
  """Swin's rule: no partition (window = resolution, shift 0) when the map fits in one window."""
  if resolution <= window_size:
    return resolution, 0
  return window_size, shift


def relative_position_index(window: int) -> np.ndarray:
  """``(w*w, w*w)`` indices into the ``((2w-1)^2, heads)`` relative position bias table."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij')).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
  return rel[0] * (2 * window - 1) + rel[1]


def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray:
  """``(num_windows, w*w, w*w)`` additive mask (0 / -100) for shifted-window attention."""
  region = np.zeros((resolution, resolution), np.int32)
  bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  label = 0
  for hs in bounds:
    for ws in bounds:
      region[hs, ws] = label
      label += 1
  windows = window_partition(region[None, :, :, None], window)[0, :, :, 0]
  return np.where(windows[:, None, :] != windows[:, :, None], -100.0, 0.0).astype(np.float32)


def window_partition(x, window: int):
  """``N H W C -> N nW w*w C`` (windows row-major). The batch axis is never merged, so a
  batch-sharded input stays sharded the same way (two axes split at once: see
  :func:`rearrange_keep_batch`)."""
  return rearrange_keep_batch(x, 'n (nh wh) (nw ww) c -> n (nh nw) (wh ww) c', wh=window,
                              ww=window)


def window_reverse(windows, window: int, h: int, w: int):
  """Inverse of :func:`window_partition`: ``N nW w*w C -> N H W C``."""
  return rearrange_keep_batch(windows, 'n (nh nw) (wh ww) c -> n (nh wh) (nw ww) c',
                              nh=h // window, nw=w // window, wh=window)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows with a relative position bias.

  ``N nW L C -> N nW L C`` with ``L = window**2``; ``mask`` is ``(nW, L, L)`` or None.
  """
  num_heads: int
  window: int
  dtype: Any

  @nn.compact
  def __call__(self, x, mask: Optional[np.ndarray]):
    length, dim = x.shape[-2:]
    head_dim = dim // self.num_heads
    qkv = nn.Dense(3 * dim, dtype=self.dtype, kernel_init=dense_init, name='qkv')(x)
    # q, k, v sliced where they lie ('-> qkv n w l h d' would add a transpose per block).
    qkv = einops.rearrange(qkv, 'n w l (qkv h d) -> n w l qkv h d', qkv=3, h=self.num_heads)
    q, k, v = qkv[:, :, :, 0] * head_dim ** -0.5, qkv[:, :, :, 1], qkv[:, :, :, 2]
    logits = jnp.einsum('nwqhd,nwkhd->nwhqk', q, k).astype(jnp.float32)

    table = self.param('relative_position_bias_table', dense_init,
                       ((2 * self.window - 1) ** 2, self.num_heads), jnp.float32)
    bias = table[relative_position_index(self.window).reshape(-1)]
    logits = logits + einops.rearrange(bias, '(q k) h -> h q k', q=length)
    if mask is not None:
      logits = logits + mask[:, None]
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = einops.rearrange(jnp.einsum('nwhqk,nwkhd->nwqhd', attn, v), 'n w q h d -> n w q (h d)')
    return nn.Dense(dim, dtype=self.dtype, kernel_init=dense_init, name='proj')(out)


class SwinBlock(nn.Module):
  """(Shifted-)window attention block, optionally with a temporal module.

  ``(B*T') h w C -> (B*T') h w C``; ``clip_steps`` is ``T'``.
  """
  num_heads: int
  window: int
  shift: int
  clip_steps: int
  temporal: str
  mlp_ratio: float
  drop_path_rate: float
  dtype: Any
  fa_impl: str = 'auto'
  spectral_impl: str = 'auto'
  block_impl: str = 'auto'
  remat: str = 'none'  # 'dtf': the temporal module is rematerialised (see SwinTransformer)

  @nn.compact
  def __call__(self, x, train: bool):
    _, h, w, dim = x.shape
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)  # noqa: E731
    drop_path = DropPath(self.drop_path_rate)

    y = norm('norm1')(x)
    mask = None
    if self.shift:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
      mask = shifted_window_mask(h, self.window, self.shift)
    windows = window_partition(y, self.window)
    windows = WindowAttention(self.num_heads, self.window, self.dtype, name='attn')(windows, mask)
    y = window_reverse(windows, self.window, h, w)
    if self.shift:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    x = x + drop_path(y, train)

    temporal = make_temporal_remat(self.temporal, self.remat, dtype=self.dtype, name='temporal',
                                   fa_impl=self.fa_impl, spectral_impl=self.spectral_impl,
                                   block_impl=self.block_impl)
    if temporal is not None:
      x = einops.rearrange(x, '(b t) h w c -> b t h w c', t=self.clip_steps)
      x = einops.rearrange(temporal(x, train), 'b t h w c -> (b t) h w c')

    y = norm('norm2')(x)
    y = nn.Dense(int(dim * self.mlp_ratio), dtype=self.dtype, kernel_init=dense_init,
                 name='mlp_fc1')(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(dim, dtype=self.dtype, kernel_init=dense_init, name='mlp_fc2')(y)
    return x + drop_path(y, train)


class PatchMerging(nn.Module):
  """2x2 neighbourhood concat + LayerNorm + linear.  ``N h w C -> N h/2 w/2 2C``."""
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        axis=-1)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='norm')(x)
    return nn.Dense(x.shape[-1] // 2, use_bias=False, dtype=self.dtype, kernel_init=dense_init,
                    name='reduction')(x)


class SwinTransformer(nn.Module):
  """C2D / DTF Swin.  ``B T H W 3 -> B num_classes``.

  Attributes:
    num_classes: classifier outputs.
    clip_length: input frames ``T``; the stages see ``T // early_stride`` time steps.
    image_size: input height = width; fixes the windows (and so the parameter shapes).
    embed_dim, depths, num_heads: Swin size (Swin-B: 128, (2, 2, 18, 2), (4, 8, 16, 32)).
    window_size: attention window (7).
    patch_size: spatial tubelet size (4).
    early_stride: frames per tubelet (4).
    patch_norm: LayerNorm after the tubelet embedding. Off in the official DTF-Transformer (and so
      for its checkpoints); ImageNet Swin checkpoints carry one, and inflating them turns it on so
      that the video model starts as the 2D network.
    temporal: temporal module in the blocks with effective shift 0 (``'dtf'``, ``'none'``, or a
      name of ``dtf_jax.layers.temporal.TEMPORAL_MODULES``).
    mlp_ratio: MLP hidden size / dim.
    dropout_rate: dropout before the classifier.
    drop_path_rate: stochastic depth, linear from 0 over all blocks (Swin-B: 0.5).
    dtype: compute dtype (parameters stay float32).
    fa_impl: implementation of the DTF block's frame-wise aggregation (``'auto'``, ``'scan'``,
      ``'xla'``, ``'pallas'``; see ``dtf_jax.layers.aggregation``); the same values in each.
    spectral_impl: implementation of the DTF block's time DFTs (``'auto'``, ``'direct'``,
      ``'matmul'``, ``'fft'``; see ``dtf_jax.layers.spectral``); the same values in each.
    block_impl: how the DTF block runs (``'auto'``, ``'parts'``, ``'fused'``: Pallas TPU kernels,
      forward and backward; see ``dtf_jax.layers.dtf.BLOCK_IMPLS``); the same values in each.
    remat: what the backward pass recomputes instead of keeping from the forward pass
      (``dtf_jax.models.common.REMAT_OPTIONS``): ``'none'``, ``'block'`` (each Swin block) or
      ``'dtf'`` (each temporal module). Same values, gradients and variable names in each.
  """
  num_classes: int
  clip_length: int
  image_size: int = 224
  embed_dim: int = 128
  depths: Sequence[int] = (2, 2, 18, 2)
  num_heads: Sequence[int] = (4, 8, 16, 32)
  window_size: int = 7
  patch_size: int = 4
  early_stride: int = 4
  patch_norm: bool = False
  temporal: str = 'dtf'
  mlp_ratio: float = 4.0
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.5
  dtype: Any = jnp.float32
  fa_impl: str = 'auto'
  spectral_impl: str = 'auto'
  block_impl: str = 'auto'
  remat: str = 'none'

  def check_image_size(self):
    """Raises ``ValueError`` unless every stage's token map splits into whole windows."""
    if len(self.depths) != len(self.num_heads):
      raise ModelArgumentError(
          f'SwinTransformer: depths {tuple(self.depths)} and num_heads '
          f'{tuple(self.num_heads)} must have the same length.')
    res = self.image_size // self.patch_size
    for stage in range(len(self.depths)):
      window, _ = effective_window(res, self.window_size, 0)
      divisible = self.image_size % self.patch_size == 0 and res % window == 0
      if not divisible or (stage < len(self.depths) - 1 and res % 2):
        raise ModelArgumentError(
            f'SwinTransformer: image size {self.image_size} does not fit patch {self.patch_size}, '
            f'window {self.window_size} and {len(self.depths)} stages (stage {stage + 1} has '
            f'{res}x{res} tokens); use e.g. 224 for window 7.')
      res //= 2

  @nn.compact
  def __call__(self, video, train: bool = False, features: bool = False):
    """``video B T H W 3`` -> logits ``B num_classes`` (float32), or with ``features=True`` the
    pooled feature ``B D`` (float32, the mean over tokens and time steps) that the head maps to
    the logits (before dropout; the head is linear, so the time-averaged logits equal it applied
    to this mean).

    Initialise with ``features=False``: ``features=True`` does not create the head.
    """
    check_video(video, model=type(self).__name__, clip_length=self.clip_length,
                early_stride=self.early_stride)
    if video.shape[2] != self.image_size or video.shape[3] != self.image_size:
      raise ModelArgumentError(
          f'SwinTransformer: expected {self.image_size}x{self.image_size} frames '
          f'(image_size the model was built for), got '
          f'{video.shape[2]}x{video.shape[3]}.')
    self.check_image_size()
    check_remat(self.remat, type(self).__name__)
    batch = video.shape[0]
    steps = self.clip_length // self.early_stride

    x = FrameConv(self.embed_dim, (self.early_stride, self.patch_size, self.patch_size),
                  (self.early_stride, self.patch_size, self.patch_size), use_bias=True,
                  kernel_init=dense_init, dtype=self.dtype, name='patch_embed')(video)
    if self.patch_norm:
      x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='patch_embed_norm')(x)
    x = einops.rearrange(x, 'b t h w c -> (b t) h w c')

    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    index = 0
    block = remat_class(SwinBlock, self.remat, when='block')
    for s, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      res = x.shape[1]
      for b in range(depth):
        window, shift = effective_window(res, self.window_size, 0 if b % 2 == 0 else
                                         self.window_size // 2)
        x = block(num_heads=heads, window=window, shift=shift, clip_steps=steps,
                  temporal=self.temporal if shift == 0 else 'none',
                  mlp_ratio=self.mlp_ratio, drop_path_rate=float(rates[index]),
                  dtype=self.dtype, fa_impl=self.fa_impl, spectral_impl=self.spectral_impl,
                  block_impl=self.block_impl, remat=self.remat,
                  name=f'stage{s + 1}_block{b}')(x, train)
        index += 1
      if s < len(self.depths) - 1:
        x = PatchMerging(self.dtype, name=f'stage{s + 1}_merge')(x)

    x = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name='norm')(x)
    x = jnp.mean(x, axis=(1, 2))
    if features:
      return nan_where_not_finite(video, einops.reduce(x, '(b t) c -> b c', 'mean', b=batch))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, kernel_init=dense_init, name='head')(x)
    return nan_where_not_finite(video, einops.reduce(logits, '(b t) k -> b k', 'mean', b=batch))

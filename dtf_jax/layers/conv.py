"""Convolutions over the frames of a clip, run as 2D convolutions.

The backbones' convolutions are spatial (kernel ``1 x k x k``), or fold ``kt`` frames into one time
step (the stem: kernel ``kt x 7 x 7`` with time stride ``kt``, no time padding). Both are 2D
convolutions of ``B*T'`` images: the second with the ``kt`` frames moved into the channels. XLA
compiles 2D convolutions much better than 3D ones on the CPU (measured, XLA:CPU, 2 cores: a 3x3
conv of 16x16x8x8x8, 8 channels: 6.1 vs 1.1 ms, with its gradients 11.8 vs 2.8 ms; the ResNet stem
on 16x16x32x32x3: 145 vs 12 ms, kernel gradient 388 vs 7.5 ms), and they are the same computation.

:class:`FrameConv` keeps ``flax.linen.Conv``'s variable (``kernel``, ``kt kh kw C_in C_out``,
float32, same initialiser draw), so checkpoints, converters and FLOP counts are unchanged.
"""

from typing import Any, Callable, Sequence, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from dtf_jax.layers.shapes import rearrange_keep_batch


class FrameConv(nn.Module):
  """``B T H W C_in -> B T/kt H' W' features``, kernel ``(kt, kh, kw)``, strides ``(kt, sh, sw)``.

  Attributes:
    features: output channels.
    kernel_size: ``(kt, kh, kw)``; ``kt`` frames are folded into one time step (``T`` must be a
      multiple of ``kt``).
    strides: ``(kt, sh, sw)`` (the time stride equals ``kt``).
    padding: spatial padding ``((top, bottom), (left, right))``; time is never padded.
    use_bias: add a bias (``bias``, ``C_out``, zeros).
    kernel_init: initialiser of the ``kt kh kw C_in C_out`` kernel.
    dtype: compute dtype (the variables stay float32).
  """
  features: int
  kernel_size: Tuple[int, int, int]
  strides: Tuple[int, int, int] = (1, 1, 1)
  padding: Sequence[Tuple[int, int]] = ((0, 0), (0, 0))
  use_bias: bool = False
  kernel_init: Callable = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kt, kh, kw = self.kernel_size
    if self.strides[0] != kt:
      raise ValueError(f'FrameConv: the time stride {self.strides[0]} must equal the time kernel '
                       f'{kt} (frames are folded, not convolved, in time).')
    b, t, _, _, c = x.shape
    if t % kt:
      raise ValueError(f'FrameConv: {t} frames cannot be folded {kt} at a time.')
    kernel = self.param('kernel', self.kernel_init, (kt, kh, kw, c, self.features), jnp.float32)
    # The kt frames of a step go next to the channels: channel index = frame * C + c. (One axis
    # split and two groups merged: JAX needs the output sharding, see rearrange_keep_batch.)
    images = rearrange_keep_batch(x.astype(self.dtype), 'b (t kt) h w c -> (b t) h w (kt c)',
                                  kt=kt)
    kernel2d = einops.rearrange(kernel, 'kt kh kw c o -> kh kw (kt c) o')
    y = jax.lax.conv_general_dilated(
        images, kernel2d.astype(self.dtype), self.strides[1:], tuple(self.padding),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32).astype(
          self.dtype)
    return einops.rearrange(y, '(b t) h w c -> b t h w c', b=b)

"""Named tf.data ops of the video pipelines, one small function each (DMVR style).

A *record* after parsing is ``{'frames': string[N] (one encoded image per frame), 'label': int32,
'video_id': string}``; ``N`` is the video's frame count ``D``. Clips are ``T H W 3`` (``T`` =
``clip_length``), uint8 after decoding and float after ``resize_clip``.

Frame sampling. A clip of ``L`` frames with stride ``s`` spans ``S = (L - 1) * s + 1`` frames.
  train  start ~ uniform{0 .. D - S}; frames ``start + s * i``.
  eval   clip ``k`` of ``N`` starts at ``int((D - S) * k / N)`` (paper protocol, uniformly spaced).
  short  a video with ``D < S`` frames gives frames ``floor(i * D / L)``, ``i = 0 .. L-1``, in both
         cases: the clip covers the whole video once, in temporal order, each frame repeated about
         ``L / D`` times (never looping back to the start, which would fake a motion reversal).

Colour augmentation (the released DTF/SIFA train transform, torchvision semantics, every frame
of a clip with the same random parameters), on float clips in 0..255:
  ``colour_jitter``       with probability ``prob``: brightness, contrast, saturation and hue
                          adjustments (``adjust_*``) in a random order (``colour_jitter_params``).
  ``random_grayscale``    3-channel luma ``0.299 R + 0.587 G + 0.114 B`` with probability ``prob``.
  ``random_gaussian_blur`` with probability ``prob``, a separable Gaussian (``gaussian_blur``) of a
                          random sigma, edge-padded.

Randomness is stateless: every random op takes a ``seed`` tensor of shape [2] (``split_seeds``
makes independent ones), so a pipeline with a fixed seed yields the same batches on every run,
whatever the parallelism.
"""

import functools
import math
from typing import Dict, Optional, Sequence, Tuple

import tensorflow as tf

from dtf_jax.data import SSV2_FLIP_PAIRS  # noqa: F401  (ops.SSV2_FLIP_PAIRS)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SEQUENCE_FEATURES = {'image/encoded': tf.io.FixedLenSequenceFeature([], tf.string)}
CONTEXT_FEATURES = {
    'clip/label/index': tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    'video/id': tf.io.FixedLenFeature([], tf.string, default_value=''),
}


def parse_sequence_example(serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
  """Serialized DMVR ``SequenceExample`` (``dtf_jax.data.convert.SCHEMA``) -> record."""
  context, sequence = tf.io.parse_single_sequence_example(
      serialized, context_features=CONTEXT_FEATURES, sequence_features=SEQUENCE_FEATURES)
  return {'frames': sequence['image/encoded'],
          'label': tf.cast(context['clip/label/index'], tf.int32),
          'video_id': context['video/id']}


def split_seeds(seed: tf.Tensor, num: int) -> tf.Tensor:
  """[2] seed -> [num, 2] independent seeds."""
  return tf.random.experimental.stateless_split(seed, num)


def clip_span(clip_length: int, stride: int) -> int:
  """Frames covered by a clip of ``clip_length`` frames taken every ``stride`` frames."""
  return (clip_length - 1) * stride + 1


def _short_video_indices(num_frames: tf.Tensor, clip_length: int) -> tf.Tensor:
  i = tf.range(clip_length, dtype=tf.int32)
  return (i * num_frames) // clip_length


def train_clip_indices(num_frames: tf.Tensor, clip_length: int, stride: int,
                       seed: tf.Tensor) -> tf.Tensor:
  """Frame indices [L] of one clip at a random start (the short-video rule when ``D < S``)."""
  span = clip_span(clip_length, stride)
  num_frames = tf.cast(num_frames, tf.int32)
  start = tf.random.stateless_uniform([], seed, 0, tf.maximum(num_frames - span + 1, 1),
                                      dtype=tf.int32)
  regular = start + stride * tf.range(clip_length, dtype=tf.int32)
  return tf.where(num_frames >= span, regular, _short_video_indices(num_frames, clip_length))


def eval_clip_indices(num_frames: tf.Tensor, clip_length: int, stride: int,
                      num_clips: int) -> tf.Tensor:
  """Frame indices [num_clips, L]: clip ``k`` starts at ``int((D - S) * k / N)``."""
  span = clip_span(clip_length, stride)
  num_frames = tf.cast(num_frames, tf.int32)
  starts = ((num_frames - span) * tf.range(num_clips, dtype=tf.int32)) // num_clips
  regular = starts[:, None] + stride * tf.range(clip_length, dtype=tf.int32)[None, :]
  short = tf.tile(_short_video_indices(num_frames, clip_length)[None], [num_clips, 1])
  return tf.where(num_frames >= span, regular, short)


def frame_shape(frame: tf.Tensor, is_jpeg: bool) -> tf.Tensor:
  """Encoded image -> [H, W] without decoding pixels (JPEG) or by decoding it (other formats)."""
  if is_jpeg:
    return tf.io.extract_jpeg_shape(frame)[:2]
  return tf.shape(tf.io.decode_image(frame, channels=3, expand_animations=False))[:2]


def scale_jitter_window(image_hw: tf.Tensor, size: int, scale_range: Tuple[int, int],
                        seed: tf.Tensor) -> tf.Tensor:
  """Crop window ``[y, x, h, w]`` in source pixels equal to: resize the short side to a random
  ``s`` in ``scale_range`` (inclusive), then take a random ``size`` x ``size`` crop."""
  seeds = split_seeds(seed, 3)
  short = tf.cast(tf.reduce_min(image_hw), tf.float32)
  scale = tf.random.stateless_uniform([], seeds[0], scale_range[0], scale_range[1] + 1,
                                      dtype=tf.int32)
  side = tf.cast(tf.minimum(tf.round(size * short / tf.cast(scale, tf.float32)), short), tf.int32)
  y = tf.random.stateless_uniform([], seeds[1], 0, image_hw[0] - side + 1, dtype=tf.int32)
  x = tf.random.stateless_uniform([], seeds[2], 0, image_hw[1] - side + 1, dtype=tf.int32)
  return tf.stack([y, x, side, side])


def random_resized_crop_window(image_hw: tf.Tensor, area_range: Tuple[float, float],
                               aspect_range: Tuple[float, float], seed: tf.Tensor) -> tf.Tensor:
  """Crop window ``[y, x, h, w]`` covering a random fraction ``area_range`` of the frame with
  aspect ratio (w/h) in ``aspect_range`` (Inception-style; the whole frame after 10 misses)."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.concat([image_hw, [3]], 0), bounding_boxes=tf.zeros([1, 0, 4]), seed=seed,
      area_range=area_range, aspect_ratio_range=aspect_range, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])


DCT_METHODS = ('INTEGER_ACCURATE', 'INTEGER_FAST')


def check_dct_method(dct_method: str) -> None:
  """Raises ``ValueError`` unless ``dct_method`` is one of ``DCT_METHODS``."""
  if dct_method not in DCT_METHODS:
    raise ValueError(f'dct_method must be one of {DCT_METHODS}, got {dct_method!r}')


def decode_jpeg_window(frame: tf.Tensor, window: tf.Tensor,
                       dct_method: str = 'INTEGER_ACCURATE') -> tf.Tensor:
  """JPEG -> uint8 ``h w 3`` inside ``window`` ``[y, x, h, w]``, equal to decoding the whole frame
  and cropping it, at the cost of decoding about the window only.

  ``decode_and_crop_jpeg`` alone is not exact: libjpeg-turbo upsamples the chroma of the cropped
  region as if its right edge were the image's, which changes the last column by up to ~14 levels
  (in about 40% of random windows of 4:2:0 frames). The window is therefore decoded one column
  wider on each side (inside the frame) and those columns are dropped."""
  width = tf.io.extract_jpeg_shape(frame)[1]
  x0 = tf.maximum(window[1] - 1, 0)
  x1 = tf.minimum(window[1] + window[3] + 1, width)
  image = tf.io.decode_and_crop_jpeg(frame, tf.stack([window[0], x0, window[2], x1 - x0]),
                                     channels=3, dct_method=dct_method)
  return image[:, window[1] - x0:window[1] - x0 + window[3]]


def decode_frames(frames: tf.Tensor, is_jpeg: bool, window: Optional[tf.Tensor] = None,
                  dct_method: str = 'INTEGER_ACCURATE') -> tf.Tensor:
  """Encoded frames [T] -> uint8 ``T h w 3``, cropped to ``window`` ``[y, x, h, w]`` if given.

  JPEGs are decoded only about the window (``decode_jpeg_window``, exact). ``dct_method``:
  ``'INTEGER_ACCURATE'`` (libjpeg's exact ISLOW inverse DCT, as PIL and so torchvision decode) or
  ``'INTEGER_FAST'`` (IFAST: pixel values off by 1 level on average, at most ~7, and no faster
  with libjpeg-turbo's SIMD code; see README). Other formats ignore it."""
  check_dct_method(dct_method)

  def decode(frame):
    if is_jpeg:
      if window is not None:
        return decode_jpeg_window(frame, window, dct_method)
      return tf.io.decode_jpeg(frame, channels=3, dct_method=dct_method)
    image = tf.io.decode_image(frame, channels=3, expand_animations=False)
    if window is not None:
      image = image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]
    return image
  return tf.map_fn(decode, frames, fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))


def resize_clip(clip: tf.Tensor, height, width) -> tf.Tensor:
  """``T h w 3`` -> float32 ``T height width 3`` (bilinear, pixel values 0..255)."""
  return tf.image.resize(clip, tf.stack([height, width]), method='bilinear')


def resize_short_side(clip: tf.Tensor, size: int) -> tf.Tensor:
  """``T h w 3`` -> float32 with the short side ``size`` and the aspect ratio kept (rounded)."""
  hw = tf.cast(tf.shape(clip)[1:3], tf.float32)
  new_hw = tf.cast(tf.round(hw * size / tf.reduce_min(hw)), tf.int32)
  new_hw = tf.maximum(new_hw, size)
  return resize_clip(clip, new_hw[0], new_hw[1])


def crop_offsets(height, width, size: int, num_crops: int) -> tf.Tensor:
  """Top-left corners [num_crops, 2] of ``size`` x ``size`` crops: 1 = centre; 3 = start, centre
  and end along the long side (centred on the short side)."""
  height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
  centre = tf.stack([(height - size) // 2, (width - size) // 2])
  if num_crops == 1:
    return centre[None]
  if num_crops != 3:
    raise ValueError(f'num_crops must be 1 or 3, got {num_crops}')
  along = tf.range(3, dtype=tf.int32)  # 0, 1, 2 -> start, centre, end
  ys = tf.where(height > width, along * (height - size) // 2, tf.fill([3], centre[0]))
  xs = tf.where(height > width, tf.fill([3], centre[1]), along * (width - size) // 2)
  return tf.stack([ys, xs], axis=1)


def spatial_crops(clip: tf.Tensor, size: int, num_crops: int) -> tf.Tensor:
  """``T H W C`` (short side >= ``size``) -> ``num_crops T size size C`` (see ``crop_offsets``)."""
  shape = tf.shape(clip)
  offsets = crop_offsets(shape[1], shape[2], size, num_crops)
  return tf.stack([clip[:, offsets[k, 0]:offsets[k, 0] + size, offsets[k, 1]:offsets[k, 1] + size]
                   for k in range(num_crops)])


def flip_pairs_table(num_classes: int, pairs: Sequence[Tuple[int, int]]) -> tf.Tensor:
  """int32 [num_classes]: the label after a horizontal flip (swaps each pair, others unchanged)."""
  table = list(range(num_classes))
  for a, b in pairs:
    if not (0 <= a < num_classes and 0 <= b < num_classes):
      raise ValueError(f'flip pair ({a}, {b}) outside 0..{num_classes - 1}')
    table[a], table[b] = b, a
  return tf.constant(table, tf.int32)


def flip_left_right(clip: tf.Tensor) -> tf.Tensor:
  """``... H W C`` -> the same reversed along ``W``. (``tf.reverse`` of the 4-D clip is about
  twice as slow as this 3-D view of it on CPU.)"""
  shape = tf.shape(clip)
  rows = tf.reshape(clip, tf.stack([-1, shape[-2], shape[-1]]))
  return tf.reshape(tf.reverse(rows, axis=[1]), shape)


def random_flip(clip: tf.Tensor, label: tf.Tensor, seed: tf.Tensor,
                label_table: Optional[tf.Tensor] = None) -> Tuple[tf.Tensor, tf.Tensor]:
  """Flips ``T H W C`` left-right with probability 1/2, all frames alike; a flipped clip's label
  goes through ``label_table`` (``flip_pairs_table``) when given."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  clip = tf.cond(flip, lambda: flip_left_right(clip), lambda: clip)
  if label_table is not None:
    label = tf.where(flip & (label >= 0), tf.gather(label_table, tf.maximum(label, 0)), label)
  return clip, label


# Colour augmentation of the released DTF/SIFA train transform (torchvision semantics; one set of
# random parameters per clip, shared by all its frames). Clips are ``T H W 3`` float32 in 0..255.

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert('L')
COLOUR_JITTER_OPS = ('brightness', 'contrast', 'saturation', 'hue')  # torchvision's fn_idx order


def check_probability(name: str, value: float) -> None:
  """Raises ``ValueError`` unless ``0 <= value <= 1``."""
  if not 0.0 <= value <= 1.0:
    raise ValueError(f'{name} must be a probability in [0, 1], got {value!r}')


def check_colour_jitter(brightness: float, contrast: float, saturation: float,
                        hue: float) -> None:
  """Raises ``ValueError`` unless the strengths are >= 0 and ``hue <= 0.5`` (as torchvision)."""
  for name, value in zip(COLOUR_JITTER_OPS, (brightness, contrast, saturation, hue)):
    if not value >= 0:
      raise ValueError(f'colour jitter {name} must be >= 0, got {value!r}')
  if hue > 0.5:
    raise ValueError(f'colour jitter hue must be <= 0.5, got {hue!r}')


def check_sigma_range(sigma_range: Tuple[float, float]) -> None:
  """Raises ``ValueError`` unless ``sigma_range`` is ``(lo, hi)`` with ``0 < lo <= hi``."""
  if len(sigma_range) != 2 or not 0 < sigma_range[0] <= sigma_range[1]:
    raise ValueError(f'blur sigma range must be (lo, hi) with 0 < lo <= hi, got {sigma_range!r}')


def _mix_channels(x: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
  """``T H W 3`` -> ``T H W C``: every pixel times ``matrix`` [3, C] (as a 1x1 convolution, several
  times faster on CPU than a product and a sum over the channels)."""
  return tf.nn.conv2d(x, tf.cast(matrix, x.dtype)[None, None], 1, 'VALID')


def grayscale(x: tf.Tensor, channels: int = 1) -> tf.Tensor:
  """``T H W 3`` -> ``T H W channels``: ``0.299 R + 0.587 G + 0.114 B`` in every channel."""
  return _mix_channels(x, tf.tile(tf.constant(LUMA)[:, None], [1, channels]))


def adjust_brightness(x: tf.Tensor, factor) -> tf.Tensor:
  """``T H W 3`` in [0, 1] -> ``clamp(x * factor)`` (torchvision ``adjust_brightness``)."""
  return tf.clip_by_value(x * factor, 0.0, 1.0)


def adjust_contrast(x: tf.Tensor, factor) -> tf.Tensor:
  """``T H W 3`` in [0, 1] -> ``clamp(factor * x + (1 - factor) * m)``, ``m`` the mean grayscale
  of each frame (torchvision ``adjust_contrast`` is per image)."""
  mean_rgb = tf.reduce_mean(x, axis=[1, 2], keepdims=True)  # T 1 1 3
  mean = tf.reduce_sum(mean_rgb * tf.constant(LUMA, x.dtype), axis=-1, keepdims=True)  # T 1 1 1
  return tf.clip_by_value(factor * x + (1 - factor) * mean, 0.0, 1.0)


def adjust_saturation(x: tf.Tensor, factor) -> tf.Tensor:
  """``T H W 3`` in [0, 1] -> ``clamp(factor * x + (1 - factor) * grayscale(x))``."""
  factor = tf.cast(factor, x.dtype)
  luma = tf.tile(tf.constant(LUMA, x.dtype)[:, None], [1, 3])
  return tf.clip_by_value(_mix_channels(x, factor * tf.eye(3, dtype=x.dtype)
                                        + (1 - factor) * luma), 0.0, 1.0)


def adjust_hue(x: tf.Tensor, shift) -> tf.Tensor:
  """``T H W 3`` in [0, 1] -> RGB to HSV, ``h = (h + shift) mod 1``, back to RGB."""
  return tf.image.adjust_hue(x, shift)


def colour_jitter_params(seed: tf.Tensor, brightness: float, contrast: float, saturation: float,
                         hue: float) -> Tuple[tf.Tensor, tf.Tensor]:
  """torchvision ``ColorJitter.get_params``: ``order`` int32 [4], a random permutation of
  ``COLOUR_JITTER_OPS`` indices, and ``factors`` float32 [4]: brightness, contrast and saturation
  factors ~ ``U[max(0, 1 - v), 1 + v]`` and a hue shift ~ ``U[-hue, hue]``."""
  seeds = split_seeds(seed, 5)
  order = tf.cast(tf.argsort(tf.random.stateless_uniform([4], seeds[0])), tf.int32)
  factors = [tf.random.stateless_uniform([], seeds[i + 1], max(0.0, 1.0 - v), 1.0 + v)
             for i, v in enumerate((brightness, contrast, saturation))]
  factors.append(tf.random.stateless_uniform([], seeds[4], -hue, hue))
  return order, tf.stack(factors)


def apply_colour_jitter(clip: tf.Tensor, order: tf.Tensor, factors: tf.Tensor,
                        enabled: Sequence[bool] = (True,) * 4) -> tf.Tensor:
  """``T H W 3`` float in 0..255 -> same: the adjustments ``order[0], ..., order[3]`` (indices
  into ``COLOUR_JITTER_OPS``) with ``factors`` [4], in that order. Ops not ``enabled`` are skipped
  (what torchvision does for a strength of 0)."""
  adjust = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)

  def branch(k, x):
    return adjust[k](x, factors[k]) if enabled[k] else x

  x = clip / 255.0
  for i in range(4):
    x = tf.switch_case(order[i], [functools.partial(branch, k, x) for k in range(4)])
  return x * 255.0


def colour_jitter(clip: tf.Tensor, seed: tf.Tensor, brightness: float = 0.4,
                  contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1,
                  prob: float = 0.8) -> tf.Tensor:
  """``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p=prob)`` on a clip.

  ``T H W 3`` float in 0..255 -> same. ``split_seeds(seed, 2)``: [0] draws whether to apply,
  [1] the order and factors (``colour_jitter_params``), the same for every frame."""
  check_colour_jitter(brightness, contrast, saturation, hue)
  check_probability('colour jitter prob', prob)
  seeds = split_seeds(seed, 2)
  strengths = (brightness, contrast, saturation, hue)
  order, factors = colour_jitter_params(seeds[1], *strengths)
  enabled = [v > 0 for v in strengths]
  return tf.cond(tf.random.stateless_uniform([], seeds[0]) < prob,
                 lambda: apply_colour_jitter(clip, order, factors, enabled), lambda: clip)


def random_grayscale(clip: tf.Tensor, seed: tf.Tensor, prob: float = 0.2) -> tf.Tensor:
  """``RandomGrayscale(prob)``: ``T H W 3`` -> its 3-channel ``grayscale`` with probability
  ``prob`` (all frames alike), else unchanged. Any value range (the op is linear)."""
  check_probability('grayscale prob', prob)
  return tf.cond(tf.random.stateless_uniform([], seed) < prob,
                 lambda: grayscale(clip, 3), lambda: clip)


def gaussian_kernel(sigma, radius: int) -> tf.Tensor:
  """float32 [2 radius + 1]: ``exp(-k^2 / (2 sigma^2))``, ``k = -radius .. radius``, normalised."""
  k = tf.cast(tf.range(-radius, radius + 1), tf.float32)
  sigma = tf.cast(sigma, tf.float32)
  weights = tf.exp(-k * k / (2.0 * sigma * sigma))
  return weights / tf.reduce_sum(weights)


def _edge_pad(x: tf.Tensor, radius: int, axis: int) -> tf.Tensor:
  """Extends ``axis`` by ``radius`` copies of the first and of the last slice."""
  n = tf.shape(x)[axis]
  return tf.gather(x, tf.clip_by_value(tf.range(-radius, n + radius), 0, n - 1), axis=axis)


def gaussian_blur(clip: tf.Tensor, sigma, radius: int = 6) -> tf.Tensor:
  """Separable Gaussian blur of standard deviation ``sigma`` (a float or scalar tensor) of every
  frame: ``T H W C`` -> same, float32. The kernel is truncated at ``radius`` (``2 radius + 1``
  taps, 6 = 3 x the largest sigma 2.0 of the released recipe) and normalised; the borders are
  extended by repeating the edge pixels (edge padding, like PIL's ``GaussianBlur``; not zeros)."""
  clip = tf.cast(clip, tf.float32)
  channels = clip.shape[-1]
  kernel = gaussian_kernel(sigma, radius)
  taps = tf.tile(kernel[:, None, None, None], [1, 1, channels, 1])  # H-pass filter, 2r+1 1 C 1
  x = tf.nn.depthwise_conv2d(_edge_pad(clip, radius, 1), taps, [1, 1, 1, 1], 'VALID')
  x = tf.nn.depthwise_conv2d(_edge_pad(x, radius, 2), tf.transpose(taps, [1, 0, 2, 3]),
                             [1, 1, 1, 1], 'VALID')
  return x


def random_gaussian_blur(clip: tf.Tensor, seed: tf.Tensor, prob: float = 0.5,
                         sigma_range: Tuple[float, float] = (0.1, 2.0)) -> tf.Tensor:
  """With probability ``prob``, ``gaussian_blur`` with ``sigma ~ U[sigma_range]`` (all frames
  alike; kernel radius ``ceil(3 * sigma_range[1])``), else unchanged. ``T H W 3`` -> same.
  ``split_seeds(seed, 2)``: [0] draws whether to apply, [1] sigma."""
  check_probability('blur prob', prob)
  check_sigma_range(sigma_range)
  seeds = split_seeds(seed, 2)
  sigma = tf.random.stateless_uniform([], seeds[1], sigma_range[0], sigma_range[1])
  radius = math.ceil(3 * sigma_range[1])
  return tf.cond(tf.random.stateless_uniform([], seeds[0]) < prob,
                 lambda: gaussian_blur(clip, sigma, radius), lambda: clip)


def normalize(clip: tf.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, dtype=tf.float32) -> tf.Tensor:
  """Pixel values 0..255 ``... W C`` -> ``(x / 255 - mean) / std`` per channel, cast to ``dtype``.

  Computed as ``x * scale + offset`` with ``scale`` and ``offset`` tiled along ``W`` and each
  image row a vector of ``W C`` values: the same float32 operations as broadcasting them over
  ``C`` (bitwise), about 4x faster on CPU than Eigen's broadcast over a last axis of 3."""
  clip = tf.cast(clip, tf.float32)
  std = tf.constant(std, tf.float32)
  scale = 1.0 / (255.0 * std)
  offset = -tf.constant(mean, tf.float32) / std
  shape = tf.shape(clip)
  rows = tf.reshape(clip, tf.stack([-1, shape[-2] * shape[-1]]))
  rows = rows * tf.tile(scale, shape[-2:-1]) + tf.tile(offset, shape[-2:-1])
  return tf.cast(tf.reshape(rows, shape), dtype)

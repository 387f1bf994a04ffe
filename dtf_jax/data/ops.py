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

Randomness is stateless: every random op takes a ``seed`` tensor of shape [2] (``split_seeds``
makes independent ones), so a pipeline with a fixed seed yields the same batches on every run,
whatever the parallelism.
"""

from typing import Dict, Optional, Sequence, Tuple

from dtf_jax.data import tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Something-Something V2 classes that a horizontal flip turns into each other (left <-> right).
SSV2_FLIP_PAIRS = ((86, 87), (93, 94), (166, 167))

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


def decode_frames(frames: tf.Tensor, is_jpeg: bool,
                  window: Optional[tf.Tensor] = None) -> tf.Tensor:
  """Encoded frames [T] -> uint8 ``T h w 3``, cropped to ``window`` ``[y, x, h, w]`` if given.

  JPEGs are decoded only inside the window (``decode_and_crop_jpeg``)."""
  def decode(frame):
    if is_jpeg and window is not None:
      return tf.io.decode_and_crop_jpeg(frame, window, channels=3, dct_method='INTEGER_FAST')
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


def random_flip(clip: tf.Tensor, label: tf.Tensor, seed: tf.Tensor,
                label_table: Optional[tf.Tensor] = None) -> Tuple[tf.Tensor, tf.Tensor]:
  """Flips ``T H W C`` left-right with probability 1/2, all frames alike; a flipped clip's label
  goes through ``label_table`` (``flip_pairs_table``) when given."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  clip = tf.cond(flip, lambda: tf.reverse(clip, axis=[2]), lambda: clip)
  if label_table is not None:
    label = tf.where(flip & (label >= 0), tf.gather(label_table, tf.maximum(label, 0)), label)
  return clip, label


def colour_jitter(clip: tf.Tensor, seed: tf.Tensor, strength: float = 0.4,
                  grayscale_prob: float = 0.2, apply_prob: float = 0.8) -> tf.Tensor:
  """Random brightness, contrast and saturation (factors in ``1 +- strength``, the same for all
  frames), applied with probability ``apply_prob``, then grayscale with ``grayscale_prob``.
  ``T H W 3`` float in 0..255 -> same."""
  seeds = split_seeds(seed, 5)
  x = clip / 255.0

  def jitter(x):
    x = x * tf.random.stateless_uniform([], seeds[0], 1 - strength, 1 + strength)
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    x = (x - mean) * tf.random.stateless_uniform([], seeds[1], 1 - strength, 1 + strength) + mean
    gray = tf.image.rgb_to_grayscale(x)
    x = (x - gray) * tf.random.stateless_uniform([], seeds[2], 1 - strength, 1 + strength) + gray
    return tf.clip_by_value(x, 0.0, 1.0)

  x = tf.cond(tf.random.stateless_uniform([], seeds[3]) < apply_prob, lambda: jitter(x), lambda: x)
  x = tf.cond(tf.random.stateless_uniform([], seeds[4]) < grayscale_prob,
              lambda: tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 1, 3]), lambda: x)
  return x * 255.0


def normalize(clip: tf.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, dtype=tf.float32) -> tf.Tensor:
  """Pixel values 0..255 -> ``(x / 255 - mean) / std`` per channel, cast to ``dtype``."""
  scale = 1.0 / (255.0 * tf.constant(std, tf.float32))
  offset = -tf.constant(mean, tf.float32) / tf.constant(std, tf.float32)
  return tf.cast(tf.cast(clip, tf.float32) * scale + offset, dtype)

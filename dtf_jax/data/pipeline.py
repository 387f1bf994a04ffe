"""Train and eval input pipelines (tf.data, CPU) over video records from TFRecords or TFDS.

    source = make_source('tfrecord:/data/k400', 'train')        # or 'tfds:dtf_synthetic'
    train = train_dataset(source, batch_size=8, clip_length=16, size=224, seed=0)
    batch = next(train.as_numpy_iterator())   # {'video': B T H W 3 float32, 'label': B int32}
    evaluation = eval_dataset(make_source(..., 'validation'), batch_size=8, clip_length=16,
                              size=256, num_clips=10, num_crops=3)
    for batch in evaluation.dataset: ...      # + 'video_index', 'view_index', 'video_id', 'mask'

Sources. ``tfrecord:DIR``: the converter's ``{split}-NNNNN-of-NNNNN.tfrecord`` files with
``label_map.json`` and ``{split}-manifest.json`` (per-shard video counts). ``tfds:NAME``: a TFDS
dataset prepared in ``data_dir`` with a ``video`` (frames) and a ``label`` feature; frames are read
encoded and decoded only when sampled.

Hosts. Process ``p`` of ``P`` reads the TFRecord files ``p, p + P, ...`` (sorted names), or the
``p``-th of ``P`` even TFDS sub-splits. ``batch_size`` is per process. Every video has a global
``video_index`` (its position in the sorted files or the TFDS split), so eval scores can be gathered
from all hosts and averaged per video.

Determinism. The train stream is a function of ``seed`` and the process index: epoch ``e`` shuffles
the host's files and its records with seeds drawn from ``(seed, e)``; element ``n`` of the stream
draws its clip offset, crop, flip and colour augmentation from ``(seed, process, n)``.
``start_index`` skips the first ``n`` elements (a resumed run continues the same stream); skipping
reads records but decodes none.
"""

import dataclasses
import math
import struct
from typing import Callable, List, Optional, Sequence, Tuple

import tensorflow as tf

from dtf_jax import storage
from dtf_jax.data import ops

AUTOTUNE = tf.data.AUTOTUNE
TRAIN_CROPS = ('scale_jitter', 'random_resized_crop')
FLIP_MODES = ('flip', 'none', 'swap_pairs')
# train_dataset arguments of the released DTF/SIFA train transform (the flip is set per dataset).
RELEASED_AUGMENTATION = dict(crop='random_resized_crop', area_range=(0.2, 1.0),
                             aspect_range=(3 / 4, 4 / 3), colour_jitter=(0.4, 0.4, 0.4, 0.1),
                             colour_jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5,
                             blur_sigma=(0.1, 2.0))


def _processes(process_index: Optional[int], process_count: Optional[int]) -> Tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in 0..{process_count - 1}')
  return process_index, process_count


@dataclasses.dataclass
class VideoSource:
  """The records of one split and how they are spread over processes.

  ``host_sizes[p]``: videos read by process ``p``; ``read(p, epoch_seed)`` -> records
  ``{'frames': string[D], 'label': int32, 'video_id': string, 'video_index': int64}`` of process
  ``p`` (fixed order; shuffled file order when ``epoch_seed`` [2] is given).
  """
  name: str
  split: str
  class_names: Tuple[str, ...]
  is_jpeg: bool
  host_sizes: Tuple[int, ...]
  read: Callable[[int, Optional[tf.Tensor]], tf.data.Dataset]
  files: Tuple[str, ...] = ()  # TFRecord sources: the files, sorted

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_videos(self) -> int:
    return sum(self.host_sizes)


# What reading a damaged TFRecord file raises.
DataLossError = tf.errors.DataLossError


def scan_tfrecord(path: str) -> Tuple[int, Optional[str]]:
  """Walks the record headers of a TFRecord file without reading the records: ``(records, None)``
  when it is whole, else ``(records before the damage, what is wrong)``. Finds cut files and
  impossible lengths; a changed byte inside a record shows only when TensorFlow checks its CRC."""
  location = storage.path(path)
  size = location.stat().length
  count = offset = 0
  with location.open('rb') as f:
    while offset < size:
      if offset + 12 > size:
        return count, f'cut inside the header of record {count} (byte {offset} of {size})'
      f.seek(offset)
      (length,) = struct.unpack('<Q', f.read(8))
      end = offset + 12 + length + 4
      if end > size:
        return count, f'record {count} needs bytes {offset}..{end}, the file has {size}'
      offset, count = end, count + 1
  return count, None


def damaged_files(source: VideoSource) -> List[Tuple[str, str]]:
  """``(file, problem)`` of the damaged TFRecord files of ``source`` (:func:`scan_tfrecord`)."""
  found = []
  for path in source.files:
    _, problem = scan_tfrecord(path)
    if problem:
      found.append((path, problem))
  return found


def damage_error(source: VideoSource, error: Exception) -> ValueError:
  """The ``ValueError`` to raise for a ``DataLossError`` met while reading ``source``."""
  found = damaged_files(source)
  where = ('; '.join(f'{path}: {problem}' for path, problem in found) if found else
           'no file is cut short, so a record inside one is corrupt (its CRC fails)')
  first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return ValueError(f'{source.name} [{source.split}] has damaged TFRecords: {where}. Re-convert '
                    f'or remove them, or set config.data.skip_corrupt_records=True to skip what '
                    f'cannot be read. (TensorFlow: {first[:200]})')


def guarded(source: VideoSource, iterable):
  """The elements of ``iterable`` (batches of ``source``); a ``DataLossError`` becomes the
  ``ValueError`` of :func:`damage_error`, naming the damaged files."""
  iterator = iter(iterable)
  while True:
    try:
      item = next(iterator)
    except StopIteration:
      return
    except DataLossError as e:
      raise damage_error(source, e) from None
    yield item


def _tfrecord_source(data_dir: str, split: str, process_count: int,
                     skip_corrupt_records: bool = False) -> VideoSource:
  directory = storage.path(data_dir)
  files = sorted(str(f) for f in directory.glob(f'{split}-*-of-*.tfrecord'))
  if not files:
    found = sorted({f.name.split('-')[0] for f in directory.glob('*.tfrecord')})
    raise FileNotFoundError(f"no '{split}-*-of-*.tfrecord' files in {data_dir} (splits there: "
                            f'{found or "none"}); convert with python -m dtf_jax.data.convert')
  if len(files) < process_count:
    raise ValueError(f'{len(files)} {split} files in {data_dir} cannot be split over '
                     f'{process_count} processes; convert with --num-shards >= {process_count}')
  label_map_path = directory / 'label_map.json'
  if not label_map_path.exists():
    raise FileNotFoundError(f'{label_map_path} is missing (written by dtf_jax.data.convert)')
  label_map = storage.read_json(label_map_path)
  class_names = tuple(sorted(label_map, key=label_map.get))
  manifest_path = directory / f'{split}-manifest.json'
  names = [f.rsplit('/', 1)[-1] for f in files]
  if manifest_path.exists():
    counts_by_file = {s['file']: s['videos'] for s in storage.read_json(manifest_path)['shards']}
    missing = [n for n in names if n not in counts_by_file]
    if missing:
      raise ValueError(f'{manifest_path} does not list {missing[:3]}: files and manifest differ')
    counts = [counts_by_file[n] for n in names]
  else:  # Counting reads every record once (no decoding).
    print(f'{manifest_path} is missing: counting the records of {len(files)} files')
    counts = [int(tf.data.TFRecordDataset(f).reduce(0, lambda n, _: n + 1)) for f in files]
  if skip_corrupt_records:  # read each file up to its damage; count what is lost
    lost = 0
    for i, path in enumerate(files):
      readable, problem = scan_tfrecord(path)
      if problem:
        print(f'skip_corrupt_records: {path}: {problem}; reading its first {readable} of '
              f'{counts[i]} videos')
        lost += counts[i] - readable
        counts[i] = readable
    print(f'skip_corrupt_records: {lost} of {sum(counts) + lost} {split} videos skipped')
  offsets = [sum(counts[:i]) for i in range(len(files))]
  host_sizes = tuple(sum(counts[p::process_count]) for p in range(process_count))

  def read(process_index: int, epoch_seed: Optional[tf.Tensor] = None) -> tf.data.Dataset:
    host = tf.data.Dataset.from_tensor_slices(
        (files[process_index::process_count],
         tf.constant(offsets[process_index::process_count], tf.int64)))
    if epoch_seed is not None:
      host = host.shuffle(len(files), seed=_int_seed(epoch_seed))

    def file_records(path, offset):
      records = tf.data.TFRecordDataset(path, buffer_size=8 << 20)
      if skip_corrupt_records:
        records = records.ignore_errors()  # ends the file at its damage
      return records.enumerate().map(
          lambda j, serialized: dict(ops.parse_sequence_example(serialized),
                                     video_index=offset + j))
    return host.interleave(file_records, cycle_length=min(len(files), 16), block_length=1,
                           num_parallel_calls=AUTOTUNE, deterministic=True)

  return VideoSource(f'tfrecord:{data_dir}', split, class_names, True, host_sizes, read,
                     tuple(files))


def _tfds_source(name: str, split: str, data_dir: Optional[str], process_count: int) -> VideoSource:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  if name.split('/')[0] == 'dtf_synthetic':
    from dtf_jax.data import tfds_synthetic  # pylint: disable=import-outside-toplevel,unused-import
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(f"TFDS dataset '{name}' is not prepared in {builder.data_dir}; run "
                            f"tfds.builder('{name}', data_dir=...).download_and_prepare()")
  features = builder.info.features
  if 'video' not in features or 'label' not in features:
    raise ValueError(f"TFDS dataset '{name}' needs 'video' and 'label' features, has "
                     f'{list(features.keys())}')
  if split not in builder.info.splits:
    raise ValueError(f"TFDS dataset '{name}' has no split '{split}' "
                     f'(splits: {list(builder.info.splits.keys())})')
  class_names = tuple(features['label'].names)
  subsplits = tfds.even_splits(split, n=process_count, drop_remainder=False)
  host_sizes = tuple(builder.info.splits[s].num_examples for s in subsplits)
  offsets = [sum(host_sizes[:p]) for p in range(process_count)]
  has_id = 'id' in features

  def read(process_index: int, epoch_seed: Optional[tf.Tensor] = None) -> tf.data.Dataset:
    del epoch_seed  # TFDS files are read in their fixed order; the record shuffle does the rest.
    ds = builder.as_dataset(split=subsplits[process_index], shuffle_files=False,
                            decoders={'video': tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(add_tfds_id=True))
    return ds.enumerate().map(lambda j, ex: {
        'frames': ex['video'], 'label': tf.cast(ex['label'], tf.int32),
        'video_id': ex['id'] if has_id else ex['tfds_id'],
        'video_index': offsets[process_index] + j})

  first = next(iter(read(0).take(1)), None) if builder.info.splits[split].num_examples else None
  is_jpeg = bool(first is not None and first['frames'].numpy()[0][:3] == b'\xff\xd8\xff')
  return VideoSource(f'tfds:{name}', split, class_names, is_jpeg, host_sizes, read)


def make_source(dataset: str, split: str, data_dir: Optional[str] = None,
                process_count: Optional[int] = None,
                skip_corrupt_records: bool = False) -> VideoSource:
  """``'tfrecord:DIR'`` or ``'tfds:NAME'`` (prepared in ``data_dir``) -> ``VideoSource``.

  TFRecords: a damaged file raises ``DataLossError`` when read (:func:`damage_error` names it);
  with ``skip_corrupt_records`` every file is checked first and read up to its damage, and what
  is skipped is printed."""
  _, process_count = _processes(0, process_count)
  kind, _, location = dataset.partition(':')
  if kind == 'tfrecord' and location:
    return _tfrecord_source(location, split, process_count, skip_corrupt_records)
  if kind == 'tfds' and location:
    return _tfds_source(location, split, data_dir, process_count)
  raise ValueError(f"dataset must be 'tfrecord:DIR' or 'tfds:NAME', got {dataset!r}")


def _int_seed(seed: tf.Tensor) -> tf.Tensor:
  """[2] seed -> int64 scalar (for tf.data ops that take one)."""
  return tf.random.stateless_uniform([], seed, minval=None, maxval=None, dtype=tf.int64)


def _check(clip_length: int, stride: int, size: int):
  for name, value in (('clip_length', clip_length), ('stride', stride), ('size', size)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'{name} must be a positive int, got {value!r}')


def train_dataset(source: VideoSource, *, batch_size: int, clip_length: int, stride: int = 1,
                  size: int = 224, crop: str = 'scale_jitter',
                  scale_range: Tuple[int, int] = (256, 340),
                  area_range: Tuple[float, float] = (0.2, 1.0),
                  aspect_range: Tuple[float, float] = (3 / 4, 4 / 3), flip: str = 'flip',
                  flip_pairs: Sequence[Tuple[int, int]] = ops.SSV2_FLIP_PAIRS,
                  colour_jitter: Tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
                  colour_jitter_prob: float = 0.8, grayscale_prob: float = 0.0,
                  blur_prob: float = 0.0, blur_sigma: Tuple[float, float] = (0.1, 2.0),
                  shuffle_buffer: int = 1024, seed: int = 0,
                  start_index: int = 0, dtype=tf.float32, prefetch: int = 2,
                  dct_method: str = 'INTEGER_ACCURATE',
                  process_index: Optional[int] = None) -> tf.data.Dataset:
  """Endless stream of batches ``{'video': B T size size 3 (dtype), 'label': B int32}``.

  crop: ``'scale_jitter'`` (short side to a random size in ``scale_range``, random square crop)
    or ``'random_resized_crop'`` (``area_range`` of the frame, ``aspect_range``), then ``size``².
  flip: ``'flip'`` (random horizontal flip), ``'none'`` (Something-Something), ``'swap_pairs'``
    (flip, and swap the labels of ``flip_pairs``: SSv2's left/right classes by default).
  colour_jitter: (brightness, contrast, saturation, hue) strengths of ``ops.colour_jitter``
    (torchvision ``ColorJitter``, random order), applied with probability ``colour_jitter_prob``;
    all 0 = off. Then ``ops.random_grayscale`` with ``grayscale_prob`` and
    ``ops.random_gaussian_blur`` with ``blur_prob`` (sigma ~ U[``blur_sigma``]). The released
    DTF/SIFA recipe (``configs/base.py``): ``crop='random_resized_crop'``,
    ``colour_jitter=(0.4, 0.4, 0.4, 0.1)``, ``colour_jitter_prob=0.8``, ``grayscale_prob=0.2``,
    ``blur_prob=0.5``, ``blur_sigma=(0.1, 2.0)``.
  dct_method: JPEG inverse DCT of ``ops.decode_frames``: ``'INTEGER_ACCURATE'`` (exact, the
    default) or ``'INTEGER_FAST'`` (approximate; README, "Input pipelines").
  """
  _check(clip_length, stride, size)
  ops.check_dct_method(dct_method)
  if crop not in TRAIN_CROPS:
    raise ValueError(f'crop must be one of {TRAIN_CROPS}, got {crop!r}')
  if flip not in FLIP_MODES:
    raise ValueError(f'flip must be one of {FLIP_MODES}, got {flip!r}')
  if isinstance(colour_jitter, (int, float)) or len(colour_jitter) != 4:
    raise ValueError('colour_jitter must be 4 strengths (brightness, contrast, saturation, hue), '
                     f'got {colour_jitter!r}')
  colour_jitter = tuple(float(v) for v in colour_jitter)
  ops.check_colour_jitter(*colour_jitter)
  ops.check_probability('colour_jitter_prob', colour_jitter_prob)
  ops.check_probability('grayscale_prob', grayscale_prob)
  ops.check_probability('blur_prob', blur_prob)
  ops.check_sigma_range(tuple(blur_sigma))
  process_index, _ = _processes(process_index, len(source.host_sizes))
  if not source.host_sizes[process_index]:
    raise ValueError(f'process {process_index} has no {source.split} videos in {source.name}')
  label_table = (ops.flip_pairs_table(source.num_classes, flip_pairs)
                 if flip == 'swap_pairs' else None)
  host_seed = tf.constant([seed, process_index], tf.int64)
  epochs_key, clips_key = tf.unstack(ops.split_seeds(host_seed, 2))

  def epoch(e):
    epoch_seed = tf.random.experimental.stateless_fold_in(epochs_key, e)
    records = source.read(process_index, epoch_seed)
    return records.shuffle(shuffle_buffer, seed=_int_seed(epoch_seed))

  def make_clip(n, record):
    # [0] clip offset, [1] crop, [2] flip, [3] -> independent seeds of the colour ops.
    seeds = ops.split_seeds(tf.random.experimental.stateless_fold_in(clips_key, n), 4)
    jitter_seed, grayscale_seed, blur_seed = tf.unstack(ops.split_seeds(seeds[3], 3))
    frames = record['frames']
    indices = ops.train_clip_indices(tf.shape(frames)[0], clip_length, stride, seeds[0])
    frames = tf.gather(frames, indices)
    image_hw = ops.frame_shape(frames[0], source.is_jpeg)
    if crop == 'scale_jitter':
      window = ops.scale_jitter_window(image_hw, size, scale_range, seeds[1])
    else:
      window = ops.random_resized_crop_window(image_hw, area_range, aspect_range, seeds[1])
    clip = ops.resize_clip(ops.decode_frames(frames, source.is_jpeg, window, dct_method),
                           size, size)
    label = record['label']
    # The released order is crop, colour jitter, grayscale, blur, flip; the flip commutes with
    # the colour ops (per pixel, or per frame for contrast's mean) and with the blur (a symmetric
    # kernel with edge padding), so it stays here.
    if flip != 'none':
      clip, label = ops.random_flip(clip, label, seeds[2], label_table)
    if any(colour_jitter) and colour_jitter_prob > 0:
      clip = ops.colour_jitter(clip, jitter_seed, *colour_jitter, prob=colour_jitter_prob)
    if grayscale_prob > 0:
      clip = ops.random_grayscale(clip, grayscale_seed, grayscale_prob)
    if blur_prob > 0:
      clip = ops.random_gaussian_blur(clip, blur_seed, blur_prob, tuple(blur_sigma))
    clip = tf.ensure_shape(ops.normalize(clip, dtype=dtype), [clip_length, size, size, 3])
    return {'video': clip, 'label': label}

  ds = tf.data.Dataset.range(2**62).flat_map(epoch).enumerate()
  if start_index:
    ds = ds.skip(start_index)
  ds = ds.map(make_clip, num_parallel_calls=AUTOTUNE, deterministic=True)
  return ds.batch(batch_size, drop_remainder=True).prefetch(prefetch)


@dataclasses.dataclass
class EvalData:
  """``dataset``: ``num_batches`` batches of views ``{'video': B T size size 3, 'label': B,
  'video_index': B int64, 'view_index': B int32, 'video_id': B string, 'mask': B bool}``, the same
  number on every process; padding views have ``mask`` False and ``video_index`` -1."""
  dataset: tf.data.Dataset
  num_batches: int
  num_videos: int
  views_per_video: int


def eval_dataset(source: VideoSource, *, batch_size: int, clip_length: int, stride: int = 1,
                 size: int = 224, num_clips: int = 1, num_crops: int = 1, dtype=tf.float32,
                 prefetch: int = 2, dct_method: str = 'INTEGER_ACCURATE',
                 process_index: Optional[int] = None) -> EvalData:
  """Every video of this process as ``num_clips`` x ``num_crops`` views (``ops`` gives the clip
  starts; crops after resizing the short side to ``size``), in order, padded to whole batches.
  ``dct_method`` as in ``train_dataset``."""
  _check(clip_length, stride, size)
  ops.check_dct_method(dct_method)
  if num_clips < 1:
    raise ValueError(f'num_clips must be >= 1, got {num_clips}')
  if num_crops not in (1, 3):
    raise ValueError(f'num_crops must be 1 or 3, got {num_crops}')
  process_index, _ = _processes(process_index, len(source.host_sizes))
  views = num_clips * num_crops
  num_batches = math.ceil(max(source.host_sizes) * views / batch_size)
  num_padding = num_batches * batch_size - source.host_sizes[process_index] * views

  def clips_of(record):
    indices = ops.eval_clip_indices(tf.shape(record['frames'])[0], clip_length, stride, num_clips)
    return tf.data.Dataset.from_tensor_slices(
        {'indices': indices, 'clip': tf.range(num_clips, dtype=tf.int32)}).map(
            lambda c: dict(record, **c))

  def make_views(item):
    clip = ops.decode_frames(tf.gather(item['frames'], item['indices']), source.is_jpeg,
                             dct_method=dct_method)
    crops = ops.spatial_crops(ops.resize_short_side(clip, size), size, num_crops)
    return {
        'video': tf.ensure_shape(ops.normalize(crops, dtype=dtype),
                                 [num_crops, clip_length, size, size, 3]),
        'label': tf.fill([num_crops], item['label']),
        'video_index': tf.fill([num_crops], item['video_index']),
        'view_index': item['clip'] * num_crops + tf.range(num_crops, dtype=tf.int32),
        'video_id': tf.fill([num_crops], item['video_id']),
        'mask': tf.ones([num_crops], tf.bool)}

  ds = source.read(process_index).flat_map(clips_of)
  ds = ds.map(make_views, num_parallel_calls=AUTOTUNE, deterministic=True).unbatch()
  padding = {'video': tf.zeros([clip_length, size, size, 3], dtype),
             'label': tf.constant(-1, tf.int32), 'video_index': tf.constant(-1, tf.int64),
             'view_index': tf.constant(-1, tf.int32), 'video_id': tf.constant(b''),
             'mask': tf.constant(False)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_padding))
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(prefetch)
  return EvalData(ds, num_batches, source.num_videos, views)

"""Train/eval pipeline tests on records made by the converter from frame folders with known pixels.

Frame ``t`` of every test video has ``R = 10 t + 5``, ``G = 2 x + 10``, ``B = 2 y + 20`` at column
``x`` and row ``y``: a decoded clip tells which frames were sampled (R) and where it was cropped
(G, B), so clip offsets and crop positions are checked against a direct computation. Ramps survive
JPEG at quality 100 within about 1 (levels are read with tolerance 2.5 or rounded).
"""

import json
import math
import os
import shutil
import struct

import numpy as np
import pytest

pytest.importorskip('tensorflow')

from dtf_jax.data import convert, ops, pipeline  # noqa: E402
import tensorflow as tf  # noqa: E402

NUM_CLASSES = 170
# name -> (frames, height, width, label)
VIDEOS = {
    'long_landscape': (20, 48, 80, 86),
    'short_landscape': (3, 48, 80, 93),
    'long_portrait': (20, 80, 48, 5),
    'mid_landscape': (9, 48, 64, 167),
    'exact_portrait': (7, 64, 48, 0),
}
MEAN = np.array(ops.IMAGENET_MEAN) * 255
STD = np.array(ops.IMAGENET_STD) * 255


def _frame(t, h, w):
  y, x = np.mgrid[:h, :w]
  return np.stack([np.full((h, w), 10 * t + 5), 2 * x + 10, 2 * y + 20], -1).astype(np.uint8)


def _pixels(video):
  """Normalised float video -> pixel values 0..255."""
  return np.asarray(video, np.float64) * STD + MEAN


@pytest.fixture(scope='module')
def records(tmp_path_factory):
  """Converter output (2 train shards, 3 validation shards) of the pattern videos."""
  root = tmp_path_factory.mktemp('pattern')
  frames_dir = root / 'frames'
  lines = []
  for name, (n, h, w, label) in VIDEOS.items():
    os.makedirs(frames_dir / name)
    for t in range(n):
      (frames_dir / name / f'{t:03d}.png').write_bytes(tf.io.encode_png(_frame(t, h, w)).numpy())
    lines.append(f'{name} {label}')
  (root / 'list.txt').write_text('\n'.join(lines) + '\n')
  (root / 'classes.txt').write_text('\n'.join(f'class{i}' for i in range(NUM_CLASSES)) + '\n')
  classes, splits = convert.read_list({'train': str(root / 'list.txt'),
                                       'validation': str(root / 'list.txt')},
                                      str(frames_dir), str(root / 'classes.txt'))
  out = root / 'records'
  os.makedirs(out)
  opts = convert.EncodeOptions(short_side=0, jpeg_quality=100)
  convert.write_label_map(str(out), classes)
  for split, shards in (('train', 2), ('validation', 3)):
    convert.convert_split(split, splits[split], str(out), opts, num_shards=shards)
  return str(out)


def _frame_indices(pixels):
  """Clip pixels ``T H W 3`` -> sampled frame index per frame (from R)."""
  return np.round((np.median(pixels[..., 0], axis=(1, 2)) - 5) / 10).astype(int)


def _expected_eval_indices(d, clip_length, stride, num_clips):
  span = (clip_length - 1) * stride + 1
  if d < span:
    return [[i * d // clip_length for i in range(clip_length)]] * num_clips
  return [[int((d - span) * k / num_clips) + stride * i for i in range(clip_length)]
          for k in range(num_clips)]


def _eval_views(records, process_count=1, **kw):
  """All real views over the processes: {(video name, view index): (pixels, label)}."""
  out = {}
  num_batches = set()
  for p in range(process_count):
    source = pipeline.make_source(f'tfrecord:{records}', 'validation', process_count=process_count)
    data = pipeline.eval_dataset(source, process_index=p, **kw)
    num_batches.add(data.num_batches)
    count = 0
    for batch in data.dataset.as_numpy_iterator():
      count += 1
      assert batch['video'].shape[0] == kw['batch_size']
      for i in np.flatnonzero(batch['mask']):
        key = (batch['video_id'][i].decode(), int(batch['view_index'][i]))
        assert key not in out, f'{key} seen twice'
        out[key] = (_pixels(batch['video'][i]), int(batch['label'][i]),
                    int(batch['video_index'][i]))
      assert np.all(batch['video_index'][~batch['mask']] == -1)
      assert np.all(batch['video'][~batch['mask']] == 0)
    assert count == data.num_batches
  assert len(num_batches) == 1, f'processes disagree on the number of batches: {num_batches}'
  return out


@pytest.mark.parametrize('size', [48, 24])
def test_eval_clip_offsets_and_three_crops(records, size):
  clip_length, stride, num_clips = 4, 2, 3
  views = _eval_views(records, batch_size=5, clip_length=clip_length, stride=stride, size=size,
                      num_clips=num_clips, num_crops=3)
  assert len(views) == len(VIDEOS) * num_clips * 3
  for name, (d, h, w, label) in VIDEOS.items():
    expected_frames = _expected_eval_indices(d, clip_length, stride, num_clips)
    scale = 48 // size  # every test video's short side is 48 or 64
    short = min(h, w)
    long_side = round(max(h, w) * size / short)
    size_short = round(short * size / short)
    for view in range(num_clips * 3):
      pixels, got_label, _ = views[(name, view)]
      assert got_label == label
      assert pixels.shape == (clip_length, size, size, 3)
      np.testing.assert_array_equal(_frame_indices(pixels), expected_frames[view // 3])
      # Crop k starts at k * (long - size) / 2 along the long side, centred on the short side.
      along = (view % 3) * (long_side - size) // 2
      across = (size_short - size) // 2
      y0, x0 = (along, across) if h > w else (across, along)
      # Source column of resized column x' (half-pixel centres): (x' + 0.5) * h/size_h - 0.5.
      sx, sy = w / round(w * size / short), h / round(h * size / short)
      expect_g = 2 * ((x0 + 0.5) * sx - 0.5) + 10
      expect_b = 2 * ((y0 + 0.5) * sy - 0.5) + 20
      if scale == 1 and short == 48:
        assert (expect_g, expect_b) == (2 * x0 + 10, 2 * y0 + 20)
      np.testing.assert_allclose(np.median(pixels[:, 1:-1, 0, 1]), expect_g, atol=2.5,
                                 err_msg=f'{name} view {view}: crop column')
      np.testing.assert_allclose(np.median(pixels[:, 0, 1:-1, 2]), expect_b, atol=2.5,
                                 err_msg=f'{name} view {view}: crop row')


def test_eval_single_centre_crop(records):
  views = _eval_views(records, batch_size=4, clip_length=2, size=48, num_clips=1, num_crops=1)
  pixels, _, _ = views[('long_landscape', 0)]
  np.testing.assert_allclose(np.median(pixels[:, :, 0, 1]), 2 * 16 + 10, atol=2.5)  # (80-48)/2
  pixels, _, _ = views[('long_portrait', 0)]
  np.testing.assert_allclose(np.median(pixels[:, 0, :, 2]), 2 * 16 + 20, atol=2.5)
  np.testing.assert_array_equal(_frame_indices(pixels), [0, 1])


@pytest.mark.parametrize('batch_size', [1, 4, 7])
def test_eval_every_video_once_over_two_hosts(records, batch_size):
  views = _eval_views(records, process_count=2, batch_size=batch_size, clip_length=2, size=24,
                      num_clips=2, num_crops=3)
  by_index = {}
  for (name, view), (_, _, index) in views.items():
    by_index.setdefault(index, set()).add((name, view))
  assert sorted(by_index) == list(range(len(VIDEOS)))
  assert all(len({n for n, _ in v}) == 1 and len(v) == 6 for v in by_index.values())
  # The video index is the position in the sorted shard files, as the manifest counts them.
  with open(os.path.join(records, 'validation-manifest.json')) as f:
    shards = json.load(f)['shards']
  order = []
  for shard in sorted(shards, key=lambda s: s['file']):
    ds = tf.data.TFRecordDataset(os.path.join(records, shard['file']))
    order += [ops.parse_sequence_example(r)['video_id'].numpy().decode() for r in ds]
  assert [next(iter(by_index[i]))[0] for i in range(len(order))] == order


def test_eval_padding_counts(records):
  source = pipeline.make_source(f'tfrecord:{records}', 'validation', process_count=2)
  assert sum(source.host_sizes) == len(VIDEOS)
  data = pipeline.eval_dataset(source, batch_size=4, clip_length=2, size=24, num_clips=3,
                               num_crops=1, process_index=0)
  assert data.num_batches == math.ceil(max(source.host_sizes) * 3 / 4)
  assert data.views_per_video == 3 and data.num_videos == len(VIDEOS)


def _train(records, **kw):
  args = dict(batch_size=5, clip_length=4, stride=2, size=32, seed=0, process_index=0,
              shuffle_buffer=8)
  args.update(kw)
  source = pipeline.make_source(f'tfrecord:{records}', 'train', process_count=1)
  return pipeline.train_dataset(source, **args).as_numpy_iterator()


def test_train_batch_shapes_values_and_sampling(records):
  it = _train(records)
  labels = {v[3] for v in VIDEOS.values()}
  lo, hi = (0 - MEAN) / STD, (255 - MEAN) / STD
  starts = {}
  for _ in range(12):
    batch = next(it)
    assert batch['video'].shape == (5, 4, 32, 32, 3) and batch['video'].dtype == np.float32
    assert batch['label'].shape == (5,) and batch['label'].dtype == np.int32
    assert set(batch['label']) <= labels
    assert np.all(batch['video'] >= lo - 1e-3) and np.all(batch['video'] <= hi + 1e-3)
    for video, label in zip(batch['video'], batch['label']):
      frames = _frame_indices(_pixels(video))
      d = next(v[0] for v in VIDEOS.values() if v[3] == label)
      if d >= 7:  # span (4 - 1) * 2 + 1
        np.testing.assert_array_equal(np.diff(frames), 2)
        assert 0 <= frames[0] <= d - 7
        starts.setdefault(d, set()).add(frames[0])
      else:  # the short-video rule
        np.testing.assert_array_equal(frames, [i * d // 4 for i in range(4)])
  assert len(starts[20]) > 3, f'random clip starts barely vary: {starts}'


def test_train_deterministic_seeded_and_resumable(records):
  first = next(_train(records))
  a, b = _train(records), _train(records)
  stream_a = [next(a) for _ in range(6)]
  stream_b = [next(b) for _ in range(6)]
  for x, y in zip(stream_a, stream_b):
    np.testing.assert_array_equal(x['video'], y['video'])
    np.testing.assert_array_equal(x['label'], y['label'])
  np.testing.assert_array_equal(first['video'], stream_a[0]['video'])
  other = next(_train(records, seed=1))
  assert not np.array_equal(other['video'], stream_a[0]['video'])
  # A run resumed after 4 batches (20 elements) continues the same stream, over epoch boundaries.
  resumed = _train(records, start_index=4 * 5)
  for x in stream_a[4:]:
    y = next(resumed)
    np.testing.assert_array_equal(x['video'], y['video'])
    np.testing.assert_array_equal(x['label'], y['label'])


def _is_flipped(pixels):
  g = np.median(pixels[..., 1], axis=(0, 1))  # per column
  return g[-1] < g[0]


def test_flip_label_swap_and_no_flip(records):
  flips = {True: set(), False: set()}
  it = _train(records, flip='swap_pairs', batch_size=20)
  for _ in range(4):
    batch = next(it)
    for video, label in zip(batch['video'], batch['label']):
      flips[_is_flipped(_pixels(video))].add(int(label))
  # Labels of the stored videos: 86, 93, 5, 167, 0. Flipped: 86<->87, 93<->94, 166<->167.
  assert flips[False] == {86, 93, 5, 167, 0}
  assert flips[True] == {87, 94, 5, 166, 0}
  it = _train(records, flip='none', batch_size=20)
  assert not any(_is_flipped(_pixels(v)) for v in next(it)['video'])
  it = _train(records, flip='flip', batch_size=20)
  batch = next(it)
  flipped = [_is_flipped(_pixels(v)) for v in batch['video']]
  assert any(flipped) and not all(flipped)
  assert set(batch['label']) <= {v[3] for v in VIDEOS.values()}


def test_flip_pairs_table():
  table = ops.flip_pairs_table(174, ops.SSV2_FLIP_PAIRS).numpy()
  expected = np.arange(174)
  for a, b in ((86, 87), (93, 94), (166, 167)):
    expected[a], expected[b] = b, a
  np.testing.assert_array_equal(table, expected)
  with pytest.raises(ValueError, match='outside'):
    ops.flip_pairs_table(100, ops.SSV2_FLIP_PAIRS)


def test_clip_indices_direct():
  for d in (1, 3, 6, 7, 8, 31, 64):
    for num_clips in (1, 3, 4, 10):
      got = ops.eval_clip_indices(tf.constant(d), 4, 2, num_clips).numpy()
      np.testing.assert_array_equal(got, _expected_eval_indices(d, 4, 2, num_clips))
  starts = set()
  for s in range(200):
    idx = ops.train_clip_indices(tf.constant(12), 4, 2, tf.constant([s, 7])).numpy()
    np.testing.assert_array_equal(np.diff(idx), 2)
    starts.add(int(idx[0]))
  assert starts == set(range(12 - 7 + 1))  # every start 0..D-S, none outside
  idx = ops.train_clip_indices(tf.constant(5), 8, 1, tf.constant([0, 0])).numpy()
  np.testing.assert_array_equal(idx, [0, 0, 1, 1, 2, 3, 3, 4])  # floor(i * 5 / 8)


def test_crop_windows():
  hw = tf.constant([320, 426])
  for s in range(100):
    y, x, h, w = ops.scale_jitter_window(hw, 224, (256, 340), tf.constant([s, 1])).numpy()
    assert h == w and round(224 * 320 / 340) <= h <= round(224 * 320 / 256)
    assert 0 <= y <= 320 - h and 0 <= x <= 426 - w
    y, x, h, w = ops.random_resized_crop_window(hw, (0.2, 1.0), (3 / 4, 4 / 3),
                                                tf.constant([s, 2])).numpy()
    area = h * w / (320 * 426)
    assert 0.2 - 0.01 <= area <= 1.0 and 0 <= y <= 320 - h and 0 <= x <= 426 - w
    assert (h, w) == (320, 426) or 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


def _detailed_jpeg(h=40, w=72, seed=0):
  """A JPEG (quality 90, 4:2:0 chroma) of smooth colour ramps plus noise: chroma that varies."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:h, :w]
  image = np.stack([3 * x, 5 * y, 2 * (x + y)], -1) + rng.integers(0, 60, (h, w, 3))
  return tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=90)


def test_decode_jpeg_window_equals_decode_then_crop():
  jpeg = _detailed_jpeg()
  windows = [(y, x, h, w) for y, h in ((0, 40), (3, 17), (24, 16)) for x, w in
             ((0, 72), (0, 9), (5, 31), (17, 16), (40, 32), (63, 9), (71, 1))]
  plain_differs = 0
  for dct in ops.DCT_METHODS:
    full = tf.io.decode_jpeg(jpeg, channels=3, dct_method=dct).numpy()
    for y, x, h, w in windows:
      got = ops.decode_jpeg_window(jpeg, tf.constant([y, x, h, w]), dct).numpy()
      np.testing.assert_array_equal(got, full[y:y + h, x:x + w], err_msg=f'{dct} {y, x, h, w}')
      plain = tf.io.decode_and_crop_jpeg(jpeg, [y, x, h, w], channels=3, dct_method=dct).numpy()
      plain_differs += not np.array_equal(plain, full[y:y + h, x:x + w])
  assert plain_differs  # why decode_jpeg_window widens the window
  other = _detailed_jpeg(seed=1)
  clip = ops.decode_frames(tf.stack([jpeg, other]), True, tf.constant([3, 5, 17, 31]))
  assert clip.shape == (2, 17, 31, 3)
  full = tf.io.decode_jpeg(other, dct_method='INTEGER_ACCURATE')
  np.testing.assert_array_equal(clip[1], full[3:20, 5:36])
  fast = ops.decode_frames(jpeg[None], True, dct_method='INTEGER_FAST').numpy().astype(int)
  exact = ops.decode_frames(jpeg[None], True).numpy().astype(int)
  assert 0 < np.abs(fast - exact).max() <= 12 and np.abs(fast - exact).mean() < 2
  with pytest.raises(ValueError, match='dct_method must be one of'):
    ops.decode_frames(jpeg[None], True, dct_method='FLOAT')


def test_normalize_and_flip_vs_numpy():
  rng = np.random.default_rng(0)
  for shape in ((3, 5, 7, 3), (2, 3, 4, 6, 3)):
    clip = (rng.random(shape) * 255).astype(np.float32)
    scale = (1 / (255 * np.array(ops.IMAGENET_STD, np.float32))).astype(np.float32)
    offset = (-np.array(ops.IMAGENET_MEAN, np.float32) / np.array(ops.IMAGENET_STD, np.float32))
    np.testing.assert_array_equal(ops.normalize(clip).numpy(), clip * scale + offset)  # bitwise
    np.testing.assert_array_equal(ops.flip_left_right(clip).numpy(), clip[..., ::-1, :])
  assert ops.normalize(clip, dtype=tf.bfloat16).dtype == tf.bfloat16


def test_random_resized_crop_and_colour_jitter(records):
  batch = next(_train(records, batch_size=10, **pipeline.RELEASED_AUGMENTATION))
  assert batch['video'].shape == (10, 4, 32, 32, 3)
  lo, hi = (0 - MEAN) / STD, (255 - MEAN) / STD
  assert np.all(batch['video'] >= lo - 1e-3) and np.all(batch['video'] <= hi + 1e-3)
  # The jitter factors are drawn once per clip: equal frames stay equal (tests/test_data_augment.py
  # checks the colour ops against NumPy).
  clip = tf.constant(np.repeat(_frame(3, 16, 16)[None], 4, 0), tf.float32)
  for s in range(5):
    out = ops.colour_jitter(clip, tf.constant([s, 0]), 0.4, 0.4, 0.4, 0.1, prob=1.0)
    out = ops.random_grayscale(out, tf.constant([s, 1]), prob=0.5).numpy()
    assert np.ptp(out, axis=0).max() < 1e-4 and out.min() >= 0 and out.max() <= 255.0 + 1e-3


def test_errors(records, tmp_path):
  with pytest.raises(ValueError, match="'tfrecord:DIR' or 'tfds:NAME'"):
    pipeline.make_source(records, 'train', process_count=1)
  with pytest.raises(FileNotFoundError, match=r"splits there: \['train', 'validation'\]"):
    pipeline.make_source(f'tfrecord:{records}', 'test', process_count=1)
  with pytest.raises(ValueError, match='--num-shards >= 4'):
    pipeline.make_source(f'tfrecord:{records}', 'train', process_count=4)
  with pytest.raises(FileNotFoundError, match='label_map.json'):
    (tmp_path / 'train-00000-of-00001.tfrecord').write_bytes(b'')
    pipeline.make_source(f'tfrecord:{tmp_path}', 'train', process_count=1)
  source = pipeline.make_source(f'tfrecord:{records}', 'train', process_count=1)
  with pytest.raises(ValueError, match='crop must be one of'):
    pipeline.train_dataset(source, batch_size=1, clip_length=4, crop='centre', process_index=0)
  with pytest.raises(ValueError, match='flip must be one of'):
    pipeline.train_dataset(source, batch_size=1, clip_length=4, flip='yes', process_index=0)
  with pytest.raises(ValueError, match='num_crops must be 1 or 3'):
    pipeline.eval_dataset(source, batch_size=1, clip_length=4, num_crops=2, process_index=0)
  with pytest.raises(ValueError, match='clip_length must be a positive int'):
    pipeline.eval_dataset(source, batch_size=1, clip_length=0, process_index=0)
  with pytest.raises(ValueError, match='process_index 1 not in 0..0'):
    pipeline.train_dataset(source, batch_size=1, clip_length=4, process_index=1)
  with pytest.raises(ValueError, match='dct_method must be one of'):
    pipeline.train_dataset(source, batch_size=1, clip_length=4, dct_method='fast', process_index=0)


def test_benchmark_input_counts(records, capsys):
  from dtf_jax.tools import benchmark_input  # pylint: disable=import-outside-toplevel
  assert benchmark_input.main(['--data', records, '--clip-length', '4', '--size', '32',
                               '--batch-size', '2', '--batches', '3', '--warmup-batches', '1',
                               '--cores', '1']) == 0
  lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()
           if line.startswith(('train ', 'eval '))}
  assert set(lines) == {'train', 'eval'}
  for line in lines.values():  # "<name> <rate> clips/s <rate/core> clips/s/core (6 clips in ...)"
    parts = line.split()
    assert float(parts[1]) > 0 and float(parts[3]) == pytest.approx(float(parts[1]), rel=0.01)
    assert '(6 clips in' in line and '1 cores)' in line


def test_damaged_tfrecord_is_named_or_skipped(records, tmp_path, capsys):
  damaged = tmp_path / 'records'
  shutil.copytree(records, damaged)
  victim = damaged / 'validation-00001-of-00003.tfrecord'
  whole = tf.data.TFRecordDataset(str(victim)).reduce(0, lambda n, _: n + 1).numpy()
  assert whole >= 2
  data = victim.read_bytes()
  first = 12 + struct.unpack('<Q', data[:8])[0] + 4  # the first record, whole
  second = first + 16 + struct.unpack('<Q', data[first:first + 8])[0]
  victim.write_bytes(data[:first + 20])                # the second, cut
  assert pipeline.scan_tfrecord(str(victim)) == (
      1, f'record 1 needs bytes {first}..{second}, the file has {first + 20}')
  assert pipeline.scan_tfrecord(os.path.join(records, 'validation-00001-of-00003.tfrecord')) == \
      (whole, None)

  def views(skip):
    source = pipeline.make_source(f'tfrecord:{damaged}', 'validation', process_count=1,
                                  skip_corrupt_records=skip)
    data = pipeline.eval_dataset(source, batch_size=4, clip_length=4, stride=2, size=32,
                                 num_clips=1, num_crops=1, process_index=0)
    batches = list(pipeline.guarded(source, data.dataset.as_numpy_iterator()))
    return source, sorted({int(v) for b in batches for v, m in zip(b['video_index'], b['mask'])
                           if m})
  with pytest.raises(ValueError, match=r'validation-00001-of-00003.tfrecord: record 1 needs '
                                       r'.*skip_corrupt_records=True'):
    views(skip=False)
  source, seen = views(skip=True)
  assert seen == list(range(len(VIDEOS) - (whole - 1))) and source.num_videos == len(seen)
  out = capsys.readouterr().out
  assert f'reading its first 1 of {whole} videos' in out
  assert f'skip_corrupt_records: {whole - 1} of {len(VIDEOS)} validation videos skipped' in out

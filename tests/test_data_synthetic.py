"""Synthetic temporal dataset: pair property, determinism, mp4 files and converted TFRecords.

Measured (seed 0, 16x64x64): PSNR vs the rendered frames of the mp4 (libx264 CRF 18, yuv420p)
min 33.2 dB, mean 33.6 dB; of the TFRecord JPEGs (quality 90) min 31.9 dB, mean 32.9 dB. Within
each direction pair, nearest-centroid accuracy on time-averaged frames is 0.44-0.56 and on sorted
frames 0.46-0.56 (chance 0.5, 48 test clips); the motion-feature signs below get 1.0 on every pair.
"""

import json
import os
import shutil

import numpy as np
import pytest

av = pytest.importorskip('av')
pytest.importorskip('tensorflow')

from dtf_jax.data import synthetic  # noqa: E402
import tensorflow as tf  # noqa: E402

FRAMES, SIZE = 16, 64
NUM_TRAIN, NUM_VAL = 20, 8  # 20: classes 2-3 clips each (balance within one)


def _psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


def _clips(labels, seed=0):
  """Clips of the given labels, each from its own generator (like the dataset): N T H W 3."""
  return np.stack([synthetic.render_clip(int(label), synthetic.clip_rng(seed, 7, i), FRAMES, SIZE)
                   for i, label in enumerate(labels)])


def _generate(path, seed=0, overwrite=False):
  return synthetic.generate(str(path), NUM_TRAIN, NUM_VAL, FRAMES, SIZE, seed, workers=1,
                            videos_per_shard=8, progress_interval=100, overwrite=overwrite)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  return _generate(tmp_path_factory.mktemp('synthetic_a'))


def _read_list(path):
  with open(path, encoding='utf-8') as f:
    return [(line.split()[0], int(line.split()[1])) for line in f if line.strip()]


def _records(directory, split):
  files = sorted(os.path.join(directory, n) for n in os.listdir(directory)
                 if n.startswith(split + '-') and n.endswith('.tfrecord'))
  context = {'clip/label/index': tf.io.FixedLenFeature([], tf.int64),
             'clip/label/text': tf.io.FixedLenFeature([], tf.string),
             'video/filename': tf.io.FixedLenFeature([], tf.string),
             'video/num_frames': tf.io.FixedLenFeature([], tf.int64),
             'image/height': tf.io.FixedLenFeature([], tf.int64),
             'image/width': tf.io.FixedLenFeature([], tf.int64)}
  seq = {'image/encoded': tf.io.FixedLenSequenceFeature([], tf.string)}
  out = []
  for record in tf.data.TFRecordDataset(files):
    ctx, frames = tf.io.parse_single_sequence_example(record, context, seq)
    out.append(({k: v.numpy() for k, v in ctx.items()},
                np.stack([tf.io.decode_jpeg(j).numpy() for j in frames['image/encoded']])))
  return out


# ---------------------------------------------------------------------------------------------
# The pair property: order-free statistics carry no direction information, temporal ones do.


def test_odd_class_is_even_class_reversed():
  for kind in range(4):
    for index in range(3):
      forward = synthetic.render_clip(2 * kind, synthetic.clip_rng(3, 0, index), FRAMES, SIZE)
      backward = synthetic.render_clip(2 * kind + 1, synthetic.clip_rng(3, 0, index), FRAMES, SIZE)
      assert forward.shape == (FRAMES, SIZE, SIZE, 3) and forward.dtype == np.uint8
      np.testing.assert_array_equal(backward, forward[::-1])
      assert not np.array_equal(backward, forward)


def _nearest_centroid_accuracy(features, labels):
  """Centroids from the even-indexed samples, accuracy on the odd-indexed ones."""
  train, test = np.arange(0, len(labels), 2), np.arange(1, len(labels), 2)
  classes = np.unique(labels)
  centroids = np.stack([features[train][labels[train] == c].mean(0) for c in classes])
  dist = ((features[test][:, None] - centroids[None]) ** 2).sum(-1)
  return float(np.mean(classes[dist.argmin(1)] == labels[test]))


def _motion_features(clips):
  """Per clip: slopes of the object's x, y centroid and area over time, and its total rotation.

  The object is the set of pixels brighter than 180 (object >= 195, everything else <= 160).
  """
  gray = clips.astype(np.float64).mean(-1)
  mask = (gray > 180).astype(np.float64)                                    # N T H W
  yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
  area = mask.sum((2, 3)) + 1e-6
  cx, cy = (mask * xx).sum((2, 3)) / area, (mask * yy).sum((2, 3)) / area
  mxx = (mask * (xx - cx[..., None, None]) ** 2).sum((2, 3)) / area
  myy = (mask * (yy - cy[..., None, None]) ** 2).sum((2, 3)) / area
  mxy = (mask * (xx - cx[..., None, None]) * (yy - cy[..., None, None])).sum((2, 3)) / area
  doubled = np.arctan2(2 * mxy, mxx - myy)                                  # 2 x orientation
  turn = np.angle(np.exp(1j * np.diff(doubled, axis=1))).sum(1) / 2         # y down: > 0 is cw
  t = np.arange(clips.shape[1]) - (clips.shape[1] - 1) / 2
  slope = lambda v: (v * t).sum(1) / (t * t).sum()
  # Sign convention: > 0 for the even (forward) class of each pair.
  return {'horizontal': -slope(cx), 'vertical': -slope(cy), 'scale': slope(area),
          'rotation': turn}


def test_order_free_statistics_at_chance_temporal_features_separate():
  per_class = 48
  labels = np.repeat(np.arange(8), per_class)
  clips = _clips(labels, seed=11)
  mean_frames = clips.reshape(len(labels), FRAMES, -1).astype(np.float64).mean(1)
  sorted_frames = np.sort(clips.reshape(len(labels), FRAMES, -1).astype(np.float64), axis=1)
  motion = _motion_features(clips)
  report = {}
  for kind_index, kind in enumerate(synthetic.KINDS):
    pair = (labels // 2) == kind_index
    y = labels[pair]
    acc_mean = _nearest_centroid_accuracy(mean_frames[pair], y)
    acc_sorted = _nearest_centroid_accuracy(sorted_frames[pair].reshape(pair.sum(), -1), y)
    acc_motion = float(np.mean((motion[kind][pair] > 0) == (y % 2 == 0)))
    report[kind] = (acc_mean, acc_sorted, acc_motion)
    # 48 test clips per pair: chance 0.5 +- 0.07 (1 sd).
    assert 0.25 <= acc_mean <= 0.75, (kind, report)
    assert 0.25 <= acc_sorted <= 0.75, (kind, report)
    assert acc_motion >= 0.95, (kind, report)
  print('pair accuracies (time-mean centroid, sorted-frames centroid, motion sign):', report)


def test_render_validates_label_and_depends_on_seed():
  with pytest.raises(ValueError):
    synthetic.render_clip(8, synthetic.clip_rng(0, 0, 0))
  a = synthetic.render_clip(0, synthetic.clip_rng(0, 0, 0), FRAMES, SIZE)
  np.testing.assert_array_equal(a, synthetic.render_clip(0, synthetic.clip_rng(0, 0, 0), FRAMES,
                                                         SIZE))
  assert not np.array_equal(a, synthetic.render_clip(0, synthetic.clip_rng(1, 0, 0), FRAMES, SIZE))
  assert not np.array_equal(a, synthetic.render_clip(0, synthetic.clip_rng(0, 1, 0), FRAMES, SIZE))


# ---------------------------------------------------------------------------------------------
# Files: lists, mp4s, TFRecords.


def test_lists_balanced_and_classes(dataset):
  paths = dataset['paths']
  with open(paths['classes'], encoding='utf-8') as f:
    assert [line.strip() for line in f] == list(synthetic.CLASSES)
  for name, count in (('train.txt', NUM_TRAIN), ('val.txt', NUM_VAL)):
    entries = _read_list(paths[name])
    assert len(entries) == count
    counts = np.bincount([label for _, label in entries], minlength=8)
    assert counts.max() - counts.min() <= 1, counts
    assert all(os.path.exists(os.path.join(paths['videos'], rel)) for rel, _ in entries)
  assert dataset['codec'] == synthetic.video_codec()


def test_mp4_decodes_to_rendered_frames(dataset):
  paths = dataset['paths']
  psnrs = []
  for split, code, name in synthetic.SPLITS:
    for index, (rel, label) in enumerate(_read_list(paths[name])[:6]):
      with av.open(os.path.join(paths['videos'], rel)) as container:
        assert container.streams.video[0].codec_context.name in ('h264', 'mpeg4')
        decoded = np.stack([f.to_ndarray(format='rgb24') for f in container.decode(video=0)])
      rendered = synthetic.render_clip(label, synthetic.clip_rng(0, code, index), FRAMES, SIZE)
      assert decoded.shape == rendered.shape, (split, rel)
      psnrs.append(_psnr(decoded, rendered))
  print(f'mp4 vs rendered PSNR: min {min(psnrs):.1f} dB, mean {np.mean(psnrs):.1f} dB')
  assert min(psnrs) > 25


def test_tfrecords_counts_labels_frames(dataset):
  paths, manifests = dataset['paths'], dataset['manifests']
  psnrs = []
  for split, code, name in synthetic.SPLITS:
    entries = dict(_read_list(paths[name]))
    assert manifests[split]['videos_written'] == len(entries)
    assert manifests[split]['videos_skipped'] == 0
    records = _records(paths['tfrecords'], split)
    assert len(records) == len(entries)
    seen = set()
    for ctx, frames in records:
      rel = ctx['video/filename'].decode()
      label = int(ctx['clip/label/index'])
      assert label == entries[rel]
      assert ctx['clip/label/text'].decode() == synthetic.CLASSES[label]
      assert (ctx['video/num_frames'], ctx['image/height'], ctx['image/width']) == (FRAMES, SIZE,
                                                                                   SIZE)
      assert frames.shape == (FRAMES, SIZE, SIZE, 3)
      index = int(os.path.splitext(os.path.basename(rel))[0])
      rendered = synthetic.render_clip(label, synthetic.clip_rng(0, code, index), FRAMES, SIZE)
      psnrs.append(_psnr(frames, rendered))
      seen.add(rel)
    assert seen == set(entries)
  print(f'TFRecord JPEG vs rendered PSNR: min {min(psnrs):.1f} dB, mean {np.mean(psnrs):.1f} dB')
  assert min(psnrs) > 25


def _files(directory):
  out = {}
  for root, _, names in os.walk(directory):
    for n in names:
      if n.endswith(('.mp4', '.tfrecord', '.txt')):
        with open(os.path.join(root, n), 'rb') as f:
          out[os.path.relpath(os.path.join(root, n), directory)] = f.read()
  return out


def test_deterministic_by_seed_and_cli(dataset, tmp_path, monkeypatch):
  monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)  # main() sets it; restored after
  first = _files(os.path.dirname(dataset['paths']['videos']))
  again = tmp_path / 'again'  # the CLI with its default --workers 2 (spawned), the fixture 1
  assert synthetic.main(['--output', str(again), '--num-train', str(NUM_TRAIN), '--num-val',
                         str(NUM_VAL), '--videos-per-shard', '8']) == 0
  second = _files(str(again))
  assert sorted(first) == sorted(second)
  assert any(k.endswith('.tfrecord') for k in first) and any(k.endswith('.mp4') for k in first)
  for key in first:
    assert first[key] == second[key], key
  other = _generate(tmp_path / 'other', seed=1)
  third = _files(os.path.dirname(other['paths']['videos']))
  assert [k for k in first if k.endswith('.tfrecord') and first[k] == third.get(k)] == []
  assert [k for k in first if k.endswith('.mp4') and first[k] == third.get(k)] == []


def test_cli_help():
  with pytest.raises(SystemExit) as e:
    synthetic.parse_args(['--help'])
  assert e.value.code == 0
  with pytest.raises(SystemExit):
    synthetic.parse_args(['--output', 'x', '--size', '63'])


def test_data_code_leaves_the_devices_alone(tmp_path, monkeypatch):
  # Converting in this process (workers=1, as the fixture does) must not hide the GPUs from JAX
  # in this process; only the converter's own command line and worker processes do.
  monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
  synthetic.generate(str(tmp_path / 'tiny'), num_train=2, num_val=2, frames=4, size=32,
                     workers=1, progress_interval=60.0)
  assert 'CUDA_VISIBLE_DEVICES' not in os.environ
  import jax  # pylint: disable=import-outside-toplevel
  assert jax.devices() and jax.devices()[0].platform == jax.default_backend()


def test_same_arguments_do_nothing_or_resume_others_need_overwrite(dataset, tmp_path, capsys):
  root = os.path.dirname(dataset['paths']['videos'])
  with open(os.path.join(root, synthetic.SPEC_FILE), encoding='utf-8') as f:
    record = json.load(f)
  assert record['version'] == synthetic.VERSION and record['seed'] == 0 and record['complete']
  before = _files(root)
  again = _generate(root)  # the same arguments: up to date
  assert 'is up to date' in capsys.readouterr().out
  assert again['manifests'] == dataset['manifests'] and _files(root) == before
  with pytest.raises(SystemExit, match=r'other settings \(seed 0 -> 1\); pass --overwrite'):
    _generate(root, seed=1)
  # A dataset of an older version (no synthetic.json) is replaced with --overwrite.
  copy = tmp_path / 'old'
  shutil.copytree(root, copy)
  os.remove(copy / synthetic.SPEC_FILE)
  (copy / 'videos' / 'train' / 'stale.mp4').write_bytes(b'old')
  older = rf'files of a synthetic dataset older than version {synthetic.VERSION} \(no synthetic'
  with pytest.raises(SystemExit, match=older + r'\.json\); pass --overwrite'):
    _generate(copy)
  _generate(copy, overwrite=True)
  assert _files(str(copy)) == before
  # A stopped run of the same arguments resumes without --overwrite: a lost shard is written
  # again, the others are kept, and the result is the same files.
  with open(copy / synthetic.SPEC_FILE, 'w', encoding='utf-8') as f:
    json.dump(dict(record, complete=False), f)
  shard = sorted((copy / 'tfrecords').glob('train-*.tfrecord'))[0]
  shard.unlink()
  capsys.readouterr()
  _generate(copy)
  printed = capsys.readouterr().out
  assert 'resuming the stopped run' in printed and 'resuming: 2 of 3 shards' in printed, printed
  assert _files(str(copy)) == before

"""Synthetic temporal dataset: pair property, determinism, mp4 files and converted TFRecords.

Measured (seed 0, 16x64x64): PSNR vs the rendered frames of the mp4 (libx264 CRF 18, yuv420p)
min 33.2 dB, mean 33.6 dB; of the TFRecord JPEGs (quality 90) min 31.9 dB, mean 32.9 dB. Within
each direction pair, nearest-centroid accuracy on time-averaged frames is 0.44-0.56 and on sorted
frames 0.46-0.56 (chance 0.5, 48 test clips); the motion-feature signs below get 1.0 on every pair.

Task long_range (seed 11, 32x32x32, 2 classes, 100 test clips): nearest-centroid accuracy on the
time-averaged frame 0.49, sorted frames 0.51, flash frames per colour 0.49, time-averaged 17-frame
windows 0.46-0.49 (chance 0.5); the whole-clip order of the detected flashes 1.0 (also on the
decoded mp4 and the TFRecord JPEGs at 32x32). From the generator's flashes (3000 draws per class),
every 17-frame window: chi2 / dof of the colour seen 0.76-3.09 (dof 3), a majority vote over the
exact window contents 0.499-0.512.
"""

import json
import os
import shutil

import numpy as np
import pytest

av = pytest.importorskip('av')
pytest.importorskip('tensorflow')

from dtf_jax.data import synthetic, video  # noqa: E402
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
  assert dataset['codec'] == video.video_codec()


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
  assert record['version'] == synthetic.VERSIONS['motion']
  assert record['seed'] == 0 and record['complete']
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
  older = r'files of a synthetic dataset written before synthetic\.json existed'
  with pytest.raises(SystemExit, match=older + r'; pass --overwrite'):
    _generate(copy)
  _generate(copy, overwrite=True)
  assert _files(str(copy)) == before
  # A record written before the task field is that of a motion dataset.
  assert record['task'] == 'motion'
  with open(copy / synthetic.SPEC_FILE, 'w', encoding='utf-8') as f:
    json.dump({k: v for k, v in record.items() if k != 'task'}, f)
  capsys.readouterr()
  _generate(copy)
  assert 'is up to date' in capsys.readouterr().out
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


# ---------------------------------------------------------------------------------------------
# Task long_range: the class is a relation between the first and the last quarter of the clip.

LR_FRAMES, LR_SIZE = 32, 32
LR_STEP = {0: 1, 1: 2}  # label -> colour step (mod 3) from the first flash to the second


def _lr_clips(labels, seed=0):
  return np.stack([synthetic.render_long_range_clip(int(label), synthetic.clip_rng(seed, 7, i),
                                                    LR_FRAMES, LR_SIZE)
                   for i, label in enumerate(labels)])


def _flash_colours(clips):
  """Per clip and frame: the flash colour seen (0..2), or -1.  ``N T``.

  A pixel shows colour ``c`` if its channel ``c`` exceeds both others by > 150 (a flash >= 170
  before noise, everything else < 130); a frame shows a flash if >= 5% of its pixels do (a flash
  covers >= 19%).
  """
  x = clips.astype(np.int16)
  counts = np.stack([(x[..., c] - np.maximum(x[..., (c + 1) % 3], x[..., (c + 2) % 3]) > 150)
                     .sum((2, 3)) for c in range(3)], -1)                        # N T 3
  return np.where(counts.max(-1) >= 0.05 * clips.shape[2] * clips.shape[3], counts.argmax(-1), -1)


def _order_label(colours):
  """The whole-clip feature: the class of the step from the first flash's colour to the last's.

  ``colours``: ``N T`` of ``_flash_colours`` -> labels ``N`` (-1 where < 2 colours are seen).
  """
  out = []
  for clip in colours:
    seen = clip[clip >= 0]
    step = (seen[-1] - seen[0]) % 3 if len(seen) else 0
    out.append(next((label for label, s in LR_STEP.items() if s == step), -1))
  return np.array(out)


def test_long_range_reversal_determinism_and_validation():
  for index in range(3):
    forward = synthetic.render_long_range_clip(0, synthetic.clip_rng(3, 0, index))
    backward = synthetic.render_long_range_clip(1, synthetic.clip_rng(3, 0, index))
    assert forward.shape == (32, 64, 64, 3) and forward.dtype == np.uint8
    np.testing.assert_array_equal(backward, forward[::-1])
  a = synthetic.render('long_range', 1, synthetic.clip_rng(0, 0, 0), LR_FRAMES, LR_SIZE)
  np.testing.assert_array_equal(a, synthetic.render_long_range_clip(
      1, synthetic.clip_rng(0, 0, 0), LR_FRAMES, LR_SIZE))
  assert not np.array_equal(a, synthetic.render_long_range_clip(
      1, synthetic.clip_rng(1, 0, 0), LR_FRAMES, LR_SIZE))
  np.testing.assert_array_equal(
      synthetic.render('motion', 3, synthetic.clip_rng(0, 0, 0), 8, 32),
      synthetic.render_clip(3, synthetic.clip_rng(0, 0, 0), 8, 32))
  for frames, size in ((8, 32), (16, 32), (48, 32), (64, 64)):
    assert synthetic.render_long_range_clip(0, synthetic.clip_rng(0, 0, 0), frames,
                                            size).shape == (frames, size, size, 3)
  with pytest.raises(ValueError, match=r'label 2 not in 0\.\.1'):
    synthetic.render_long_range_clip(2, synthetic.clip_rng(0, 0, 0))
  with pytest.raises(ValueError, match=r'label -1 not in 0\.\.1'):
    synthetic.long_range_events(-1, synthetic.clip_rng(0, 0, 0))
  with pytest.raises(ValueError, match='frames >= 8'):
    synthetic.render_long_range_clip(0, synthetic.clip_rng(0, 0, 0), 7)
  with pytest.raises(ValueError, match="task 'jumps' is not one of"):
    synthetic.render('jumps', 0, synthetic.clip_rng(0, 0, 0), 8, 32)
  assert synthetic.task_classes('long_range') == synthetic.LONG_RANGE_CLASSES
  assert synthetic.task_classes('motion') == synthetic.CLASSES


def test_long_range_events_layout():
  """One flash per end quarter, the colour step the class says, class 1 = class 0 reversed."""
  assert [synthetic.flash_duration(t) for t in (8, 16, 32, 64)] == [1, 2, 4, 8]
  for frames in (8, 9, 16, 32, 64):
    duration, quarter = synthetic.flash_duration(frames), frames // 4
    starts = set()
    for index in range(100):
      forward, backward = (synthetic.long_range_events(label, synthetic.clip_rng(0, 0, index),
                                                       frames) for label in (0, 1))
      np.testing.assert_array_equal(backward[:, 0], frames - duration - forward[::-1, 0])
      np.testing.assert_array_equal(backward[:, 1], forward[::-1, 1])
      for label, events in ((0, forward), (1, backward)):
        (s0, c0), (s1, c1) = events
        assert 0 <= s0 and s0 + duration <= quarter and frames - quarter <= s1, (frames, events)
        assert s1 + duration <= frames and (c1 - c0) % 3 == LR_STEP[label]
      starts.add(int(forward[0, 0]))
    assert starts == set(range(quarter - duration + 1)), frames  # every place in the quarter


def _window_content(events, start, length, duration):
  """Flashes seen in the window ``[start, start + length)``: ``((time - start, colour),)``."""
  return tuple(sorted((s - start, c) for s, c in events.tolist()
                      if s < start + length and s + duration > start))


def _bayes_accuracy(contents, labels):
  """Accuracy on the odd draws of the majority label per content in the even draws."""
  votes = {}
  for content, label in zip(contents[0::2], labels[0::2]):
    votes.setdefault(content, np.zeros(2))[label] += 1
  guess = [int(votes[c].argmax()) if c in votes else 0 for c in contents[1::2]]
  return float(np.mean(np.array(guess) == labels[1::2]))


def test_long_range_windows_carry_no_class_information():
  """From the generator's flashes: every window of up to ``long_range_window(T)`` frames, at any
  place in the clip, has the same distribution of contents (flash times, colours) for both
  classes; the whole clip decides the class."""
  frames, duration = LR_FRAMES, synthetic.flash_duration(LR_FRAMES)
  window = synthetic.long_range_window(frames)
  assert (window, synthetic.long_range_window(64), synthetic.long_range_window(16)) == (17, 33, 9)
  draws = 3000
  labels = np.repeat(np.arange(2), draws)
  events = [synthetic.long_range_events(int(label), synthetic.clip_rng(5, 0, i), frames)
            for i, label in enumerate(labels)]
  report = {}
  for start in range(frames - window + 1):  # a shorter window sees a part of one of these
    contents = [_window_content(e, start, window, duration) for e in events]
    # Coarse contents (the colour seen, 3 if none): chi2 homogeneity of the two classes.
    cells = np.array([content[0][1] if content else 3 for content in contents])
    table = np.stack([np.bincount(cells[labels == k], minlength=4) for k in range(2)])
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdims=True) * table.sum(0) / table.sum()
    chi2, dof = float(((table - expected) ** 2 / expected).sum()), table.shape[1] - 1
    report[start] = (round(chi2 / dof, 2), _bayes_accuracy(contents, labels))
    # chi2 ~ dof +- sqrt(2 dof) if the classes are the same; the majority vote over the exact
    # contents (times included) is at 0.5 +- 0.01 (3000 test draws).
    assert chi2 < dof + 5 * np.sqrt(2 * dof), report
    assert abs(report[start][1] - 0.5) < 0.045, report
  # The whole clip decides the class: the step from the first colour to the second.
  steps = [(e[1, 1] - e[0, 1]) % 3 for e in events]
  assert [LR_STEP[label] for label in labels] == steps
  print(f'long_range windows of {window} frames (start: chi2 / dof of the colour seen, '
        f'majority-vote accuracy): {report}')


def test_long_range_order_free_and_window_statistics_at_chance_whole_clip_order_separates():
  per_class = 100
  labels = np.repeat(np.arange(2), per_class)
  clips = _lr_clips(labels, seed=11)
  n = len(labels)
  colours = _flash_colours(clips)
  # The detector finds exactly the generator's flashes (rendered frames, 32x32).
  duration = synthetic.flash_duration(LR_FRAMES)
  for i, label in enumerate(labels):
    expected = -np.ones(LR_FRAMES, int)
    for start, colour in synthetic.long_range_events(int(label), synthetic.clip_rng(11, 7, i),
                                                     LR_FRAMES):
      expected[start:start + duration] = colour
    np.testing.assert_array_equal(colours[i], expected)
  flat = clips.reshape(n, LR_FRAMES, -1).astype(np.float32)
  window = synthetic.long_range_window(LR_FRAMES)
  acc = {'mean_frame': _nearest_centroid_accuracy(flat.mean(1), labels),
         'sorted_frames': _nearest_centroid_accuracy(np.sort(flat, 1).reshape(n, -1), labels),
         'flash_counts': _nearest_centroid_accuracy(  # per colour: flash frames
             np.stack([(colours == c).sum(-1) for c in range(3)], -1).astype(float), labels),
         'whole_clip_order': float(np.mean(_order_label(colours) == labels))}
  for start in (0, (LR_FRAMES - window) // 2, LR_FRAMES - window):
    part = slice(start, start + window)
    acc[f'window_{start}_mean'] = _nearest_centroid_accuracy(flat[:, part].mean(1), labels)
    acc[f'window_{start}_order'] = float(np.mean(_order_label(colours[:, part]) == labels))
  print(f'long_range accuracies (chance 0.5, {n // 2} test clips):', acc)
  assert acc.pop('whole_clip_order') == 1.0, acc
  for name, value in acc.items():
    # 100 test clips: chance 0.5 +- 0.05 (1 sd). The windowed order feature sees at most one
    # flash (no step), so it never names a class: 0.
    assert value <= 0.67, (name, acc)


def test_long_range_cli_dataset(tmp_path, monkeypatch):
  """``--task long_range``: 2 classes, 32 frames by default; the flashes survive H.264 and JPEG at
  32x32 (the whole-clip order feature is exact on the decoded frames)."""
  monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)  # main() sets it; restored after
  root = tmp_path / 'long_range'
  assert synthetic.main(['--output', str(root), '--task', 'long_range', '--num-train', '8',
                         '--num-val', '4', '--size', '32', '--workers', '1',
                         '--videos-per-shard', '4']) == 0
  with open(root / synthetic.SPEC_FILE, encoding='utf-8') as f:
    record = json.load(f)
  assert (record['task'], record['frames'], record['complete']) == ('long_range', 32, True)
  with open(root / 'classes.txt', encoding='utf-8') as f:
    assert [line.strip() for line in f] == list(synthetic.LONG_RANGE_CLASSES)
  for split, code, name in synthetic.SPLITS:
    entries = _read_list(root / name)
    assert [label for _, label in entries] == [i % 2 for i in range(len(entries))]
    decoded = []
    for rel, _ in entries:
      with av.open(str(root / 'videos' / rel)) as container:
        decoded.append(np.stack([f.to_ndarray(format='rgb24') for f in container.decode(video=0)]))
    labels = np.array([label for _, label in entries])
    assert np.array_equal(_order_label(_flash_colours(np.stack(decoded))), labels), split
    records = _records(str(root / 'tfrecords'), split)
    assert len(records) == len(entries)
    frames = np.stack([frames for _, frames in records])
    assert frames.shape == (len(entries), 32, 32, 32, 3)
    record_labels = np.array([int(ctx['clip/label/index']) for ctx, _ in records])
    assert [ctx['clip/label/text'].decode() for ctx, _ in records] == [
        synthetic.LONG_RANGE_CLASSES[label] for label in record_labels]
    assert np.array_equal(_order_label(_flash_colours(frames)), record_labels), split
    rendered = synthetic.render_long_range_clip(1, synthetic.clip_rng(0, code, 1), 32, 32)
    assert _psnr(decoded[1], rendered) > 25, split
  with pytest.raises(SystemExit, match=r'task long_range -> motion.*; pass --overwrite'):
    synthetic.generate(str(root), 8, 4, size=32, workers=1, videos_per_shard=4)
  with pytest.raises(SystemExit):
    synthetic.parse_args(['--output', 'x', '--task', 'long_range', '--frames', '7'])
  assert synthetic.parse_args(['--output', 'x', '--task', 'long_range']).frames == 32
  assert synthetic.parse_args(['--output', 'x']).frames == 16

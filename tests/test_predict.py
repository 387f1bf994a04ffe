"""``python -m dtf_jax.tools.predict``: a trained workdir's predictions on video files equal
``--mode=eval`` on the same videos converted; features, real files in several containers, a
corrupt file, the annotated video, a pretrained directory.

One tiny DTF ResNet (one bottleneck per stage, width 8, 4-frame 32x32 clips) trained for two
steps on a small synthetic dataset, evaluated with 2 clips x 3 crops, serves every test.
"""

import json
import os
import sys

import numpy as np
import pytest

av = pytest.importorskip('av')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import quickstart  # noqa: E402
from dtf_jax import pretrained  # noqa: E402
from dtf_jax.data import synthetic  # noqa: E402
from dtf_jax.tools import predict  # noqa: E402
from test_data_convert import _sample_dir  # noqa: E402

NUM_VAL = 4


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """``(root of the synthetic dataset, workdir, config, eval predictions by video id)``."""
  from dtf_jax import train  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('synthetic')
  synthetic.generate(str(root), num_train=16, num_val=NUM_VAL, frames=8, size=32, workers=1,
                     videos_per_shard=4, progress_interval=100)
  c = quickstart.get_config()
  c.data.dataset = f'tfrecord:{root / "tfrecords"}'
  c.model.width = 8
  c.data.clip_length, c.data.stride = 4, 2
  c.data.scale_range = (32, 36)
  c.data.shuffle_buffer = 16
  c.data.num_clips, c.data.num_crops = 2, 3
  c.batch_size, c.eval_batch_size = 8, 8
  c.total_steps = 2
  c.checkpoint_every_steps = 2
  workdir = tmp_path_factory.mktemp('run')
  train.train(c, str(workdir))
  train.evaluate_checkpoint(c, str(workdir))
  lines = (workdir / 'eval_step2' / 'predictions.jsonl').read_text().splitlines()
  return root, workdir, c, {line['id']: line for line in map(json.loads, lines)}


def _json_lines(capsys):
  return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_predictions_equal_eval_of_the_converted_videos(trained, capsys):
  root, workdir, config, eval_lines = trained
  files = [str(root / 'videos' / 'validation' / f'{i:06d}.mp4') for i in range(NUM_VAL)]
  assert predict.main(['--checkpoint', str(workdir), '--video', *files, '--json']) == 0
  got = _json_lines(capsys)
  assert [g['file'] for g in got] == files
  for g, i in zip(got, range(NUM_VAL)):
    want = eval_lines[f'validation/{i:06d}.mp4']
    assert g['views'] == config.data.num_clips * config.data.num_crops == 6
    assert [t['index'] for t in g['top']] == want['top5']
    assert [t['class'] for t in g['top']] == want['top5_names']
    np.testing.assert_allclose([t['score'] for t in g['top']], want['top5_scores'], atol=3e-6)
  protocol = predict.eval_protocol(str(workdir), pretrained.read_meta(str(workdir)))
  assert (protocol.encode.short_side, protocol.num_clips, protocol.num_crops, protocol.size) == (
      0, 2, 3, 32)  # the dataset's conversion (frames kept at 32x32) and the eval config


def test_real_files_features_corrupt_file_and_annotated_video(trained, tmp_path, capsys):
  root, workdir, _, _ = trained
  carphone = os.path.join(_sample_dir(), 'carphone_pristine.mp4')
  mkv = str(tmp_path / 'carphone.mkv')  # the same stream in another container
  with av.open(carphone) as inp, av.open(mkv, 'w') as out:
    stream = out.add_stream_from_template(inp.streams.video[0])
    for packet in inp.demux(inp.streams.video[0]):
      if packet.dts is not None:
        packet.stream = stream
        out.mux(packet)
  corrupt = tmp_path / 'corrupt.mp4'
  corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, np.uint8).tobytes())
  synthetic_file = str(root / 'videos' / 'validation' / '000001.mp4')
  files = [carphone, str(corrupt), mkv, synthetic_file]
  out_dir, npz = tmp_path / 'annotated', tmp_path / 'feats.npz'
  code = predict.main(['--checkpoint', str(workdir), '--video', *files, '--json', '--top', '3',
                       '--features', str(npz), '--per-view', '--out', str(out_dir)])
  assert code == 1  # the corrupt file was skipped
  lines = _json_lines(capsys)
  assert [line['file'] for line in lines] == files
  assert 'error' in lines[1] and 'top' not in lines[1]
  assert [len(line['top']) for line in lines if 'top' in line] == [3, 3, 3]
  # One stream in two containers: the same frames, the same scores.
  assert lines[0]['top'] == lines[2]['top']

  with np.load(npz) as f:
    arrays = {k: f[k] for k in f.files}
  assert list(arrays['files']) == [carphone, mkv, synthetic_file]
  model, variables = pretrained.load_pretrained(str(workdir))
  head = variables['params']['head']
  views = arrays['view_features']
  assert views.shape == (3, 6, head['kernel'].shape[0]) and views.dtype == np.float32
  np.testing.assert_allclose(arrays['features'], views.mean(1), rtol=1e-6)
  # The scores are the mean over views of softmax(head(feature)), computed here in float64.
  logits = views.astype(np.float64) @ np.asarray(head['kernel'], np.float64) + np.asarray(
      head['bias'], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(arrays['scores'], probs.mean(1), atol=2e-6)
  assert list(arrays['class_names']) == list(synthetic.CLASSES)

  for path in (carphone, synthetic_file):
    written = out_dir / (os.path.splitext(os.path.basename(path))[0] + '.mp4')
    with av.open(str(written)) as container:
      got = [frame.to_ndarray(format='rgb24') for frame in container.decode(video=0)]
    with av.open(path) as container:
      source = [frame.to_ndarray(format='rgb24') for frame in container.decode(video=0)]
    assert len(got) == len(source), path
    assert min(got[0].shape[:2]) >= predict.MIN_ANNOTATED_SIDE
    # The label box is drawn (black) on top; the rest of the frame is the video, upscaled.
    assert got[0][:3, :20].max() < 40


def test_pretrained_directory_and_usage_errors(trained, tmp_path, capsys):
  root, workdir, _, _ = trained
  model, variables = pretrained.load_pretrained(str(workdir))
  meta = pretrained.read_meta(str(workdir))
  kwargs = dict(meta['kwargs'])
  saved = pretrained.save_pretrained(str(tmp_path / 'pre'), meta['model'], kwargs, variables)
  protocol = predict.eval_protocol(saved, pretrained.read_meta(saved), clips=1, crops=1)
  assert (protocol.size, protocol.num_clips, protocol.num_crops, protocol.clip_length) == (
      256, 1, 1, 4)  # a ResNet's paper views at 256, --clips / --crops replacing the 10 x 3
  file = str(root / 'videos' / 'validation' / '000000.mp4')
  assert predict.main(['--checkpoint', saved, '--video', file, '--clips', '1', '--crops',
                       '1', '--top', '2']) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == file and len(out) == 3 and out[1].lstrip().startswith('1. class_')
  with pytest.raises(SystemExit):
    predict.parse_args(['--checkpoint', saved, '--video', file, '--per-view'])
  with pytest.raises(SystemExit):
    predict.parse_args(['--checkpoint', saved, '--video', file, '--out', str(tmp_path)])
  with pytest.raises(FileNotFoundError, match='neither a dtf_jax pretrained directory'):
    predict.main(['--checkpoint', str(tmp_path / 'nothing'), '--video', file])

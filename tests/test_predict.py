"""``python -m dtf_jax.tools.predict``: a trained workdir's predictions on video files equal
``--mode=eval`` on the same videos converted; features, real files in several containers, a
corrupt file, the annotated video, a pretrained directory. ``tools.visualize``: the plotted
filters, kernels and Grad-CAM against a direct computation.

One tiny DTF ResNet (one bottleneck per stage, width 8, 4-frame 32x32 clips) trained for two
steps on a small synthetic dataset, evaluated with 2 clips x 3 crops, serves every test.
"""

import json
import os
import shutil
import sys
import time

import numpy as np
import PIL.Image
import pytest

av = pytest.importorskip('av')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import quickstart  # noqa: E402
from dtf_jax import errors, pretrained  # noqa: E402
from dtf_jax.data import synthetic  # noqa: E402
from dtf_jax.tools import predict, visualize  # noqa: E402
from numpy_reference import dtf_block_numpy  # noqa: E402
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


def _one_line_error(main, argv, capsys):
  """Runs ``main`` as its command line does; returns its one-line error."""
  assert errors.run_main(main, argv) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err and err[-1].startswith('error: ') and 'Traceback' not in '\n'.join(err), err
  return err[-1]


def test_outputs_checked_before_any_work(trained, tmp_path, capsys):
  root, workdir, _, _ = trained
  video = root / 'videos' / 'validation' / '000000.mp4'
  original = video.read_bytes()
  existing = tmp_path / 'old.mp4'
  existing.write_bytes(b'keep me')
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  base = ['--checkpoint', str(workdir), '--video', str(video)]
  spelled = str(root / 'videos' / 'validation' / '..' / 'validation' / '000000.mp4')
  for flags, message in (
      (['--out', str(existing)], f'--out {existing} exists; pass --overwrite'),
      (['--out', str(video), '--overwrite'], f'--out {video} is the input {video}'),
      (['--out', spelled, '--overwrite'], f'--out {spelled} is the input {video}'),
      (['--features', str(video)], f'--features {video} is the input'),
      (['--out', str(a_file / 'sub' / 'o.mp4')], f'{a_file} is a file, not a folder'),
      (['--features', str(existing)], f'--features {existing} exists'),
  ):
    start = time.monotonic()
    assert message in _one_line_error(predict.main, base + flags, capsys)
    assert time.monotonic() - start < 5  # refused before the model is loaded
  assert video.read_bytes() == original and existing.read_bytes() == b'keep me'
  out = tmp_path / 'vis'
  out.mkdir()
  (out / 'index.html').write_text('earlier')
  vis = ['--checkpoint', str(workdir), '--video', str(video)]
  assert 'holds a visualization (index.html); pass --overwrite' in _one_line_error(
      visualize.main, vis + ['--out', str(out)], capsys)
  assert f'--out {a_file} is a file; give a folder' in _one_line_error(
      visualize.main, vis + ['--out', str(a_file)], capsys)
  assert (out / 'index.html').read_text() == 'earlier'


def test_work_bounded_by_the_video_urls_skipped_and_steps_checked(trained, tmp_path, capsys,
                                                                 monkeypatch):
  root, workdir, config, _ = trained
  file = str(root / 'videos' / 'validation' / '000003.mp4')  # 8 frames, clips span 7: 2 starts
  assert predict.main(['--checkpoint', str(workdir), '--video', file, '--json', '--clips', '2',
                       '--crops', '1']) == 0
  expected = _json_lines(capsys)[0]
  urls = ['http://127.0.0.1:9/a.mp4', f'file://{file}']
  code = predict.main(['--checkpoint', str(workdir), '--video', *urls, file, '--json',
                       '--clips', '100000', '--crops', '1', '--batch-size', '100000'])
  captured = capsys.readouterr()
  assert code == 1  # the URLs were skipped
  lines = [json.loads(line) for line in captured.out.splitlines()]
  for line, url in zip(lines, urls):
    assert line['error'].startswith(f'{url}: unsupported URL scheme {url.split(":")[0]}://')
  assert lines[2]['views'] == 2 and lines[2]['top'] == expected['top']
  assert '--clips 100000: the longest video has 2 distinct clip starts' in captured.err
  assert 'views: batch 1/1' in captured.err  # the batch is the 2 views, not 100000
  # A batch whose compiled forward needs more than the free memory: one line, before any batch.
  monkeypatch.setattr(predict, 'available_memory', lambda device: 2 ** 20)
  message = _one_line_error(predict.main, ['--checkpoint', str(workdir), '--video', file,
                                           '--clips', '2', '--crops', '3'], capsys)
  assert message.startswith('error: --batch-size 6: the forward pass of 6 views needs ')
  assert 'GiB are free; use --batch-size 1 or less' in message
  monkeypatch.undo()
  for step in ('999', '-5'):
    assert f'no checkpoint for step {step} (steps: [{config.total_steps}])' in _one_line_error(
        predict.main, ['--checkpoint', str(workdir), '--video', file, '--step', step], capsys)
  (tmp_path / 'empty').mkdir()
  assert 'neither a dtf_jax pretrained directory' in _one_line_error(
      visualize.main, ['--checkpoint', str(tmp_path / 'empty'), '--video', file, '--out',
                       str(tmp_path / 'v')], capsys)


def test_damaged_newest_checkpoint_and_another_model(trained, tmp_path, capsys):
  root, workdir, config, _ = trained
  file = str(root / 'videos' / 'validation' / '000001.mp4')
  argv = ['--video', file, '--json', '--clips', '1', '--crops', '1']
  assert predict.main(['--checkpoint', str(workdir)] + argv) == 0
  expected = _json_lines(capsys)[0]
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  step = config.total_steps
  shutil.copytree(copy / 'checkpoints' / str(step), copy / 'checkpoints' / '1')  # an older one
  for path in (copy / 'checkpoints' / str(step) / 'state').rglob('*'):
    if path.is_file() and path.parent.name == 'd':  # the arrays, overwritten in place
      path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
  assert predict.main(['--checkpoint', str(copy)] + argv) == 0
  captured = capsys.readouterr()
  assert json.loads(captured.out)['top'] == expected['top']
  assert f'skipped checkpoint {step} in {copy / "checkpoints"} does not restore' in captured.err
  assert 'using step 1' in captured.err
  assert len(captured.err.splitlines()) < 20, captured.err  # no tracebacks of leftover reads
  # With no intact checkpoint: one line.
  shutil.rmtree(copy / 'checkpoints' / '1')
  message = _one_line_error(predict.main, ['--checkpoint', str(copy)] + argv, capsys)
  assert f'checkpoint {step} in {copy / "checkpoints"} does not restore' in message
  # A config.json of another model than the checkpoint's: the shape report, one line.
  other = tmp_path / 'other'
  shutil.copytree(workdir, other)
  cfg = json.loads((other / 'config.json').read_text())
  cfg['model']['width'] = 16
  (other / 'config.json').write_text(json.dumps(cfg))
  message = _one_line_error(predict.main, ['--checkpoint', str(other)] + argv, capsys)
  assert 'the arrays do not fit the model' in message and 'of another shape' in message


# ---------------------------------------------------------------------------
# tools.visualize: the plotted numbers against a direct computation
# ---------------------------------------------------------------------------


def _visualize(workdir, file, out, *flags):
  assert visualize.main(['--checkpoint', str(workdir), '--video', file, '--out', str(out),
                         *flags]) == 0
  with np.load(out / 'values.npz') as f:
    return {k: f[k] for k in f.files}


def _view_and_intermediates(workdir, file):
  """The view visualize shows (clip 1 of 2, centre crop), the model's logits on it and every
  module's output (``capture_intermediates``)."""
  model, variables = pretrained.load_pretrained(str(workdir))
  meta = pretrained.read_meta(str(workdir))
  protocol = predict.eval_protocol(str(workdir), meta, crops=1)
  view = visualize.load_view(file, protocol, meta['class_names'], protocol.num_clips // 2)
  logits, state = model.apply(variables, view, train=False, capture_intermediates=True,
                              mutable=['intermediates'])
  return model, variables, view, np.asarray(logits[0], np.float64), state['intermediates']


def _kernel_by_definition(filt, steps):
  """``F C`` one-sided spectrum -> ``T' C`` kernel, summing the full Hermitian spectrum:
  ``k[n] = 1/T' sum_{f=0}^{T'-1} F_f exp(2 pi i f n / T')`` with ``F_{T'-f} = conj(F_f)`` (the
  imaginary parts of the bins that are their own mirror ignored, as the block's irfft does)."""
  full = np.zeros((steps,) + filt.shape[1:], np.complex128)
  for f in range(steps):
    full[f] = filt[f] if f < filt.shape[0] else np.conj(filt[steps - f])
    if f == 0 or 2 * f == steps:
      full[f] = full[f].real
  n = np.arange(steps)
  return np.real(np.exp(2j * np.pi * np.outer(n, n) / steps) @ full.reshape(steps, -1)).reshape(
      (steps,) + filt.shape[1:]) / steps


def test_visualize_filters_and_last_stage_gradcam_equal_a_direct_computation(trained, tmp_path):
  root, workdir, _, _ = trained
  file = str(root / 'videos' / 'validation' / '000002.mp4')
  out = tmp_path / 'vis'
  got = _visualize(workdir, file, out, '--stage', '4')
  for name in ('gradcam.png', 'filters.png'):
    with PIL.Image.open(out / name) as image:
      assert image.format == 'PNG' and min(image.size) > 200
  assert 'filters.png' in (out / 'index.html').read_text()

  model, variables, view, logits, inter = _view_and_intermediates(workdir, file)
  np.testing.assert_allclose(got['logits'], logits, atol=1e-5)
  target = int(np.argmax(logits))
  assert got['target'] == target and got['stage'] == 4
  # The last stage's output A feeds mean pooling and the linear head, so d logit / d A is
  # W[:, target] / (T' h w) everywhere and the Grad-CAM is A @ W[:, target] / (T' h w).
  act = np.asarray(inter['stage4_block0']['__call__'][0][0], np.float64)  # T' h w D
  head = np.asarray(variables['params']['head']['kernel'], np.float64)[:, target]
  np.testing.assert_allclose(got['cam'], act @ head / np.prod(act.shape[:3]), rtol=1e-5,
                             atol=1e-7)

  # The filters: the NumPy reference of the DTF block estimates each from the block's input
  # (the output of conv2) and the parameters, in float64.
  steps = view.shape[1]  # early_stride 1
  for stage in range(1, 5):
    x = np.asarray(inter[f'stage{stage}_block0']['conv2']['__call__'][0], np.float64)
    p = variables['params'][f'stage{stage}_block0']['temporal']
    s = variables['batch_stats'][f'stage{stage}_block0']['temporal']['spectrum_norm']
    kernel = np.asarray(p['filter_kernel'], np.float64)
    _, filt = dtf_block_numpy(
        x.transpose(0, 4, 1, 2, 3), kernel.transpose(2, 1, 0).reshape(kernel.shape[-1], -1),
        np.asarray(p['mix_kernel']).transpose(2, 1, 0), p['alpha'], p['bias'], s['mean'],
        s['var'], return_filter=True)  # filt: 1 C F H W
    height, width = x.shape[2:4]
    # The one Grad-CAM cell (1x1 map) is the whole image: its centre's cell in this stage.
    y, x_ = height // 2, width // 2
    want = filt[0, :, :, y, x_].T  # F C
    for where in ('largest', 'smallest'):
      prefix = f'stage{stage}_{where}_'
      assert tuple(got[prefix + 'cell']) == (y, x_)
      np.testing.assert_allclose(got[prefix + 'filter'], want, atol=2e-5, rtol=1e-4)
      magnitude = np.abs(want)
      np.testing.assert_allclose(got[prefix + 'magnitude'][0], magnitude.mean(1), atol=2e-5)
      np.testing.assert_allclose(got[prefix + 'magnitude'][1:],
                                 np.percentile(magnitude, (25, 75), axis=1), atol=2e-5)
      lagged = np.roll(_kernel_by_definition(want, steps), steps // 2, axis=0)
      np.testing.assert_allclose(got[f'stage{stage}_lags'], np.arange(steps) - steps // 2)
      np.testing.assert_allclose(got[prefix + 'kernel'][0], lagged.mean(1), atol=2e-5)
    assert np.abs(want).max() > 1e-3  # a real filter, not zeros

  # The kernel is what the block's modulation does: irfft(rfft(x) * F) is the circular
  # convolution of x with it, in the block's own transforms.
  from dtf_jax.layers.spectral import irfft_time, rfft_time
  filt = got['stage2_largest_filter']  # F C
  signal = np.random.default_rng(0).normal(size=(1, steps, filt.shape[1]))
  s_re, s_im = rfft_time(signal)
  f_re, f_im = filt.real[None], filt.imag[None]
  modulated = np.asarray(irfft_time(s_re * f_re - s_im * f_im, s_re * f_im + s_im * f_re,
                                    steps))[0]
  k = _kernel_by_definition(filt, steps)
  convolved = np.stack([sum(k[n] * signal[0, (t - n) % steps] for n in range(steps))
                        for t in range(steps)])
  np.testing.assert_allclose(modulated, convolved, atol=1e-4)


@pytest.mark.slow
def test_visualize_default_stage_gradcam_and_locations(trained, tmp_path, capsys):
  import jax  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  root, workdir, _, _ = trained
  file = str(root / 'videos' / 'validation' / '000003.mp4')
  got = _visualize(workdir, file, tmp_path / 'vis')
  printed = capsys.readouterr().out
  assert got['stage'] == 2  # maps 8, 4, 2, 1 wide: the deepest of at least 4x4
  model, variables, view, logits, inter = _view_and_intermediates(workdir, file)
  act = np.asarray(inter['stage2_block0']['__call__'][0][0], np.float64)  # T' 4 4 D
  np.testing.assert_allclose(got['cam'], act @ got['weights'], rtol=1e-5, atol=1e-6)
  # The weights are the mean over (t, y, x) of d logit / d A, here by differentiating a
  # function of stage 2's output (the model with that output replaced by the argument).
  target = int(got['target'])

  def logit_of(stage2_output):
    def replace(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      return stage2_output if context.module.path == ('stage2_block0',) else out
    with nn.intercept_methods(replace):
      return model.apply(variables, view, train=False)[0, target]

  gradient = np.asarray(jax.grad(logit_of)(jax.numpy.asarray(act[None], jax.numpy.float32)))
  np.testing.assert_allclose(got['weights'], gradient[0].mean((0, 1, 2)), rtol=1e-4, atol=1e-7)
  mean = got['cam'].mean(0)
  assert tuple(got['location_largest']) == np.unravel_index(mean.argmax(), mean.shape)
  assert tuple(got['location_smallest']) == np.unravel_index(mean.argmin(), mean.shape)
  assert mean.max() > mean.min()
  # A 4x4 cell at stage 2 contains the centre of the same-numbered 2x2 block at stage 1 (8x8).
  cell = tuple(int(c) for c in got['location_largest'])
  assert tuple(got['stage1_largest_cell']) == (2 * cell[0] + 1, 2 * cell[1] + 1)
  assert tuple(got['stage3_largest_cell']) == (cell[0] // 2, cell[1] // 2)
  assert f'largest at (y, x) = {cell}' in printed


def test_visualize_usage_errors(trained, tmp_path):
  root, workdir, _, _ = trained
  file = str(root / 'videos' / 'validation' / '000000.mp4')
  base = ['--checkpoint', str(workdir), '--video', file, '--out', str(tmp_path / 'v')]
  for flags in (['--stage', '5'], ['--class', 'no_such_class'], ['--clip', '2'],
                ['--block', '1']):
    with pytest.raises(SystemExit):
      visualize.main(base + flags)
  corrupt = tmp_path / 'corrupt.mp4'
  corrupt.write_bytes(b'\0' * 1000)
  assert visualize.main(['--checkpoint', str(workdir), '--video', str(corrupt), '--out',
                         str(tmp_path / 'c')]) == 1

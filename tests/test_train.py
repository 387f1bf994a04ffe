"""Trainer tests: sharded steps equal single-device ones, resume equals an uninterrupted run,
eval metrics equal a direct computation, init_from, config errors.

A tiny DTF ResNet (one bottleneck per stage, width 8) on 4-frame 32x32 clips of a small synthetic
dataset keeps every run to seconds. Runs that need 8 CPU devices happen in subprocesses (the device
count is fixed when JAX starts).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import base, quickstart  # noqa: E402
from dtf_jax import metrics  # noqa: E402

# Sharded vs single device: float32 sums in another order over 3 SGD steps.
SHARDED_RTOL = 2e-4


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  from dtf_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('synthetic')
  synthetic.generate(str(root), num_train=32, num_val=16, frames=8, size=32, workers=1,
                     videos_per_shard=8, progress_interval=100)
  return os.path.join(root, 'tfrecords')


def tiny_config(dataset, **overrides):
  c = quickstart.get_config()
  c.data.dataset = f'tfrecord:{dataset}'
  c.model.width = 8
  c.data.clip_length = 4
  c.data.stride = 2
  c.data.scale_range = (32, 36)
  c.data.shuffle_buffer = 32
  c.batch_size = 8
  c.eval_batch_size = 8
  c.total_steps = 6
  c.log_every_steps = 2
  c.checkpoint_every_steps = 3
  c.optimizer.name = 'sgd'
  c.lr.base = 0.05
  c.model.dropout_rate = 0.3  # exercises the per-step dropout rng
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def _flat(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------------------------
# Metrics against direct loops.


def test_metrics_against_direct_computation(tmp_path):
  rng = np.random.default_rng(0)
  num_videos, views, classes = 13, 6, 7
  index = np.repeat(np.arange(num_videos), views)
  perm = rng.permutation(len(index))
  scores = rng.dirichlet(np.ones(classes), len(index))[perm]
  index = index[perm]
  index = np.concatenate([index, [-1, -1]])  # padding views are ignored
  scores = np.concatenate([scores, np.full((2, classes), 9.0)])
  labels = rng.integers(0, classes, num_videos)
  video_scores, counts = metrics.aggregate_views(scores, index, num_videos)
  for v in range(num_videos):
    rows = [scores[i] for i in range(len(index)) if index[i] == v]
    np.testing.assert_allclose(video_scores[v], np.mean(rows, axis=0), rtol=1e-12)
    assert counts[v] == views
  result = metrics.classification_metrics(video_scores, labels)
  top1 = top5 = 0
  per_class = {}
  for v in range(num_videos):
    ranked = sorted(range(classes), key=lambda c: -video_scores[v, c])
    top1 += ranked[0] == labels[v]
    top5 += labels[v] in ranked[:5]
    per_class.setdefault(labels[v], []).append(ranked[0] == labels[v])
  assert result['top1'] == pytest.approx(top1 / num_videos)
  assert result['top5'] == pytest.approx(top5 / num_videos)
  assert result['mean_class_accuracy'] == pytest.approx(
      np.mean([np.mean(x) for x in per_class.values()]))
  predictions = np.argmax(video_scores, 1)
  matrix = metrics.confusion_matrix(predictions, labels, classes)
  for t in range(classes):
    for p in range(classes):
      assert matrix[t, p] == sum(1 for v in range(num_videos)
                                 if labels[v] == t and predictions[v] == p)
  names = [f'c{i}' for i in range(classes)]
  ids = [f'video{v}' for v in range(num_videos)]
  metrics.write_eval_report(str(tmp_path), video_scores, labels, ids, names, {'step': 3})
  with open(tmp_path / 'eval_results.json') as f:
    assert json.load(f) == dict(result, step=3, labelled=True)
  lines = [json.loads(x) for x in (tmp_path / 'predictions.jsonl').read_text().splitlines()]
  assert [x['id'] for x in lines] == ids
  for v, line in enumerate(lines):
    assert line['label'] == labels[v] and line['label_name'] == names[labels[v]]
    assert line['top5'] == sorted(range(classes), key=lambda c: -video_scores[v, c])[:5]
    assert line['top5_names'] == [names[c] for c in line['top5']]
    np.testing.assert_allclose(line['top5_scores'], video_scores[v, line['top5']], atol=1e-6)
  assert (tmp_path / 'confusion_matrix.png').read_bytes()[:4] == b'\x89PNG'

  # An unlabelled split (test sets: label -1): predictions, no accuracy, no confusion matrix.
  unlabelled = tmp_path / 'unlabelled'
  none = np.full(num_videos, -1)
  assert metrics.write_eval_report(str(unlabelled), video_scores, none, ids, names) == \
      {'num_videos': num_videos, 'labelled': False}
  results = json.loads((unlabelled / 'eval_results.json').read_text())
  assert 'top1' not in results and results['labelled'] is False, results
  lines = [json.loads(x) for x in (unlabelled / 'predictions.jsonl').read_text().splitlines()]
  assert [(x['label'], x['label_name']) for x in lines] == [(None, None)] * num_videos
  assert [x['top5'][0] for x in lines] == predictions.tolist()
  assert not (unlabelled / 'confusion_matrix.png').exists()
  with pytest.raises(ValueError, match='1 of 13 videos are unlabelled'):
    metrics.split_metrics(video_scores, np.where(np.arange(num_videos) == 4, -1, labels))
  with pytest.raises(ValueError, match=r'labels \[7\] are outside 0..6'):
    metrics.split_metrics(video_scores, np.where(np.arange(num_videos) == 4, 7, labels))


def test_video_ids_are_cut_on_a_character():
  from dtf_jax.train.evaluate import _utf8_prefix  # pylint: disable=import-outside-toplevel
  video_id = 'a' * 255 + 'é' + 'b'       # 'é' is bytes 256-257 of 258
  assert _utf8_prefix(video_id, 256) == b'a' * 255
  assert _utf8_prefix(video_id, 258) == video_id.encode()
  assert _utf8_prefix('日本', 256).decode() == '日本'


# ---------------------------------------------------------------------------------------------
# Resume, eval, init_from (in this process, one device).


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_eval_matches_direct(dataset, tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  from dtf_jax import train  # pylint: disable=import-outside-toplevel
  config = tiny_config(dataset)
  straight, _ = train.train(config, str(tmp_path / 'straight'))
  first, _ = train.train(config, str(tmp_path / 'resumed'), stop_after=3)
  assert int(first.step) == 3
  assert sorted(os.listdir(tmp_path / 'resumed' / 'checkpoints'))[:1] == ['3']
  # A resume with a config whose model the checkpoint does not fit fails, and leaves
  # config.json describing the checkpoints.
  saved_config = (tmp_path / 'resumed' / 'config.json').read_bytes()
  with pytest.raises(train.CheckpointError, match='checkpoint 3 in .* does not restore'):
    train.train(tiny_config(dataset, **{'model.width': 16}), str(tmp_path / 'resumed'))
  assert (tmp_path / 'resumed' / 'config.json').read_bytes() == saved_config
  resumed, _ = train.train(config, str(tmp_path / 'resumed'))
  assert int(resumed.step) == int(straight.step) == 6
  a, b = _flat(straight.params), _flat(resumed.params)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  for k, v in _flat(straight.batch_stats).items():
    np.testing.assert_array_equal(v, _flat(resumed.batch_stats)[k], err_msg=k)
  with open(tmp_path / 'resumed' / 'checkpoints' / '6' / 'progress' / 'metadata') as f:
    assert json.load(f) == {'step': 6, 'data_index': 6 * 8}
  assert not np.allclose(a['head/kernel'], _flat(first.params)['head/kernel'])

  # Eval of the final checkpoint against a direct computation on the same views.
  config.data.num_clips = 2
  config.data.num_crops = 3
  results = train.evaluate_checkpoint(config, str(tmp_path / 'resumed'))
  from dtf_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  source = pipeline.make_source(config.data.dataset, 'validation', process_count=1)
  data = pipeline.eval_dataset(source, batch_size=5, clip_length=4, stride=2, size=32,
                               num_clips=2, num_crops=3, process_index=0)
  model = train.build_model(config, 8)
  variables = {'params': straight.params, 'batch_stats': straight.batch_stats}
  apply = jax.jit(lambda x: jax.nn.softmax(model.apply(variables, x, train=False)))
  scores, index, labels, ids = [], [], {}, {}
  for batch in data.dataset.as_numpy_iterator():
    scores.append(np.asarray(apply(batch['video'])))
    index.append(np.where(batch['mask'], batch['video_index'], -1))
    for i in np.flatnonzero(batch['mask']):
      labels[int(batch['video_index'][i])] = int(batch['label'][i])
      ids[int(batch['video_index'][i])] = batch['video_id'][i].decode()
  video_scores, counts = metrics.aggregate_views(np.concatenate(scores), np.concatenate(index),
                                                 source.num_videos)
  assert np.all(counts == 6)
  label_array = np.array([labels[v] for v in range(source.num_videos)])
  direct = metrics.classification_metrics(video_scores, label_array)
  for key in ('top1', 'top5', 'mean_class_accuracy', 'num_videos'):
    assert results[key] == pytest.approx(direct[key]), key
  report = tmp_path / 'resumed' / 'eval_step6'
  lines = [json.loads(x) for x in (report / 'predictions.jsonl').read_text().splitlines()]
  assert [x['id'] for x in lines] == [ids[v] for v in range(source.num_videos)]
  for v, line in enumerate(lines):
    np.testing.assert_allclose(line['top5_scores'], np.sort(video_scores[v])[::-1][:5],
                               atol=2e-6)
  with open(report / 'eval_results.json') as f:
    saved = json.load(f)
  assert saved['step'] == 6 and saved['num_views'] == 6 * source.num_videos

  # A damaged latest checkpoint (its files cut in half): eval of that step fails with one line;
  # training resumes from the step before, sets the damaged one aside, and ends as before.
  checkpoints = tmp_path / 'resumed' / 'checkpoints'
  for path in (checkpoints / '6' / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  with pytest.raises(train.CheckpointError, match=r'^checkpoint 6 in \S+ does not restore: '):
    train.evaluate_checkpoint(tiny_config(dataset, eval_checkpoint_step=6),
                              str(tmp_path / 'resumed'))
  again, _ = train.train(tiny_config(dataset), str(tmp_path / 'resumed'))
  assert sorted(os.listdir(checkpoints)) == ['3', '6', '6.unreadable']
  for k, v in _flat(again.params).items():
    np.testing.assert_array_equal(v, a[k], err_msg=k)


@pytest.mark.slow
def test_init_from_pretrained_reinitialises_other_head(dataset, tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  from dtf_jax import pretrained, train  # pylint: disable=import-outside-toplevel
  donor_config = tiny_config(dataset)
  donor_config.data.num_classes = 5
  donor = train.build_model(donor_config, 5)
  video = np.zeros((1, 4, 32, 32, 3), np.float32)
  variables = jax.jit(donor.init, static_argnames='train')(jax.random.PRNGKey(7), video,
                                                          train=False)
  kwargs = train.model_kwargs(donor_config, 5)
  kwargs.pop('dtype')
  pretrained.save_pretrained(str(tmp_path / 'donor'), 'dtf_r50', kwargs, variables)
  config = tiny_config(dataset, init_from=str(tmp_path / 'donor'))
  s = train.setup(config)
  fresh = s.init_state()
  fresh_head = np.asarray(fresh.params['head']['kernel'])
  state = train.init_from(fresh, config.init_from, s)
  loaded, donor_flat = _flat(state.params), _flat(variables['params'])
  for k, v in loaded.items():
    if k.startswith('head/'):
      assert v.shape != donor_flat[k].shape
    else:
      np.testing.assert_array_equal(v, donor_flat[k], err_msg=k)
  np.testing.assert_array_equal(loaded['head/kernel'], fresh_head)
  # Another clip length changes the DTF filter shapes: an error naming them.
  config = tiny_config(dataset, init_from=str(tmp_path / 'donor'))
  config.data.clip_length = 8
  s = train.setup(config)
  with pytest.raises(ValueError, match=r'stage1_block0/temporal/filter_kernel: '
                     r'checkpoint \(4, 17, 3\) vs model \(8, 17, 5\)'):
    train.init_from(s.init_state(), config.init_from, s)
  with pytest.raises(FileNotFoundError, match='neither a dtf_jax pretrained directory'):
    train.init_from(s.init_state(), str(tmp_path), s)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(dataset, tmp_path):
  from dtf_jax import train  # pylint: disable=import-outside-toplevel
  config = tiny_config(dataset, total_steps=30, checkpoint_every_steps=1)
  config.optimizer.grad_clip_norm = 0.0
  config.lr.base = 1e12
  config.lr.warmup_epochs = 0.0
  with pytest.raises(train.NonFiniteLossError, match=r'at step (\d+)') as info:
    train.train(config, str(tmp_path))
  bad = int(info.value.args[0].split('at step ')[1].split(';')[0])
  steps = sorted(int(x) for x in os.listdir(tmp_path / 'checkpoints') if x.isdigit())
  assert steps and max(steps) < bad


# ---------------------------------------------------------------------------------------------
# 8 CPU devices: data-parallel and fsdp steps equal the single-device ones.

_STEPS_SCRIPT = textwrap.dedent(r'''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {repo!r})
    from tests.test_train import tiny_config
    from dtf_jax import train
    config = tiny_config({dataset!r}, **{overrides!r})
    s = train.setup(config)
    assert jax.device_count() == {devices}, jax.devices()
    state = s.init_state()
    step = train.make_train_step(s)
    batches = iter(train.train_data(config, s, 0))
    losses = []
    for i in range(3):
      batch = next(batches)
      # Flat regions of the rendered frames tie exactly in max-pool windows, where the gradient
      # is any subgradient: one partitioning rounds a tied pair apart in the last bit, the other
      # not, and the gradients then differ by up to 2e-2 (measured). 1e-3 of noise, the same in
      # every run, removes the ties.
      video = np.asarray(batch['video'])
      noise = np.random.default_rng(i).normal(0, 1e-3, video.shape)
      batch = dict(batch, video=(video + noise).astype(np.float32))
      state, m = step(state, train.to_global(batch, s.batch_sharding))
      losses.append(float(m['loss']))
    specs = sorted({{str(x.sharding.spec) for x in jax.tree.leaves(state.params)}})
    flat = {{'/'.join(str(getattr(k, 'key', k)) for k in p): np.asarray(v) for p, v in
             jax.tree_util.tree_flatten_with_path((state.params, state.batch_stats))[0]}}
    np.savez({out!r}, **flat)
    print(json.dumps({{'losses': losses, 'specs': specs}}))
''')


def _run_steps(dataset, tmp_path, name, devices, **overrides):
  out = str(tmp_path / f'{name}.npz')
  script = _STEPS_SCRIPT.format(repo=REPO, dataset=dataset, overrides=overrides, out=out,
                                devices=devices)
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
             '--xla_backend_optimization_level=0',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  return dict(np.load(out)), info


@pytest.mark.slow
def test_sharded_steps_match_single_device(dataset, tmp_path):
  single, single_info = _run_steps(dataset, tmp_path, 'single', 1)
  runs = {'data-parallel': _run_steps(dataset, tmp_path, 'dp', 8),
          'fsdp': _run_steps(dataset, tmp_path, 'fsdp', 8, **{'mesh.fsdp': 4})}
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  assert runs['data-parallel'][1]['specs'] == [str(P())]
  assert str(P(None, None, None, None, 'fsdp')) in runs['fsdp'][1]['specs']
  _compare(single, single_info, runs)
  # Gradient accumulation (2 micro-batches of 8, batch norm per micro-batch) on 8 devices.
  accum = {'batch_size': 16, 'grad_accum_steps': 2}
  single, single_info = _run_steps(dataset, tmp_path, 'accum1', 1, **accum)
  _compare(single, single_info, {'accumulated': _run_steps(dataset, tmp_path, 'accum8', 8,
                                                           **accum)})


# fsdp partitions the convolutions and the weight-gradient reductions differently from one
# device, so float32 rounding differs in every activation (data-parallel keeps each example's
# arithmetic and differs by ~1e-9 here). Parameters whose gradients nearly cancel (the zero-
# initialised DTF alpha, BN biases) then differ by up to 4e-6 absolute after the 3 steps
# (measured), against updates of ~2e-4: fsdp arrays are compared at FSDP_RTOL of max(|x|, 1e-2)
# (the worst measured 3.8e-4). A sharding error (statistics of the local batch, a missing gather)
# changes the updates themselves, 1e-4 to 1e-3 here, i.e. 1e-2 and more on that scale.
FSDP_FLOOR, FSDP_RTOL = 1e-2, 2e-3


def _compare(single, single_info, runs):
  for name, (arrays, info) in runs.items():
    np.testing.assert_allclose(info['losses'], single_info['losses'], rtol=SHARDED_RTOL,
                               err_msg=name)
    floor, rtol = (FSDP_FLOOR, FSDP_RTOL) if name == 'fsdp' else (1e-3, SHARDED_RTOL)
    for k, v in single.items():
      scale = max(np.abs(v).max(), floor)
      err = np.abs(arrays[k] - v).max() / scale
      assert err < rtol, f'{name}: {k} differs by {err:.2e} (relative to max(|x|, {floor}))'


# ---------------------------------------------------------------------------------------------
# Config errors.


def _main(*args, timeout=120):
  return subprocess.run([sys.executable, 'main.py', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_config_errors(dataset, tmp_path):
  cfg = '--config=configs/quickstart.py'
  proc = _main(cfg, f'--workdir={tmp_path}', '--config.model.nmae=c2d_r50')
  assert proc.returncode != 0 and 'nmae' in proc.stderr
  proc = _main(cfg, f'--workdir={tmp_path}', '--config.batch_size=lots')
  assert proc.returncode != 0 and 'batch_size' in proc.stderr
  proc = _main(cfg, f'--workdir={tmp_path}', '--config.model.name=dtf_r18')
  assert proc.returncode != 0 and "config.model.name: 'dtf_r18' is not one of" in proc.stderr
  proc = _main(cfg, '--workdir=gcs://bucket/run')  # a typo'd scheme is not a local folder
  assert proc.returncode != 0 and 'gcs://bucket/run: unsupported URL scheme' in proc.stderr
  assert not os.path.exists(os.path.join(REPO, 'gcs:'))
  proc = _main(cfg, f'--workdir={tmp_path / "absent"}', '--mode=eval',
               f'--config.data.dataset=tfrecord:{dataset}')
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
      'error: no checkpoint in'), proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / 'absent')  # eval creates nothing

  from dtf_jax import train  # pylint: disable=import-outside-toplevel
  for overrides, message in (
      ({'optimizer.name': 'lamb'}, "config.optimizer.name: 'lamb' must be"),
      ({'data.crop': 'centre'}, 'config.data.crop: must be in'),
      ({'grad_accum_steps': 3}, 'config.grad_accum_steps: 3 does not divide batch_size 8'),
      ({'data.dataset': dataset}, "config.data.dataset: .* must be 'tfrecord:DIR'"),
      ({'data.num_crops': 2}, 'config.data.num_crops: must be 1 or 3'),
      ({'data.dataset': 'tfrecord:ram://k400'}, 'config.data.dataset: ram://k400: unsupported'),
      ({'init_from': 'ftp://host/w.pth'}, 'config.init_from: ftp://host/w.pth: unsupported'),
      ({'distributed.initialize': 'maybe'}, 'config.distributed.initialize: .* must be one of'),
      ({'lr.base': -0.5}, r'config.lr.base: must be >= 0, got -0.5'),
      ({'checkpoint_every_steps': 0}, 'config.checkpoint_every_steps: must be a positive int'),
      ({'lr.base_batch': 0}, 'config.lr.base_batch: must be a positive int'),
      ({'model.dropout_rate': 1.0}, r'config.model.dropout_rate: must be in \[0, 1\)'),
      ({'model.remat': 'all'}, r"config.model: \w+: remat='all' is not allowed: must be one of"),
      ({'data.blur_prob': 1.5}, r'config.data.blur_prob: must be in \[0, 1\]'),
      ({'data.area_range': (0.5, 0.2)}, 'config.data.area_range: must be .* 0 < low <= high'),
      ({'optimizer.weight_decay': -1e-4}, 'config.optimizer.weight_decay: must be >= 0'),
      ({'model.early_stride': 2, 'data.clip_length': 7},
       r'config.model: \w+: clip_length=7 is not allowed: .* a multiple of 2')):
    with pytest.raises(ValueError, match=message):
      train.validate_config(tiny_config(dataset, **overrides))
  with pytest.raises(ValueError, match='num_classes=9 but .* has 8 classes'):
    train.setup(tiny_config(dataset, **{'data.num_classes': 9}))


class _Payload:
  """Unpickling this would create a file: what a malicious checkpoint could do instead."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


@pytest.mark.slow
def test_init_from_refused_or_mismatched_is_one_line(dataset, tmp_path):
  torch = pytest.importorskip('torch')
  marker, evil = tmp_path / 'code_ran', tmp_path / 'evil.pth'
  torch.save({'conv1.weight': torch.zeros(2), 'extra': _Payload(str(marker))}, evil)
  workdir = tmp_path / 'run'
  proc = _main('--config=configs/quickstart.py', f'--workdir={workdir}',
               f'--config.data.dataset=tfrecord:{dataset}', '--config.model.width=8',
               '--config.data.clip_length=4', '--config.data.stride=2',
               '--config.batch_size=8', f'--config.init_from={evil}')
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 1 and last.startswith('error: ') and str(evil) in last, proc.stderr
  assert 'weights-only' in last and 'Traceback' not in proc.stderr
  assert not marker.exists() and not (workdir / 'config.json').exists()
  assert not list(workdir.glob('checkpoints/[0-9]*'))
  # A checkpoint of another architecture: the arrays that do not fit, named.
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dtf_jax import pretrained, train  # pylint: disable=import-outside-toplevel
  from dtf_jax.models import create_model  # pylint: disable=import-outside-toplevel
  other = dict(num_classes=8, clip_length=4, width=16)
  model = create_model('dtf_r50', **other)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 32, 32, 3)))
  variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), variables)
  path = pretrained.save_pretrained(str(tmp_path / 'wide'), 'dtf_r50', other, variables)
  s = train.setup(tiny_config(dataset))
  with pytest.raises(pretrained.VariablesMismatchError,
                     match=rf'init_from {path}: .*shape mismatch \[.*checkpoint \(\d+,'):
    train.init_from(s.init_state(), path, s)


def test_config_files_and_arguments():
  assert base.parse_arg('32,ssv2', frames=16, dataset='k400') == {'frames': 32, 'dataset': 'ssv2'}
  assert base.parse_arg('dataset=ssv1', frames=16, dataset='k400')['dataset'] == 'ssv1'
  assert base.parse_arg(None, frames=16, dataset='k400') == {'frames': 16, 'dataset': 'k400'}
  with pytest.raises(ValueError, match='unknown key'):
    base.parse_arg('fps=3', frames=16, dataset='k400')
  with pytest.raises(ValueError, match="'ucf' is neither a frame count nor a dataset"):
    base.parse_arg('ucf', frames=16, dataset='k400')
  with pytest.raises(ValueError, match='dataset must be one of'):
    base.parse_arg('dataset=ucf', frames=16, dataset='k400')


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix, and starting from an ImageNet checkpoint file through main.py.


@pytest.mark.slow
def test_mixup_and_cutmix_against_direct_computation():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dtf_jax import train  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  video = rng.normal(size=(4, 3, 8, 10, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 3])
  targets = np.eye(5, dtype=np.float32)[labels]
  mix = jax.jit(train.mix_batch, static_argnums=(3, 4))
  kinds = set()
  for seed in range(12):
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
      out, soft = (np.asarray(x) for x in mix(jax.random.PRNGKey(seed), jnp.asarray(video),
                                                jnp.asarray(targets), mixup, cutmix))
      np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
      lam = soft[0, 0]  # example 0 is mixed with example 3: lam on label 0, 1 - lam on label 3
      np.testing.assert_allclose(soft[0, 3], 1 - lam, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(soft, lam * targets + (1 - lam) * targets[::-1], atol=1e-6)
      partner = video[::-1]
      if np.allclose(out, lam * video + (1 - lam) * partner, atol=1e-5) and 0 < lam < 1:
        kinds.add('mixup')
        assert cutmix == 0.0 or mixup > 0
        continue
      # CutMix: one box, the same in every example and frame, taken from the partner.
      from_partner = np.all(out == partner, axis=(0, 1, 4)) & ~np.all(out == video, axis=(0, 1, 4))
      assert np.all((out == video) | (out == partner))
      rows, cols = np.nonzero(from_partner)
      if rows.size:
        box = np.zeros_like(from_partner)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        np.testing.assert_array_equal(from_partner, box)
      np.testing.assert_allclose(1 - lam, from_partner.mean(), atol=1e-6)
      kinds.add('cutmix')
      assert mixup == 0.0 or cutmix > 0
  assert kinds == {'mixup', 'cutmix'}


@pytest.mark.slow
def test_init_from_imagenet_file_through_main(dataset, tmp_path):
  """A torchvision-layout ResNet file (one bottleneck per stage, real key names) inflated into the
  quickstart DTF model by main.py; with lr 0 the trained checkpoint keeps the converted weights,
  and the workdir loads back with load_pretrained."""
  import torch  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(REPO, 'tests'))
  from test_inflation import torchvision  # pylint: disable=import-outside-toplevel
  from dtf_jax import convert  # pylint: disable=import-outside-toplevel
  from dtf_jax.pretrained import load_pretrained, read_meta  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  net = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1])
  src = tmp_path / 'resnet_1111.pth'
  torch.save(net.state_dict(), src)
  workdir = tmp_path / 'run'
  proc = _main('--config=configs/quickstart.py', f'--workdir={workdir}',
               f'--config.data.dataset=tfrecord:{dataset}', f'--config.init_from={src}',
               '--config.init_stem=average', '--config.model.width=64',
               '--config.model.early_stride=2', '--config.data.clip_length=4',
               '--config.data.stride=2', '--config.total_steps=2', '--config.batch_size=8',
               '--config.data.shuffle_buffer=32', '--config.lr.base=0', '--config.log_every_steps=1',
               '--config.mixup_alpha=0.8', '--config.cutmix_alpha=1.0', timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  log = proc.stdout + proc.stderr
  assert 'imagenet_resnet checkpoint (torchvision layout)' in log
  assert 'conv1.weight -> stem_conv/kernel: 2D kernel inflated to 2 frames (average)' in log
  assert 'params/stage4_block0/temporal/filter_kernel' in log and 'new classifier head' in log

  model, variables = load_pretrained(str(workdir))
  assert model.width == 64 and model.early_stride == 2 and model.num_classes == 8
  meta = read_meta(str(workdir))
  with open(os.path.join(dataset, 'label_map.json')) as f:
    label_map = json.load(f)
  assert meta['class_names'] == sorted(label_map, key=label_map.get)
  loaded, report = convert.map_state_dict(model, net.state_dict(), stem_init='average')
  params = _flat(variables['params'])
  for path, value in loaded['params'].items():
    np.testing.assert_array_equal(params[path], value, err_msg=path)  # lr 0: unchanged
  stem = net.state_dict()['conv1.weight'].numpy().transpose(2, 3, 1, 0) / 2
  np.testing.assert_allclose(params['stem_conv/kernel'], np.stack([stem, stem]), rtol=1e-6)
  assert {t for t, _, _ in report.initialised} >= {'params/head/kernel', 'params/head/bias'}
  with pytest.raises(FileNotFoundError, match=r'no checkpoint for step 5 \(steps: \[2\]\)'):
    load_pretrained(str(workdir), step=5)

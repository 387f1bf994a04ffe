"""End-to-end runs of ``main.py`` / ``dtf_jax.train`` in subprocesses: several processes, SIGTERM,
and restoring a checkpoint onto another device count.

Every run is a fresh Python process with its own ``XLA_FLAGS`` (``--xla_force_host_platform_device
_count=N`` only acts before JAX starts its backend), so this file itself never touches JAX. The
model is the quickstart DTF ResNet cut down to width 8 and 4-frame 32x32 clips on a tiny synthetic
TFRecord dataset (32 train / 16 validation videos), generated once per module. The validation split
is written as 3 shards (5, 5 and 6 videos), so with 2 processes the hosts hold 11 and 5 videos and
the eval padding and the cross-host gather are exercised with uneven hosts.

``--xla_backend_optimization_level=0`` is set in the children: it changes nothing the tests look at
and more than halves the compile times on a CPU.

1. Two ``main.py`` processes on localhost (``jax.distributed`` + gloo), 2 CPU devices each,
   ``--mode=train_and_eval`` for 2 steps: the checkpoint and the eval report cover every
   validation video exactly once.
2. Everything in a bucket (``gs://``, served by a local Cloud Storage, ``local_gcs.py``): the
   converter's command line converts videos and lists from the bucket into the bucket
   (byte-identical to a local conversion); SIGTERM during ``--mode=train`` gives exit code 0 and a
   checkpoint at the step reached; ``--mode=eval`` on it; ``--mode=train`` resumes from it to two
   steps further; ``load_pretrained`` of the bucket workdir equals that of a local copy.
3. A checkpoint written on 8 devices with parameters sharded (``mesh.fsdp=2``) restores exactly on
   2 devices (replicated and fsdp=2), and training resumes from it there.

On a failure the message carries the child's output (the parameter table left out).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 420  # seconds for any one child process (typically 10-40 s)
NUM_TRAIN, NUM_VAL = 32, 16

# The quickstart config shrunk for CPU tests (dataset added per run).
TINY = {
    'model.width': 8,
    'data.clip_length': 4,
    'data.stride': 4,
    'batch_size': 8,
    'eval_batch_size': 8,
    'log_every_steps': 1,
}


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """``(tfrecord dir, validation video ids)`` of a tiny synthetic dataset."""
  from dtf_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  out = str(tmp_path_factory.mktemp('synthetic'))
  info = synthetic.generate(out, num_train=NUM_TRAIN, num_val=NUM_VAL, frames=8, size=32,
                            workers=1, videos_per_shard=6, progress_interval=60.0)
  with open(info['paths']['val.txt']) as f:
    val_ids = [line.split()[0] for line in f if line.strip()]
  assert len(val_ids) == NUM_VAL
  shards = [s['videos'] for s in info['manifests']['validation']['shards']]
  assert len(shards) >= 2, shards  # at least as many files as processes
  return info['paths']['tfrecords'], val_ids


def _env(devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={devices} '
                      '--xla_backend_optimization_level=0')
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONUNBUFFERED'] = '1'
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return env


def _main_cmd(workdir, mode, data_dir, **overrides):
  fields = dict(TINY, **{'data.dataset': f'tfrecord:{data_dir}'})
  fields.update({k.replace('__', '.'): v for k, v in overrides.items()})
  return ([sys.executable, os.path.join(REPO, 'main.py'), '--config=configs/quickstart.py',
           f'--workdir={workdir}', f'--mode={mode}'] +
          [f'--config.{k}={v}' for k, v in fields.items()])


def _readable(output, limit=8000):
  """The child's output without the parameter table, at most ``limit`` characters (the end)."""
  lines = [l for l in output.splitlines() if not l.startswith(('| ', '+-'))]
  text = '\n'.join(lines)
  return text if len(text) <= limit else '...' + text[-limit:]


def _run(cmd, devices, what, timeout=TIMEOUT, gcs=None):
  """Runs a child to completion (stdout + stderr together); fails with its output unless rc 0.
  ``gcs``: a local Cloud Storage (local_gcs.py) that the child's gs:// URLs reach."""
  start = time.monotonic()
  env = gcs.child_env(_env(devices)) if gcs is not None else _env(devices)
  try:
    proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired as e:
    output = e.output.decode() if isinstance(e.output, bytes) else (e.output or '')
    pytest.fail(f'{what}: no exit after {timeout} s; output:\n{_readable(output)}')
  print(f'{what}: {time.monotonic() - start:.1f} s')
  assert proc.returncode == 0, (f'{what} exited with {proc.returncode}; output:\n'
                                f'{_readable(proc.stdout)}')
  return proc.stdout


def _python_cmd(script, **values):
  return [sys.executable, '-c', textwrap.dedent(script).format(**values)]


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _steps_dir(workdir):
  path = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def _progress(workdir, step):
  with open(os.path.join(workdir, 'checkpoints', str(step), 'progress', 'metadata')) as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------------
# 1. Two processes on localhost.


@pytest.mark.slow
def test_two_processes_train_and_eval(dataset, tmp_path):
  data_dir, val_ids = dataset
  workdir = str(tmp_path / 'run')
  port = _free_port()
  procs, logs = [], []
  start = time.monotonic()
  for i in range(2):
    # distributed.initialize='auto' (the default) detects JAX_COORDINATOR_ADDRESS.
    cmd = _main_cmd(workdir, 'train_and_eval', data_dir, total_steps=2,
                    distributed__num_processes=2, distributed__process_id=i,
                    distributed__cpu_collectives='gloo')
    log = open(tmp_path / f'process{i}.log', 'w+')  # files: no pipe to drain while polling
    logs.append(log)
    env = dict(_env(2), JAX_COORDINATOR_ADDRESS=f'localhost:{port}')
    procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT, text=True))
  # If one process fails the other would wait minutes for it in a collective or in
  # jax.distributed.initialize: give it a short grace period, then stop it.
  first_failure = None
  while any(p.poll() is None for p in procs):
    now = time.monotonic()
    if first_failure is None and any(p.poll() not in (None, 0) for p in procs):
      first_failure = now
    if now - start > TIMEOUT or (first_failure is not None and now - first_failure > 30):
      for p in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.2)
  codes = [p.wait() for p in procs]
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  print(f'2 processes: {time.monotonic() - start:.1f} s, exit codes {codes}')
  report = '\n'.join(f'--- process {i} (exit code {c}):\n{_readable(o, 6000)}'
                     for i, (c, o) in enumerate(zip(codes, outputs)))
  assert codes == [0, 0], report
  assert '[JAX_COORDINATOR_ADDRESS=localhost:' in outputs[1], report
  # One mesh over both processes' devices.
  assert "mesh {'data': 4, 'fsdp': 1}" in outputs[0], report

  assert 2 in _steps_dir(workdir), (_steps_dir(workdir), report)
  assert _progress(workdir, 2) == {'step': 2, 'data_index': 2 * 8 // 2}
  eval_dir = os.path.join(workdir, 'eval_step2')
  with open(os.path.join(eval_dir, 'eval_results.json')) as f:
    results = json.load(f)
  assert results['num_videos'] == NUM_VAL, results
  assert results['num_views'] == NUM_VAL, results  # one view per video, each counted once
  assert results['step'] == 2, results
  with open(os.path.join(eval_dir, 'predictions.jsonl')) as f:
    ids = [json.loads(line)['id'] for line in f if line.strip()]
  assert len(ids) == NUM_VAL and len(set(ids)) == NUM_VAL, ids
  assert sorted(ids) == sorted(val_ids), ids


# ---------------------------------------------------------------------------------------------
# 2. Everything in a bucket (gs://, a local Cloud Storage, see local_gcs.py): convert, train,
#    SIGTERM, eval, resume, load_pretrained.

_TRAIN_LINE = re.compile(r'\[(\d+)\] .*train/loss=')


@pytest.fixture(scope='module')
def gcs():
  from local_gcs import local_gcs  # pylint: disable=import-outside-toplevel
  with local_gcs('dtf-test') as bucket:
    yield bucket


def _gcs_steps(gcs, run):
  """Finished checkpoint steps of ``gs://dtf-test/{run}`` (orbax marks them commit_success.txt
  in a bucket, where it cannot rename)."""
  names = gcs.object_names(f'{run}/checkpoints/')
  return sorted(int(n.split('/')[-2]) for n in names
                if n.endswith('/commit_success.txt') and n.split('/')[-2].isdigit())


def _gcs_json(gcs, name):
  return json.loads(gcs.read(name))


def _convert_into_bucket(gcs, local_dataset):
  """Uploads the synthetic videos and lists, converts them bucket to bucket with the converter's
  command line, and checks the shards against those converted on local disk."""
  synthetic = os.path.dirname(local_dataset)
  count = gcs.upload_dir(os.path.join(synthetic, 'videos'), 'synthetic/videos')
  for name in ('train.txt', 'val.txt', 'classes.txt'):
    with open(os.path.join(synthetic, name), 'rb') as f:
      gcs.upload(f'synthetic/{name}', f.read())
  assert count == NUM_TRAIN + NUM_VAL
  b = gcs.url
  _run([sys.executable, '-m', 'dtf_jax.data.convert', 'list',
        '--split', f'train={b}/synthetic/train.txt', '--split', f'validation={b}/synthetic/val.txt',
        '--root', f'{b}/synthetic/videos', '--class-names', f'{b}/synthetic/classes.txt',
        '--output', f'{b}/data', '--videos-per-shard', '6', '--short-side', '0',
        '--min-frames', '8'], 1, 'convert into the bucket', gcs=gcs)
  shards = sorted(n for n in os.listdir(local_dataset) if n.endswith('.tfrecord'))
  assert [n for n in gcs.object_names('data/') if n.endswith('.tfrecord')] == \
      [f'data/{n}' for n in shards]
  for n in shards + ['label_map.json']:
    with open(os.path.join(local_dataset, n), 'rb') as f:
      assert gcs.read(f'data/{n}') == f.read(), n  # byte-identical to the local conversion
  return f'{b}/data'


_LOAD = r"""
    import jax
    import numpy as np
    from dtf_jax import pretrained
    model, remote = pretrained.load_pretrained({remote!r})
    _, local = pretrained.load_pretrained({local!r})
    # A pretrained directory in the bucket, written, then replaced (no directory renames).
    meta, copy = pretrained.read_meta({remote!r}), {remote!r} + '_pretrained'
    zeros = jax.tree.map(np.zeros_like, remote)
    pretrained.save_pretrained(copy, meta['model'], meta['kwargs'], zeros)
    pretrained.save_pretrained(copy, meta['model'], meta['kwargs'], remote, overwrite=True)
    _, replaced = pretrained.load_pretrained(copy)
    assert jax.tree.all(jax.tree.map(np.array_equal, replaced, local))
    flat = lambda tree: {{jax.tree_util.keystr(p): np.asarray(x)
                          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}}
    remote, local = flat(remote), flat(local)
    assert sorted(remote) == sorted(local), (sorted(remote), sorted(local))
    assert any(k.endswith("['temporal']['filter_kernel']") for k in remote), sorted(remote)
    assert all(np.array_equal(remote[k], local[k]) for k in remote)
    print('LOADED', type(model).__name__, len(remote), 'arrays equal')
"""


@pytest.mark.slow
def test_bucket_convert_train_sigterm_eval_resume_load(dataset, gcs, tmp_path):
  data_dir = _convert_into_bucket(gcs, dataset[0])
  run = 'runs/sigterm'
  workdir = f'{gcs.url}/{run}'
  start = time.monotonic()
  proc = subprocess.Popen(
      _main_cmd(workdir, 'train', data_dir, total_steps=500, checkpoint_every_steps=1000),
      env=gcs.child_env(_env(2)), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, '')),
                            daemon=True)
  reader.start()
  try:
    while True:
      steps = [int(m.group(1)) for m in map(_TRAIN_LINE.search, list(lines)) if m]
      if steps and max(steps) >= 2:
        break
      if proc.poll() is not None or time.monotonic() - start > TIMEOUT:
        proc.kill()
        reader.join(10)
        pytest.fail(f'training did not reach step 2 (exit code {proc.poll()}); output:\n'
                    f'{_readable("".join(lines))}')
      time.sleep(0.1)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
      code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
      proc.kill()
      code = None
    reader.join(10)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  output = ''.join(lines)
  print(f'train until SIGTERM: {signalled - start:.1f} s, exit {time.monotonic() - signalled:.1f} '
        f's after it')
  assert code == 0, f'exit code {code} after SIGTERM; output:\n{_readable(output)}'
  assert 'distributed: single host (initialize=auto' in output, _readable(output)
  saved = re.search(r'SIGTERM: saved step (\d+)', output)
  assert saved, f'no "SIGTERM: saved step" message; output:\n{_readable(output)}'
  step = int(saved.group(1))
  assert 2 <= step < 500, step
  assert _gcs_steps(gcs, run) == [step], (gcs.object_names(run), _readable(output))
  assert _gcs_json(gcs, f'{run}/checkpoints/{step}/progress/metadata') == \
      {'step': step, 'data_index': step * 8}
  assert _gcs_json(gcs, f'{run}/config.json')['data']['dataset'] == f'tfrecord:{data_dir}'
  assert any('/events.out.tfevents.' in n for n in gcs.object_names(run))  # TensorBoard

  # Eval of the SIGTERM checkpoint.
  _run(_main_cmd(workdir, 'eval', data_dir, total_steps=500), 2, 'eval after SIGTERM', gcs=gcs)
  results = _gcs_json(gcs, f'{run}/eval_step{step}/eval_results.json')
  assert results['step'] == step and results['num_videos'] == NUM_VAL, results
  assert f'{run}/eval_step{step}/confusion_matrix.png' in gcs.object_names(run)

  # Resume to two steps further.
  output = _run(_main_cmd(workdir, 'train', data_dir, total_steps=step + 2), 2, 'resume', gcs=gcs)
  assert f'resumed from {workdir}/checkpoints/{step} ' in output, _readable(output)
  resumed_steps = sorted(int(m.group(1)) for m in map(_TRAIN_LINE.search,
                                                      output.splitlines()) if m)
  assert resumed_steps == [step + 1, step + 2], (resumed_steps, _readable(output))
  assert step + 2 in _gcs_steps(gcs, run), _gcs_steps(gcs, run)
  assert _gcs_json(gcs, f'{run}/checkpoints/{step + 2}/progress/metadata') == \
      {'step': step + 2, 'data_index': (step + 2) * 8}

  # load_pretrained from the bucket equals load_pretrained of a local copy of the workdir.
  local = tmp_path / 'copy'
  for name in gcs.object_names(f'{run}/'):
    if name.endswith('/'):  # folder markers
      continue
    if name == f'{run}/config.json' or f'/checkpoints/{step + 2}/' in name:
      target = local / name[len(run) + 1:]
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(gcs.read(name))
  output = _run(_python_cmd(_LOAD, remote=workdir, local=str(local)), 1, 'load_pretrained',
                gcs=gcs)
  assert 'arrays equal' in output, _readable(output)
  prefix = f'{run}_pretrained/'
  left = {n[len(prefix):].split('/')[0] for n in gcs.object_names(prefix)} - {''}
  assert left == {'meta.json', 'variables.next'}, gcs.object_names(prefix)  # the old one removed

  # Both clients reached the bucket (TensorFlow through the proxy, tensorstore directly), and no
  # URL became a local folder.
  assert {via for via, *_ in gcs.requests()} == {'proxy', 'direct'}
  for folder in (REPO, str(tmp_path), os.path.dirname(dataset[0])):
    assert not any(n.startswith('gs:') for n in os.listdir(folder)), folder


# ---------------------------------------------------------------------------------------------
# 3. Restore onto another device count.

_CONFIG = r'''
    from configs import quickstart

    def make_config(**fields):
      c = quickstart.get_config()
      for key, value in dict({tiny!r}, **fields).items():
        *parents, name = key.split('.')
        node = c
        for p in parents:
          node = node[p]
        node[name] = value
      return c
'''

_TRAIN_8 = _CONFIG + r'''
    import jax
    import numpy as np
    from dtf_jax import train
    assert jax.device_count() == 8, jax.devices()
    config = make_config(**{{'data.dataset': 'tfrecord:{data_dir}', 'mesh.fsdp': 2,
                            'total_steps': 2}})
    state, _ = train.train(config, {workdir!r})
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    sharded = [jax.tree_util.keystr(p) for p, x in leaves if not x.sharding.is_fully_replicated]
    print('SHARDED', len(sharded), sharded[:3])
    assert any('params' in k for k in sharded), sharded
    np.savez({arrays!r}, **{{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}})
'''

_RESTORE_2 = _CONFIG + r'''
    import jax
    import numpy as np
    from dtf_jax import train
    assert jax.device_count() == 2, jax.devices()
    saved = dict(np.load({arrays!r}))
    manager = train.checkpoint_manager({workdir!r}, 3)
    assert manager.latest_step() == 2, manager.all_steps()
    for fsdp in (1, 2):
      config = make_config(**{{'data.dataset': 'tfrecord:{data_dir}', 'mesh.fsdp': fsdp,
                              'total_steps': 3}})
      s = train.setup(config, with_train_data=False)
      state, progress = train.restore_checkpoint(manager, 2, s)
      assert progress == {{'step': 2, 'data_index': 16}}, progress
      leaves = jax.tree_util.tree_flatten_with_path(state)[0]
      restored = {{jax.tree_util.keystr(p): x for p, x in leaves}}
      assert sorted(restored) == sorted(saved), (sorted(restored), sorted(saved))
      replicated = [x.sharding.is_fully_replicated for x in restored.values()]
      assert all(replicated) if fsdp == 1 else not all(replicated), (fsdp, replicated)
      for key, x in restored.items():
        assert x.sharding.mesh.devices.size == 2, (key, x.sharding)
        a = np.asarray(x)
        assert a.dtype == saved[key].dtype and a.shape == saved[key].shape, key
        assert np.array_equal(a, saved[key]), f'fsdp={{fsdp}}: {{key}} differs'
      print(f'RESTORED fsdp={{fsdp}}: {{len(restored)}} arrays equal')
    manager.close()
    # Resume for one step on 2 devices (replicated).
    config = make_config(**{{'data.dataset': 'tfrecord:{data_dir}', 'total_steps': 3}})
    state, _ = train.train(config, {workdir!r})
    assert int(state.step) == 3, state.step
    print('RESUMED to', int(state.step))
'''


@pytest.mark.slow
def test_restore_on_other_device_count(dataset, tmp_path):
  data_dir, _ = dataset
  workdir = str(tmp_path / 'run')
  arrays = str(tmp_path / 'state8.npz')
  values = dict(tiny=TINY, data_dir=data_dir, workdir=workdir, arrays=arrays)
  output = _run(_python_cmd(_TRAIN_8, **values), 8, 'train on 8 devices (fsdp=2)')
  assert "mesh {'data': 4, 'fsdp': 2}" in output, _readable(output)
  print(next(line for line in output.splitlines() if line.startswith('SHARDED')))
  assert _steps_dir(workdir) == [2]
  output = _run(_python_cmd(_RESTORE_2, **values), 2, 'restore and resume on 2 devices')
  assert 'RESTORED fsdp=1' in output and 'RESTORED fsdp=2' in output, _readable(output)
  assert re.search(r'resumed from \S*checkpoints/2 ', output), _readable(output)
  assert 'RESUMED to 3' in output, _readable(output)
  assert _steps_dir(workdir) == [2, 3]

"""The path layer (dtf_jax.storage) and multi-host detection (dtf_jax.multihost), offline."""

import json
import os

import pytest

from dtf_jax import multihost, storage


def test_local_paths_become_absolute_and_urls_stay(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(storage.path('runs/a')) == str(tmp_path / 'runs' / 'a')
  assert str(storage.path('gs://bucket/runs/a')) == 'gs://bucket/runs/a'
  assert str(storage.path('gs://bucket/runs') / 'a' / 'config.json') == \
      'gs://bucket/runs/a/config.json'
  assert storage.is_url('gs://b/x') and not storage.is_url('/tmp/gs:/b')
  for url in ('ftp://x/y', 's3://bucket/run', 'az://c/run', 'gcs://bucket/run'):
    scheme = url.split('://')[0]
    with pytest.raises(ValueError, match=rf'{url}: unsupported URL scheme {scheme}:// '
                                         r'\(supported: gs://, or a local path\)'):
      storage.path(url)
  assert not os.path.exists(tmp_path / 'ftp:')


def test_check_output_refuses_inputs_existing_files_and_unwritable_folders(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'd').mkdir()
  video = tmp_path / 'd' / 'v.mp4'
  video.write_bytes(b'x')
  os.link(video, tmp_path / 'hard.mp4')
  os.symlink(video, tmp_path / 'soft.mp4')
  for spelling in ('d/v.mp4', './d/../d/v.mp4', 'hard.mp4', 'soft.mp4', str(video)):
    with pytest.raises(storage.OutputError, match=rf'--out {spelling} is the input d/v.mp4;'):
      storage.check_output(spelling, '--out', overwrite=True, inputs=['d/v.mp4'])
  with pytest.raises(storage.OutputError, match='--out d/v.mp4 exists; pass --overwrite'):
    storage.check_output('d/v.mp4', '--out')
  storage.check_output('d/v.mp4', '--out', overwrite=True)
  with pytest.raises(storage.OutputError, match='--out d is a folder'):
    storage.check_output('d', '--out', overwrite=True)
  with pytest.raises(storage.OutputError, match=rf'--out d/v.mp4/sub/o.mp4: {video} is a file'):
    storage.check_output('d/v.mp4/sub/o.mp4', '--out')
  storage.check_output('new/deeper/o.mp4', '--out')  # folders to be made
  assert not (tmp_path / 'new').exists()
  if os.geteuid() != 0:  # root may write anywhere
    (tmp_path / 'ro').mkdir(mode=0o555)
    with pytest.raises(storage.OutputError, match='cannot write in'):
      storage.check_output('ro/o.mp4', '--out')
  assert storage.same_file('gs://b//x/', 'gs://b/x')
  assert not storage.same_file('gs://b/x', 'gs://b/y')


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
  target = tmp_path / 'report.json'
  storage.write_json(target, {'a': 1})
  assert json.loads(target.read_text()) == {'a': 1}
  with pytest.raises(RuntimeError):
    with storage.atomic_write(target) as tmp:
      tmp.write_text('{"a": 2, "trunc')
      raise RuntimeError('killed half way')
  assert json.loads(target.read_text()) == {'a': 1}
  assert sorted(os.listdir(tmp_path)) == ['report.json']  # no temporary left behind
  storage.write_json(target, {'name': 'café'})
  assert storage.read_json(str(target)) == {'name': 'café'}
  assert 'café' in target.read_text(encoding='utf-8')  # UTF-8, not \u escapes


def test_atomic_write_to_a_url_writes_the_final_name_once():
  # Object stores publish an object only when its upload completes: no temporary, no rename.
  with storage.atomic_write('gs://bucket/x/eval_results.json') as target:
    assert str(target) == 'gs://bucket/x/eval_results.json'


def test_walk_follows_local_symlinks(tmp_path):
  (tmp_path / 'real' / 'a').mkdir(parents=True)
  (tmp_path / 'real' / 'a' / 'v.mp4').write_bytes(b'x')
  (tmp_path / 'top').mkdir()
  os.symlink(tmp_path / 'real', tmp_path / 'top' / 'linked')
  found = [str((root / f).relative_to(tmp_path / 'top'))
           for root, _, files in storage.walk(tmp_path / 'top') for f in files]
  assert found == ['linked/a/v.mp4']


SLURM = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'n[1-2]', 'SLURM_PROCID': '0',
         'SLURM_LOCALID': '0'}


@pytest.mark.parametrize('env, expected', [
    ({}, None),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.2:1234'}, 'JAX_COORDINATOR_ADDRESS=10.0.0.2:1234'),
    (dict(SLURM, SLURM_NTASKS='4'), 'slurm (4 tasks)'),
    (dict(SLURM, SLURM_NTASKS='1'), None),                 # one task: a single host
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}, None),    # salloc shell, not a job step
    ({'OMPI_MCA_orte_hnp_uri': '1.0;tcp://10.0.0.1:1', 'OMPI_COMM_WORLD_SIZE': '2'},
     'open mpi (2 processes)'),
    ({'TPU_WORKER_HOSTNAMES': 'h0,h1,h2,h3'}, 'cloud tpu on gke (4 hosts)'),
    ({'TPU_WORKER_HOSTNAMES': 'h0'}, None),
])
def test_detect_cluster_from_the_environment(env, expected):
  assert multihost.detect_cluster(env, tpu_vm_workers=lambda timeout: 0) == expected


def test_detect_cluster_on_tpu_vms():
  assert multihost.detect_cluster({}, tpu_vm_workers=lambda timeout: 4) == \
      'cloud tpu pod slice (4 workers)'
  assert multihost.detect_cluster({}, tpu_vm_workers=lambda timeout: 1) is None  # v4-8: one VM
  assert multihost._tpu_vm_workers(0.1) == 0  # this machine: no TPU chips, no metadata query


class _Distributed(dict):
  __getattr__ = dict.__getitem__


@pytest.mark.parametrize('mode', ['auto', 'no', 'False', False])
def test_single_host_is_never_initialised(mode, monkeypatch):
  for key in ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'OMPI_MCA_orte_hnp_uri',
              'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES'):
    monkeypatch.delenv(key, raising=False)
  lines = []
  distributed = _Distributed(initialize=mode, coordinator_address='', num_processes=0,
                             process_id=-1, cpu_collectives='')
  assert multihost.initialize(distributed, log=lines.append) is False
  assert lines and lines[0].startswith('distributed: single host')
  with pytest.raises(ValueError, match='must be one of'):
    multihost.normalise_mode('sometimes')

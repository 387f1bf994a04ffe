"""The lock file that guards a converter's output and a training run's workdir
(``dtf_jax.lockfile``): refusal naming the holder, stale locks taken over, a lost lock noticed."""

import json
import os
import socket
import subprocess
import time

import pytest
from etils import epath

from dtf_jax import lockfile


def _dead_pid():
  proc = subprocess.Popen(['true'])
  proc.wait()
  return proc.pid


def test_live_holder_refused_and_released(tmp_path):
  lock = epath.Path(tmp_path) / 'run' / 'train.lock'
  with lockfile.hold(lock, 'training run'):
    holder = json.loads(lock.read_text())
    assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
    with pytest.raises(lockfile.LockHeld) as info:
      with lockfile.hold(lock, 'training run'):
        pass
    message = str(info.value)
    assert message.startswith('the folder is in use by another training run (host '
                              f'{socket.gethostname()}, pid {os.getpid()}, started ')
    assert f'lock file {lock};' in message
    lockfile.check(lock, 'training run')  # still ours
  assert not lock.exists()


@pytest.mark.parametrize('record,age,why', [
    (lambda: {'host': socket.gethostname(), 'pid': _dead_pid(), 'started': 'x'}, 0,
     'that process no longer runs'),
    (lambda: {'host': 'elsewhere', 'pid': 1, 'started': 'x'}, lockfile.STALE_AFTER_S + 5,
     'its heartbeat stopped'),
])
def test_stale_lock_taken_over_with_a_warning(tmp_path, capsys, record, age, why):
  lock = epath.Path(tmp_path) / 'train.lock'
  lock.write_text(json.dumps(record()))
  os.utime(lock, (time.time() - age,) * 2)  # on disk the heartbeat is the modification time
  with lockfile.hold(lock, 'training run'):
    assert json.loads(lock.read_text())['pid'] == os.getpid()
  err = capsys.readouterr().err
  assert err.startswith(f'warning: taking over the stale lock {lock} (') and why in err, err


def test_foreign_lock_with_recent_heartbeat_holds(tmp_path):
  lock = epath.Path(tmp_path) / 'train.lock'
  lock.write_text(json.dumps({'host': 'elsewhere', 'pid': 1, 'started': 'x'}))
  os.utime(lock, (time.time() - 30,) * 2)
  with pytest.raises(lockfile.LockHeld, match='in use by another training run .host elsewhere'):
    with lockfile.hold(lock, 'training run'):
      pass
  assert json.loads(lock.read_text())['host'] == 'elsewhere'


def test_heartbeat_refreshes_and_a_lost_lock_is_noticed(tmp_path, monkeypatch):
  monkeypatch.setattr(lockfile, 'HEARTBEAT_S', 0.05)
  lock = epath.Path(tmp_path) / 'train.lock'
  with lockfile.hold(lock, 'training run'):
    os.utime(lock, (time.time() - 100,) * 2)
    deadline = time.time() + 10
    while time.time() - os.stat(lock).st_mtime > 50 and time.time() < deadline:
      time.sleep(0.05)
    assert time.time() - os.stat(lock).st_mtime < 50  # touched again
    # Another process takes it over (as in a bucket, where the lock is advisory).
    lock.write_text(json.dumps({'host': 'elsewhere', 'pid': 7, 'started': 'now', 'token': 'x'}))
    time.sleep(0.2)  # the heartbeat sees it is no longer ours and leaves it alone
    with pytest.raises(lockfile.LockHeld, match=r'lost the lock .*another training run took it '
                                                r'\(host elsewhere, pid 7'):
      lockfile.check(lock, 'training run')
  assert json.loads(lock.read_text())['pid'] == 7  # not removed: it is not ours


def test_training_run_refused_on_a_held_workdir_before_writing(tmp_path):
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  from dtf_jax import train  # pylint: disable=import-outside-toplevel
  workdir = epath.Path(tmp_path) / 'run'
  with train.loop.workdir_lock(workdir) as lock:
    assert lock == workdir / 'train.lock'
    with pytest.raises(lockfile.LockHeld, match='in use by another training run'):
      train.train(quickstart.get_config(), str(workdir))
    assert sorted(p.name for p in workdir.iterdir()) == ['train.lock']  # nothing else written
  assert not lock.exists()

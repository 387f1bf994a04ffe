"""A lock file that says who holds it: one writer per folder (a converter's output, a training
run's workdir).

    with lockfile.hold(epath.Path('out/.convert/lock'), 'converter'):  # LockHeld if taken
      ...

The file holds JSON ``{"host", "pid", "started", "heartbeat", "token"}``. On local disk it is
created atomically (``O_CREAT | O_EXCL``). An object store has no atomic create-if-absent through
the path layer, so in a bucket the lock is advisory: written, then read back to check, and the
holder can call :func:`check` before it writes (it raises if another process took the lock).

While the lock is held its heartbeat is renewed every ``HEARTBEAT_S`` (on disk the file's
modification time, in a bucket the ``heartbeat`` field). A lock is stale, and taken over with a
warning, when its process no longer runs on this host, or when its heartbeat is older than
``STALE_AFTER_S``: a process killed on another host, whose pid cannot be checked from here, blocks
the folder for at most that long.
"""

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Optional

from etils import epath

from dtf_jax import storage
from dtf_jax.errors import UserError

HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class LockHeld(UserError, RuntimeError):
  """Another live process holds the lock; the message names it and the lock file."""


_HELD_LOCKS = set()  # tokens of the locks this process holds


def _pid_alive(pid) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return True  # unknown: assume it runs
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # PermissionError: it exists, under another user
    return True
  return True


def _read_lock(lock) -> Optional[dict]:
  """The holder's record; ``None`` if there is no lock; ``{}`` if it cannot be read (a holder
  that is still writing it gets a second)."""
  for attempt in range(6):
    try:
      holder = json.loads(lock.read_text(encoding='utf-8'))
      if isinstance(holder, dict):
        return holder
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      pass
    if attempt < 5:
      time.sleep(0.2)
  return {}


def _holder_text(holder: dict) -> str:
  return (f'host {holder.get("host", "?")}, pid {holder.get("pid", "?")}, started '
          f'{holder.get("started", "?")}')


def _lock_conflict(lock, holder: dict, what: str) -> LockHeld:
  if not holder:
    return LockHeld(f'{lock} exists but cannot be read: another {what} may be starting; if '
                    f'none writes to this folder, delete the lock file')
  return LockHeld(f'the {"output" if what == "converter" else "folder"} is in use by another '
                  f'{what} ({_holder_text(holder)}): lock file {lock}; wait for it to end, or '
                  f'delete the lock file if that process is not a {what}')


def _last_beat(lock, holder: dict) -> Optional[float]:
  if not storage.is_url(lock):
    try:
      return os.stat(lock).st_mtime
    except OSError:
      return None
  beat = holder.get('heartbeat')
  return beat if isinstance(beat, (int, float)) else None


def _stale(lock, holder: dict) -> Optional[str]:
  """Why ``holder``'s lock is stale (a phrase), or None if it is live."""
  if not holder:
    return None
  beat = _last_beat(lock, holder)
  if beat is not None and time.time() - beat > STALE_AFTER_S:
    return f'its heartbeat stopped {time.time() - beat:.0f} s ago'
  if holder.get('host') != socket.gethostname():
    return None  # another host's process cannot be checked
  if holder.get('pid') == os.getpid():  # this process, or an earlier one with the same pid
    return None if holder.get('token') in _HELD_LOCKS else 'that process no longer runs'
  return None if _pid_alive(holder.get('pid')) else 'that process no longer runs'


def _acquire_local(lock, mine: dict, what: str, stream) -> None:
  for _ in range(5):
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _read_lock(lock)
      if holder is None:
        continue  # released meanwhile
      why = _stale(lock, holder)
      if not why:
        raise _lock_conflict(lock, holder, what) from None
      _warn_stale(lock, holder, why, stream)
      if _read_lock(lock) == holder:
        lock.unlink(missing_ok=True)
      continue
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(json.dumps(mine) + '\n')
    return
  raise _lock_conflict(lock, _read_lock(lock) or {}, what)


def _acquire_url(lock, mine: dict, what: str, stream) -> None:
  holder = _read_lock(lock) if lock.exists() else None
  if holder is not None:
    why = _stale(lock, holder)
    if not why:
      raise _lock_conflict(lock, holder, what)
    _warn_stale(lock, holder, why, stream)
  storage.write_text(lock, json.dumps(mine) + '\n')  # no create-if-absent: write, read back
  back = _read_lock(lock)
  if back != mine:
    raise _lock_conflict(lock, back or {}, what)


def _warn_stale(lock, holder: dict, why: str, stream) -> None:
  print(f'warning: taking over the stale lock {lock} ({_holder_text(holder)}; {why})',
        file=stream, flush=True)


class _Heartbeat(threading.Thread):
  """Rewrites the lock's heartbeat every ``HEARTBEAT_S`` while it is still this process's."""

  def __init__(self, lock, mine: dict):
    super().__init__(daemon=True, name='lock-heartbeat')
    self.lock, self.mine, self.done = lock, mine, threading.Event()

  def run(self):
    while not self.done.wait(HEARTBEAT_S):
      with contextlib.suppress(Exception):  # a missed beat is retried; only a long gap is stale
        if (_read_lock(self.lock) or {}).get('token') != self.mine['token']:
          return  # taken over: check() tells the holder
        if storage.is_url(self.lock):
          self.mine['heartbeat'] = time.time()
          storage.write_text(self.lock, json.dumps(self.mine) + '\n')
        else:  # touching cannot overwrite a lock that another process just took
          os.utime(self.lock)


def check(lock: epath.Path, what: str = 'converter') -> None:
  """Raises ``LockHeld`` unless this process still holds ``lock`` (for writers in a bucket, where
  the lock is advisory: call before writing)."""
  holder = _read_lock(lock)
  if (holder or {}).get('token') not in _HELD_LOCKS:
    raise LockHeld(f'lost the lock {lock}: '
                   + (f'another {what} took it ({_holder_text(holder)})' if holder else
                      'the lock file was deleted')
                   + '; stopping before writing anything more')


@contextlib.contextmanager
def hold(lock: epath.Path, what: str = 'converter', stream=None):
  """Holds the lock file ``lock`` while the block runs; raises ``LockHeld`` naming the holder if
  another live ``what`` (a phrase: 'converter', 'training run') has it. A stale lock is taken
  over with a warning line on ``stream`` (stderr). Yields the lock's path."""
  stream = stream or sys.stderr
  lock.parent.mkdir(parents=True, exist_ok=True)
  now = time.time()
  mine = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': time.strftime('%Y-%m-%dT%H:%M:%S%z', time.localtime(now)),
          'heartbeat': now, 'token': uuid.uuid4().hex}
  if storage.is_url(lock):
    _acquire_url(lock, mine, what, stream)
  else:
    _acquire_local(lock, mine, what, stream)
  _HELD_LOCKS.add(mine['token'])
  heartbeat = _Heartbeat(lock, dict(mine))
  heartbeat.start()
  try:
    yield lock
  finally:
    heartbeat.done.set()
    heartbeat.join()
    _HELD_LOCKS.discard(mine['token'])
    with contextlib.suppress(Exception):  # never hide the exception that ends the block
      if (_read_lock(lock) or {}).get('token') == mine['token']:
        lock.unlink()

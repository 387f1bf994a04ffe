"""The converter's output lock: a lock file that says who holds it, one writer per folder.

    with lockfile.hold(epath.Path('out/.convert/lock')):   # LockHeld if another process has it
      ...

The file holds JSON ``{"host", "pid", "started", "token"}``. On local disk it is created atomically
(``O_CREAT | O_EXCL``). An object store has no atomic create-if-absent through the path layer, so
in a bucket the lock is advisory: written, then read back to check. A lock whose process no longer
runs on this host is stale and taken over with a warning; another host's lock cannot be checked
and is always respected.
"""

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from typing import Optional

from etils import epath

from dtf_jax import storage


class LockHeld(RuntimeError):
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


def _lock_conflict(lock, holder: dict) -> LockHeld:
  if not holder:
    return LockHeld(f'{lock} exists but cannot be read: another converter may be starting; if '
                    'none writes to this output, delete the lock file')
  return LockHeld(f'the output is in use by another converter ({_holder_text(holder)}): lock file '
                  f'{lock}; wait for it to end, or delete the lock file if that process is not '
                  'a converter')


def _stale(holder: dict) -> bool:
  if not holder or holder.get('host') != socket.gethostname():
    return False  # another host's process cannot be checked
  if holder.get('pid') == os.getpid():  # this process, or an earlier one with the same pid
    return holder.get('token') not in _HELD_LOCKS
  return not _pid_alive(holder.get('pid'))


def _acquire_local(lock, text: str, stream) -> None:
  for _ in range(5):
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _read_lock(lock)
      if holder is None:
        continue  # released meanwhile
      if not _stale(holder):
        raise _lock_conflict(lock, holder) from None
      _warn_stale(lock, holder, stream)
      if _read_lock(lock) == holder:
        lock.unlink(missing_ok=True)
      continue
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
    return
  raise _lock_conflict(lock, _read_lock(lock) or {})


def _acquire_url(lock, mine: dict, stream) -> None:
  holder = _read_lock(lock) if lock.exists() else None
  if holder is not None:
    if not _stale(holder):
      raise _lock_conflict(lock, holder)
    _warn_stale(lock, holder, stream)
  storage.write_text(lock, json.dumps(mine) + '\n')  # no create-if-absent: write, read back
  back = _read_lock(lock)
  if back != mine:
    raise _lock_conflict(lock, back or {})


def _warn_stale(lock, holder: dict, stream) -> None:
  print(f'warning: taking over the stale lock {lock} ({_holder_text(holder)}; that process no '
        'longer runs)', file=stream, flush=True)


@contextlib.contextmanager
def hold(lock: epath.Path, stream=None):
  """Holds the lock file ``lock`` (JSON: host, pid, start time) while the block runs; raises
  ``LockHeld`` naming the holder if another live process has it. A lock of a process that no
  longer runs on this host is taken over with a warning line on ``stream`` (stderr). Yields the
  lock's path."""
  stream = stream or sys.stderr
  lock.parent.mkdir(parents=True, exist_ok=True)
  mine = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'token': uuid.uuid4().hex}
  if storage.is_url(lock):
    _acquire_url(lock, mine, stream)
  else:
    _acquire_local(lock, json.dumps(mine) + '\n', stream)
  _HELD_LOCKS.add(mine['token'])
  try:
    yield str(lock)
  finally:
    _HELD_LOCKS.discard(mine['token'])
    with contextlib.suppress(Exception):  # never hide the exception that ends the block
      if _read_lock(lock) == mine:
        lock.unlink()

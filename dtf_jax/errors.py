"""Errors that the user's input causes, and how entry points report them.

Library functions raise typed exceptions; those caused by what the user gave (a path, a file, an
argument, a damaged or mismatched checkpoint, a held lock) derive from :class:`UserError` (and
from the built-in class that describes them, e.g. ``ValueError``). Every entry point (``main.py``,
``python -m dtf_jax.tools.*``, the converters) runs through :func:`run_main`: such an error ends
the program with one line ``error: ...`` on stderr and exit code 1, while any other exception (a
bug) keeps its traceback. ``DTF_DEBUG=1`` in the environment shows the traceback of every error.
"""

import os
import sys

DEBUG_ENV = 'DTF_DEBUG'


class UserError(Exception):
  """An error in what the user gave; its message names the culprit."""


# Built-in errors that library code raises for a user's path (with the path in the message).
EXPECTED = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError)


def one_line(error: BaseException) -> str:
  """The error's message on one line (an ``OSError`` as ``PATH: reason``)."""
  if isinstance(error, OSError) and error.filename and error.strerror:
    return f'{error.filename}: {error.strerror}'
  text = ' '.join(str(error).split()) or type(error).__name__
  return text


def run_main(main, argv=None) -> int:
  """``main(argv)``'s exit code; an expected error is one line on stderr and exit code 1,
  Ctrl-C exit code 130 (without a traceback)."""
  try:
    return main(argv)
  except EXPECTED as e:
    if os.environ.get(DEBUG_ENV) == '1':
      raise
    print(f'error: {one_line(e)}', file=sys.stderr, flush=True)
    return 1
  except KeyboardInterrupt:
    if os.environ.get(DEBUG_ENV) == '1':
      raise
    print('interrupted', file=sys.stderr, flush=True)
    return 130


def _closed_loop_noise(exc_type, value, tb) -> bool:
  """Whether an uncaught exception is an asyncio 'Event loop is closed' raised in a callback
  (what orbax's reads leave behind when a damaged checkpoint fails to restore)."""
  if exc_type is not RuntimeError or str(value) != 'Event loop is closed':
    return False
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is None or 'asyncio' in tb.tb_frame.f_code.co_filename


def quiet_closed_event_loop_noise() -> None:
  """Drops, from then on, the tracebacks of asyncio callbacks that run after their event loop
  closed: a checkpoint that fails to restore leaves tensorstore reads behind whose completions
  print hundreds of them (and 'coroutine was never awaited' lines). Everything else prints as
  before. Idempotent."""
  if getattr(sys.excepthook, 'dtf_quiet', False):
    return
  previous_except, previous_unraisable = sys.excepthook, sys.unraisablehook

  def excepthook(exc_type, value, tb):
    if not _closed_loop_noise(exc_type, value, tb):
      previous_except(exc_type, value, tb)

  def unraisablehook(info):
    if _closed_loop_noise(info.exc_type, info.exc_value, info.exc_traceback):
      return
    if info.exc_type is RuntimeError and 'was never awaited' in str(info.exc_value):
      return
    previous_unraisable(info)

  excepthook.dtf_quiet = True
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook

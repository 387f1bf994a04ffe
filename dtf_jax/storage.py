"""Files on local disk or in Google Cloud Storage (``gs://``): the project's one path layer.

Every file the library, the trainer and the tools read or write goes through ``etils.epath``:
local paths use the operating system; ``gs://`` URLs use ``tf.io.gfile`` (TensorFlow's Cloud
Storage client: the same one that ``tf.data`` and TensorBoard's writers use). Orbax uses ``epath``
for its directories and tensorstore for array data. Other schemes are refused up front: the
TensorFlow build installed here has no S3, Azure or Hugging Face file system, so a run would pass
the path check and fail at its first write (the TensorBoard writer).

    p = storage.path('gs://bucket/runs/a')   # epath.Path; a local path is made absolute
    storage.write_json(p / 'config.json', {...})
    with storage.atomic_write(p / 'shard.tfrecord') as target:
      write_somehow(target)                  # readers never see a partial file

Atomic writes: on local disk, ``atomic_write`` yields ``NAME.tmp`` beside the target and renames
it over the target once written (a POSIX rename replaces atomically); a failure removes it. An
object store has no atomic rename (``gs://`` rename is copy + delete), but it publishes an object
only when its upload completes: a failed or killed upload leaves no object, and an older object of
the same name stays whole until the new one replaces it. There ``atomic_write`` yields the target
itself, written once. Either way a reader sees the old file, the new file, or none, never a part.
"""

import contextlib
import json
import os
from typing import Any, Iterator, List, Sequence, Tuple, Union

from etils import epath

from dtf_jax.errors import UserError

PathLike = Union[str, os.PathLike]
URL_SCHEMES = ('gs',)  # those every reader and writer here reaches (tested with an emulator)


class PathError(UserError, ValueError):
  """A location that this layer cannot reach (an unsupported URL scheme)."""


def is_url(path: PathLike) -> bool:
  """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
  return '://' in os.fspath(path)


def path(location: PathLike) -> epath.Path:
  """``location`` as an ``epath.Path``: URLs unchanged, local paths absolute (``~`` expanded).

  A URL of a scheme that ``epath`` cannot reach is an error (it would otherwise become a local
  folder named ``scheme:``).
  """
  text = os.fspath(location)
  if is_url(text):
    scheme = text.split('://', 1)[0]
    if scheme not in URL_SCHEMES:
      raise PathError(f'{text}: unsupported URL scheme {scheme}:// (supported: '
                       f'{", ".join(s + "://" for s in URL_SCHEMES)}, or a local path)')
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


class OutputError(UserError, ValueError):
  """An output path that must not be written: it exists, it is an input, or its folder cannot
  be made or written. The message names the flag and the path."""


def same_file(a: PathLike, b: PathLike) -> bool:
  """Whether ``a`` and ``b`` name the same file however spelled (``./x``, ``../d/x``, symbolic
  and hard links; URLs compared as written, less repeated and trailing slashes)."""
  if is_url(a) or is_url(b):
    def norm(text):
      scheme, _, rest = os.fspath(text).partition('://')
      return scheme + '://' + '/'.join(p for p in rest.split('/') if p)
    return norm(a) == norm(b)
  a, b = os.path.abspath(os.path.expanduser(a)), os.path.abspath(os.path.expanduser(b))
  if os.path.realpath(a) == os.path.realpath(b):
    return True
  try:
    return os.path.samefile(a, b)
  except OSError:
    return False


def check_output(location: PathLike, flag: str, overwrite: bool = False,
                 inputs: Sequence[PathLike] = ()) -> None:
  """Checks, before any work, that the file ``location`` (given as ``flag``) can be written:
  it is none of ``inputs`` (never, even with ``overwrite``), it does not exist unless
  ``overwrite``, it is not a folder, and on local disk its folder exists or can be made and is
  writable. Raises :class:`OutputError` naming the culprit."""
  for source in inputs:
    if same_file(location, source):
      raise OutputError(f'{flag} {location} is the input {source}; write the output elsewhere')
  target = path(location)
  if target.is_dir():
    raise OutputError(f'{flag} {location} is a folder; give a file name')
  if target.exists() and not overwrite:
    raise OutputError(f'{flag} {location} exists; pass --overwrite to replace it')
  if is_url(target):
    return
  folder = os.fspath(target.parent)
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise OutputError(f'{flag} {location}: {folder} is a file, not a folder')
  if not os.access(folder, os.W_OK | os.X_OK):
    raise OutputError(f'{flag} {location}: cannot write in {folder} (permission denied)')


@contextlib.contextmanager
def atomic_write(location: PathLike) -> Iterator[epath.Path]:
  """Yields the path to write ``location``'s new content to; see the module docstring."""
  target = path(location)
  if is_url(target):
    yield target
    return
  tmp = target.parent / (target.name + '.tmp')
  try:
    yield tmp
    tmp.replace(target)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_bytes(location: PathLike, data: bytes) -> None:
  """Writes ``data`` to ``location`` atomically."""
  with atomic_write(location) as target:
    target.write_bytes(data)


def write_text(location: PathLike, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``location`` atomically."""
  write_bytes(location, text.encode('utf-8'))


def write_json(location: PathLike, data: Any, **dump_kwargs) -> None:
  """Writes ``data`` as indented JSON (keys as given, UTF-8) to ``location`` atomically."""
  dump_kwargs = {'indent': 2, 'ensure_ascii': False, **dump_kwargs}
  write_text(location, json.dumps(data, **dump_kwargs) + '\n')


def read_json(location: PathLike) -> Any:
  """The JSON content of ``location``."""
  return json.loads(path(location).read_text(encoding='utf-8'))


def walk(location: PathLike) -> Iterator[Tuple[epath.Path, List[str], List[str]]]:
  """``(folder, subfolder names, file names)`` top-down, like ``os.walk`` (local symbolic links
  to folders are followed); sort the subfolder list in place to order the walk."""
  top = path(location)
  if is_url(top):
    yield from top.walk()
    return
  for root, dirs, files in os.walk(top, followlinks=True):
    yield epath.Path(root), dirs, files

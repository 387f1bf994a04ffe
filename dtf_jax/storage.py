"""Files on local disk or in object stores (``gs://``, ``s3://``): the project's one path layer.

Every file the library, the trainer and the tools read or write goes through ``etils.epath``:
local paths use the operating system; URLs use ``tf.io.gfile`` (TensorFlow's Cloud Storage and S3
clients: the same ones that ``tf.data`` and TensorBoard's writers use). Orbax uses ``epath`` for
its directories and tensorstore for array data.

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
from typing import Any, Iterator, List, Tuple, Union

from etils import epath

PathLike = Union[str, os.PathLike]
URL_SCHEMES = ('gs', 's3', 'az', 'hf')  # those epath supports


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
      raise ValueError(f'{text}: unsupported URL scheme {scheme}:// (supported: '
                       f'{", ".join(s + "://" for s in URL_SCHEMES)}, or a local path)')
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


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

"""Reading PyTorch checkpoint files as ``{key: numpy array}`` without running any of their code.

    tensors = read_state_dict('resnet50-19c8e357.pth')     # or a .safetensors file

``.safetensors`` files are read with the ``safetensors`` package (no PyTorch needed); any other
file (``.pth``, ``.pt``, ``.bin``, ...) with ``torch.load(weights_only=True)``, which refuses
pickled objects other than tensors and plain containers, so a malicious file cannot execute code.
Paths may be local or URLs (``gs://...``): they are read through ``dtf_jax.storage``.
"""

import argparse
import hashlib
import io
from typing import Any, Dict, Mapping

import numpy as np
from etils import epath

from dtf_jax import storage
from dtf_jax.errors import UserError

SAFETENSORS_SUFFIX = '.safetensors'


class CheckpointReadError(UserError, ValueError):
  """The file exists but is not a readable, weights-only checkpoint."""


def _to_numpy(value) -> np.ndarray:
  """A torch tensor or array -> numpy; floating point (also bfloat16, float16) as float32."""
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    value = value.float().numpy() if value.is_floating_point() else value.numpy()
  value = np.asarray(value)
  if value.dtype.kind == 'f' or value.dtype.name == 'bfloat16':
    value = value.astype(np.float32, copy=False)
  return value


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Accepts ``{'state_dict': ...}`` / ``{'model': ...}`` wrappers and ``module.`` prefixes;
  returns numpy arrays (floating point as float32)."""
  for wrapper in ('state_dict', 'model'):
    if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
      state_dict = state_dict[wrapper]
  out = {}
  for key, value in state_dict.items():
    if not (hasattr(value, 'detach') or isinstance(value, np.ndarray) or np.isscalar(value)):
      raise CheckpointReadError(f'{key!r} holds a {type(value).__name__}, not a tensor: not a '
                                f'state dict (wrappers understood: state_dict, model)')
    out[key[len('module.'):] if key.startswith('module.') else key] = _to_numpy(value)
  return out


def read_state_dict(path: str, return_sha256: bool = False):
  """``.pth`` / ``.pt`` / ``.safetensors`` file -> ``{key: numpy array}`` (unwrapped, see
  :func:`unwrap_state_dict`); with ``return_sha256``, also the hex SHA-256 of the file's bytes
  (read once). Raises ``FileNotFoundError`` or :class:`CheckpointReadError`."""
  path = storage.path(path)
  if not path.exists():
    raise FileNotFoundError(f'checkpoint file not found: {path}')
  if path.is_dir():
    raise CheckpointReadError(f'{path} is a directory, not a checkpoint file')
  data = path.read_bytes()
  if not data:
    raise CheckpointReadError(f'{path} is empty (0 bytes): not a PyTorch or safetensors '
                              f'checkpoint')
  tensors = _parse_state_dict(path, data)
  return (tensors, hashlib.sha256(data).hexdigest()) if return_sha256 else tensors


def _looks_like(data: bytes) -> str:
  """``'pytorch'``, ``'safetensors'`` or ``''`` from the first bytes of a file."""
  if data.startswith((b'PK\x03\x04', b'\x80')):  # torch.save: a zip archive, or (legacy) a pickle
    return 'pytorch'
  if len(data) > 8 and data[8:9] == b'{':  # 8-byte header length, then a JSON header
    return 'safetensors'
  return ''


def _unreadable(path: epath.Path, data: bytes, kind: str, error: Exception):
  """The :class:`CheckpointReadError` for a file that ``kind``'s reader refused."""
  found = _looks_like(data)
  if not found:
    return CheckpointReadError(f'{path} is not a PyTorch or safetensors checkpoint ({len(data)} '
                               f'bytes, starting {data[:16]!r})')
  hint = f' (it looks like a {found} file)' if found != kind else ''
  reason = str(error) or type(error).__name__
  if kind == 'safetensors':
    return CheckpointReadError(f'cannot read {path} as a .safetensors file{hint}: {reason}')
  return CheckpointReadError(f'cannot read {path} as a weights-only PyTorch checkpoint (nothing '
                             f'in it was run){hint}: {reason}')


def _parse_state_dict(path: epath.Path, data: bytes) -> Dict[str, np.ndarray]:
  if path.name.endswith(SAFETENSORS_SUFFIX):
    import safetensors.numpy  # pylint: disable=import-outside-toplevel
    try:
      return unwrap_state_dict(safetensors.numpy.load(data))
    except CheckpointReadError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise _unreadable(path, data, 'safetensors', e) from e
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f'reading {path} needs PyTorch (pip install "dtf_jax[torch]"); '
                      f'.safetensors files need no PyTorch') from e
  try:
    # argparse.Namespace: the released training code stores its arguments beside the weights; it
    # is a plain attribute bag, safe to rebuild.
    with torch.serialization.safe_globals([argparse.Namespace]):
      state = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(path, data, 'pytorch', e) from e
  if not isinstance(state, Mapping):
    raise CheckpointReadError(f'{path} holds a {type(state).__name__}, not a state dict')
  return unwrap_state_dict(state)

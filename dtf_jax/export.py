"""A model's inference function, serialized with ``jax.export``, for serving without Flax.

    path = dtf_jax.export.export_model(model, variables, 'exports/dtf_r50', size=256,
                                       model_name='dtf_r50', class_names=names)
    fn = dtf_jax.export.load('exports/dtf_r50')   # another process: no Flax, no model code
    logits = fn(video)     # video: B T H W 3 normalised float32 -> logits B num_classes float32
    fn.class_names, fn.meta['input']

An export directory (a local path or a URL such as ``gs://bucket/...``, see ``dtf_jax.storage``)
holds three files:

- ``function.jaxexport``: ``jax.export``'s serialization of ``logits = f(arrays, video)``,
  lowered for every platform of ``platforms`` (default CPU, CUDA and TPU) with the batch ``B``
  symbolic and ``T H W`` fixed to the model's clip length and frame size. ``video`` is what
  ``model.apply(variables, video, train=False)`` takes: normalised float32 clips ``B T H W 3``,
  ``(pixels / 255 - IMAGENET_MEAN) / IMAGENET_STD`` per RGB channel (``dtf_jax.data.ops``);
  the logits are float32 ``B num_classes``.
- ``params.npz``: the variables, the function's first argument, as one numpy ``.npz`` archive
  of flat names (``params/stage1_block0/conv1/kernel``, ``batch_stats/...``). Dtypes that
  ``.npz`` cannot name (bfloat16) are stored as raw bytes and read back as the function's
  argument types say.
- ``meta.json``: the input contract (frames, frame size, layout, dtype, normalisation), the
  output, the class names, the model's name and arguments, where the weights came from, the
  platforms and the JAX version, and the size and SHA-256 of the two other files, which
  :func:`load` checks (a truncated or altered file is named, not deserialized). It is written
  last: its presence means the export is complete.

An example whose video holds a NaN or an infinity gets NaN logits (``dtf_jax.models``), in the
exported function as in the model.

The DTF block is exported with portable implementations: a model built with ``fa_impl='pallas'``
(or ``'auto'``) is exported with ``fa_impl='scan'``, and with ``block_impl='parts'`` whatever its
``block_impl``, the same numbers (see ``dtf_jax.layers.aggregation`` and ``dtf_jax.layers.dtf``).
A Pallas kernel lowers for the backend it is traced on only (Triton for CUDA, Mosaic for TPU)
and not with a symbolic batch. ``'xla'`` is kept.
"""

import hashlib
import io
import os
from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dtf_jax import storage
from dtf_jax.errors import UserError

FORMAT = 'dtf_jax.export/1'   # meta.json's "format": what load() reads
META_FILE = 'meta.json'
FUNCTION_FILE = 'function.jaxexport'
PARAMS_FILE = 'params.npz'
PLATFORMS = ('cpu', 'cuda', 'tpu')   # lowered for by default
KNOWN_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # jax.export's platform names
PORTABLE_FA_IMPLS = ('scan', 'xla')  # frame-wise aggregation implementations that lower anywhere


class ExportError(UserError, ValueError):
  """An export that cannot be made as asked (size, platforms, class names), or a directory that
  cannot be loaded: a file missing, damaged, or not of an export."""


def _portable(model):
  """``model`` with a DTF block that lowers for every platform (module docstring)."""
  changes = {}
  if getattr(model, 'fa_impl', None) not in (None,) + PORTABLE_FA_IMPLS:
    changes['fa_impl'] = 'scan'
  if getattr(model, 'block_impl', None) not in (None, 'parts'):
    changes['block_impl'] = 'parts'
  return model.clone(**changes) if changes else model


def _frame_size(model, size: Optional[int]) -> int:
  """The exported frame height = width: ``size``, or the size the model is built for (Swin)."""
  from dtf_jax.models import model_spec  # pylint: disable=import-outside-toplevel
  argument = model_spec(model).size_argument
  built = getattr(model, argument) if argument else None
  if size is None:
    if built is None:
      raise ExportError(f'{type(model).__name__} takes any frame size: pass size= (the frame '
                        'height = width the exported function will take, e.g. 256 or 224)')
    return built
  if built is not None and size != built:
    raise ExportError(f'size={size}: {type(model).__name__} is built for {argument}={built} '
                      'frames; export it at that size')
  return size


def _existing_export(directory) -> bool:
  """Whether ``directory`` holds an export; raises if it holds another ``meta.json``."""
  meta_path = directory / META_FILE
  if not meta_path.exists():
    return False
  if storage.read_json(meta_path).get('format') != FORMAT:
    raise FileExistsError(f'{meta_path} is not the meta.json of an export ({FORMAT}): '
                          f'{directory} holds something else (a pretrained directory?); '
                          'choose another directory')
  return True


def export_model(model, variables: Mapping[str, Any], directory: str, *,
                 size: Optional[int] = None, model_name: Optional[str] = None,
                 class_names: Optional[Sequence[str]] = None,
                 source: Optional[Dict[str, Any]] = None,
                 platforms: Sequence[str] = PLATFORMS, overwrite: bool = False) -> str:
  """Writes ``model``'s inference function and ``variables`` under ``directory`` (see the module
  docstring); returns its absolute path (or URL).

  ``model``: a module of ``dtf_jax.models.create_model`` (``B T H W 3 -> B num_classes``);
  ``size``: the frame height = width of the exported input (default: the size the model is
  built for; needed for ResNets, which take any size); ``model_name``: its registry name
  (``dtf_r50``), recorded in ``meta.json`` with the model's arguments; ``class_names``: the
  classifier's classes in order; ``source``: where the weights came from (any JSON);
  ``platforms``: those to lower for (of :data:`KNOWN_PLATFORMS`). An existing export is replaced
  only with ``overwrite=True``: its ``meta.json`` is removed first, so a stopped replacement
  leaves an incomplete directory (no ``meta.json``), never a mixed one. A directory holding
  another ``meta.json`` (a pretrained directory) is refused.
  """
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from dtf_jax.data import ops  # pylint: disable=import-outside-toplevel
  from dtf_jax.models import model_fields  # pylint: disable=import-outside-toplevel
  from dtf_jax.pretrained import json_value  # pylint: disable=import-outside-toplevel

  directory = storage.path(directory)
  platforms = tuple(platforms)
  unknown = sorted(set(platforms) - set(KNOWN_PLATFORMS))
  if unknown or not platforms:
    raise ExportError(f'platforms={platforms}: {unknown or "none given"}; choose from '
                      f'{", ".join(KNOWN_PLATFORMS)}')
  if class_names is not None and len(class_names) != model.num_classes:
    raise ExportError(f'{len(class_names)} class names for {model.num_classes} classes')
  if _existing_export(directory) and not overwrite:
    raise FileExistsError(f'{directory} holds an export ({directory / META_FILE}); pass '
                          'overwrite=True (--overwrite) to replace it')
  frames, frame_size = model.clip_length, _frame_size(model, size)
  model = _portable(model)

  arrays = {name: np.asarray(value)
            for name, value in traverse_util.flatten_dict(variables, sep='/').items()}

  def logits(arrays, video):
    variables = traverse_util.unflatten_dict(arrays, sep='/')
    return model.apply(variables, video, train=False).astype(jnp.float32)

  video = jax.ShapeDtypeStruct(
      jax.export.symbolic_shape(f'b, {frames}, {frame_size}, {frame_size}, 3'), jnp.float32)
  specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrays.items()}
  exported = jax.export.export(jax.jit(logits), platforms=platforms)(specs, video)
  function = exported.serialize()

  directory.mkdir(parents=True, exist_ok=True)
  if (directory / META_FILE).exists():
    (directory / META_FILE).unlink()  # incomplete from here until the new meta.json
  storage.write_bytes(directory / FUNCTION_FILE, bytes(function))
  archive = io.BytesIO()  # zipfile seeks back to write headers; a bucket's stream cannot
  np.savez(archive, **arrays)
  params = archive.getvalue()
  storage.write_bytes(directory / PARAMS_FILE, params)

  num_classes = model.num_classes
  meta = {
      'format': FORMAT,
      'input': {
          'layout': 'B T H W 3', 'shape': ['B', frames, frame_size, frame_size, 3],
          'dtype': 'float32', 'frames': frames, 'frame_size': [frame_size, frame_size],
          'channels': 'RGB',
          'normalization': {'formula': '(pixels / 255 - mean) / std per channel, pixels 0..255',
                            'mean': list(ops.IMAGENET_MEAN), 'std': list(ops.IMAGENET_STD)}},
      'output': {'layout': 'B num_classes', 'shape': ['B', num_classes], 'dtype': 'float32',
                 'meaning': 'logits (softmax for class probabilities)'},
      'class_names': list(class_names) if class_names is not None else None,
      'model': model_name, 'model_class': type(model).__name__,
      'kwargs': {f: json_value(getattr(model, f)) for f in model_fields(type(model))},
      'source': source,
      'platforms': list(exported.platforms), 'jax_version': jax.__version__,
      'calling_convention_version': exported.calling_convention_version,
      'function': FUNCTION_FILE, 'function_bytes': len(function),
      'function_sha256': hashlib.sha256(bytes(function)).hexdigest(),
      'parameters': {'file': PARAMS_FILE, 'file_bytes': len(params),
                     'sha256': hashlib.sha256(params).hexdigest(), 'arrays': len(arrays),
                     'count': int(sum(v.size for k, v in arrays.items()
                                      if k.startswith('params/'))),
                     'bytes': int(sum(v.nbytes for v in arrays.values()))},
  }
  storage.write_json(directory / META_FILE, meta)
  return str(directory)


class ExportedModel:
  """An export loaded by :func:`load`: ``fn(video B T H W 3) -> logits B num_classes`` (float32).

  Attributes: ``meta`` (``meta.json``), ``class_names`` (list or None), ``exported`` (the
  ``jax.export.Exported``), ``input_shape`` (``(T, H, W, 3)``).
  """

  def __init__(self, meta: Dict[str, Any], exported, arrays: Dict[str, Any]):
    self.meta = meta
    self.class_names = meta['class_names']
    self.exported = exported
    self.input_shape = tuple(meta['input']['shape'][1:])
    self._arrays = arrays
    self._call = jax.jit(exported.call)

  def __call__(self, video) -> jax.Array:
    """``video``: ``B T H W 3`` normalised clips (numpy or JAX; floats are cast to float32)."""
    if not hasattr(video, 'dtype'):
      video = np.asarray(video)
    shape = tuple(video.shape)
    if len(shape) != 5 or shape[1:] != self.input_shape or shape[0] < 1:
      raise ValueError(f'expected a video B x T x H x W x 3 = B x '
                       f'{" x ".join(map(str, self.input_shape))} (B >= 1), got shape {shape}')
    if not jnp.issubdtype(video.dtype, jnp.floating):
      raise ValueError(f'expected normalised float32 clips, got {video.dtype}: normalise pixels '
                       f'as meta["input"]["normalization"] says '
                       f'({self.meta["input"]["normalization"]["formula"]})')
    return self._call(self._arrays, jnp.asarray(video, jnp.float32))


def load(directory: str) -> ExportedModel:
  """The export in ``directory`` as a callable (see :class:`ExportedModel`), built from the
  serialized function and the stored arrays only (no model code runs)."""
  directory = storage.path(directory)
  if not directory.exists():
    raise FileNotFoundError(f'{directory}: no such export directory')
  meta_path = directory / META_FILE
  if not meta_path.exists():
    raise FileNotFoundError(f'{meta_path} is missing: {directory} is not a finished export '
                            '(meta.json is written last)')
  try:
    meta = storage.read_json(meta_path)
  except ValueError as e:
    raise ExportError(f'{meta_path} is not JSON ({e}): the export is damaged') from e
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    found = meta.get('format') if isinstance(meta, dict) else None
    raise ExportError(f'{meta_path}: format {found!r}, not {FORMAT!r} (not an export made by '
                      'dtf_jax.export)')
  try:
    function_name, params_meta = meta['function'], meta['parameters']
    params_name = params_meta['file']
  except (KeyError, TypeError) as e:
    raise ExportError(f'{meta_path}: no {e} entry: the export is damaged') from e
  function_path = _member(directory, function_name, meta_path)
  params_path = _member(directory, params_name, meta_path)
  function = _checked_bytes(function_path, meta.get('function_bytes'), meta.get('function_sha256'))
  params = _checked_bytes(params_path, params_meta.get('file_bytes'), params_meta.get('sha256'))
  try:
    exported = jax.export.deserialize(bytearray(function))
  except Exception as e:  # pylint: disable=broad-except  # flatbuffers raise struct.error etc.
    raise ExportError(f'{function_path} cannot be deserialized ({type(e).__name__}: {e}): the '
                      'export is damaged') from e
  (wanted, _), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)
  try:
    with np.load(io.BytesIO(params), allow_pickle=False) as stored:
      arrays = {name: stored[name] for name in stored.files}
  except Exception as e:  # pylint: disable=broad-except  # zipfile, numpy format errors
    raise ExportError(f'{params_path} cannot be read ({type(e).__name__}: {e}): the export is '
                      'damaged') from e
  if arrays.keys() != wanted.keys():
    names = sorted(arrays.keys() ^ wanted.keys())
    raise ExportError(f'{params_path} does not fit {function_name}: {len(names)} arrays differ '
                      f'({", ".join(names[:4])}{", ..." * (len(names) > 4)})')
  for name, aval in wanted.items():
    array = arrays[name]
    if array.shape != aval.shape or array.dtype.itemsize != aval.dtype.itemsize:
      raise ExportError(f'{params_path}: {name} is {array.dtype}{list(array.shape)}; '
                        f'{function_name} takes {aval.dtype}{list(aval.shape)}')
    arrays[name] = jax.device_put(array.view(aval.dtype))
  return ExportedModel(meta, exported, arrays)


def _member(directory, name, meta_path):
  """``directory / name`` for a plain file name from ``meta.json`` (nothing outside it)."""
  if not isinstance(name, str) or not name or '/' in name or os.sep in name or '\\' in name \
      or name in ('.', '..'):
    raise ExportError(f'{meta_path} names {name!r}: not a file of {directory}')
  path = directory / name
  if not path.exists():
    raise ExportError(f'{path} is missing: the export is incomplete')
  return path


def _checked_bytes(path, size, sha256) -> bytes:
  """The bytes of ``path``, checked against the size and SHA-256 that ``meta.json`` recorded
  (exports made before checksums were recorded are read unchecked)."""
  data = path.read_bytes()
  if size is not None and len(data) != size:
    raise ExportError(f'{path} has {len(data)} bytes, {size} were exported: the file is '
                      'truncated or replaced')
  if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
    raise ExportError(f'{path} does not match the SHA-256 recorded at export: the file is '
                      'damaged or altered')
  return data

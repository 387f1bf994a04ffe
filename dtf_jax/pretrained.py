"""Saving and loading model variables with the arguments that rebuild the model.

Two kinds of directory load the same way::

    model, variables = dtf_jax.pretrained.load_pretrained('dtf_r50_k400')   # convert_torch output
    model, variables = dtf_jax.pretrained.load_pretrained('runs/my_run')     # a main.py workdir
    logits = model.apply(variables, video, train=False)                       # video: B T H W 3
    features = model.apply(variables, video, features=True)                   # B D, pre-head
    names = dtf_jax.pretrained.read_meta('runs/my_run')['class_names']

A pretrained directory holds ``variables/`` (an orbax checkpoint of ``{'params', 'batch_stats'}``;
``variables.next/`` after a replacement) and ``meta.json``: ``{"model": name, "kwargs":
{...create_model arguments}, "class_names": [...] or null, "source": {...where the weights came
from}, "variables": the directory of the arrays}``. A trainer workdir holds ``config.json``
(the resolved config plus the ``class_names`` of its training data) and ``checkpoints/STEP/``;
only the parameters and batch statistics of a step are read, never the optimizer state. Paths
may be local or URLs (``gs://bucket/...``; see ``dtf_jax.storage``).
"""

import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from etils import epath

from dtf_jax import storage
from dtf_jax.errors import UserError, quiet_closed_event_loop_noise
from dtf_jax.models import create_model, size_kwargs, variable_shapes

META_FILE = 'meta.json'
VARIABLES_DIR = 'variables'
CONFIG_FILE = 'config.json'      # written by the trainer into its workdir
CHECKPOINT_DIR = 'checkpoints'   # the trainer's orbax CheckpointManager directory
STATE_ITEM = 'state'             # its item holding the TrainState


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that cannot be restored (damaged files, or one that does not fit the model)."""


class VariablesMismatchError(CheckpointError, ValueError):
  """Stored arrays whose names or shapes do not fit the model (the message lists them)."""


class MetaError(UserError, ValueError):
  """A ``meta.json`` that names something outside its directory, or is not a dtf_jax one."""


def error_reason(e: Exception) -> str:
  """``Type: first line of the message`` (at most 300 characters) of a restore failure."""
  return f'{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ""}'


def json_value(value: Any) -> Any:
  """A model argument as JSON: tuples and lists as lists (recursively), dtypes (and dtype
  classes) by name."""
  if isinstance(value, (tuple, list)):
    return [json_value(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return str(jnp.dtype(value))


def config_model_kwargs(config: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
  """A trainer config (``configs/base.py`` fields; a ConfigDict or its JSON) -> ``(model name,
  create_model kwargs)``: the ``model`` fields, the clip length, classes, compute dtype and, for
  Swin, the frame size."""
  model = config['model']
  data = config['data']
  kwargs = size_kwargs(model['name'], data['size'])
  kwargs.update({k: v for k, v in model.items() if k != 'name'})
  kwargs.update(num_classes=data['num_classes'], clip_length=data['clip_length'],
                dtype=jnp.dtype(config['compute_dtype']))
  return model['name'], kwargs


def save_pretrained(directory: str, model_name: str, model_kwargs: Dict[str, Any],
                    variables: Dict[str, Any], *, overwrite: bool = False,
                    source: Optional[Dict[str, Any]] = None,
                    class_names: Optional[Sequence[str]] = None) -> str:
  """Writes ``variables`` and ``meta.json`` under ``directory``; returns its absolute path.

  ``model_kwargs`` must include ``num_classes`` and ``clip_length``; ``source`` describes where
  the weights came from (kind, file, sha256, inflation choices); ``class_names`` the classifier's
  classes in order. Nothing is lost if the process dies at any point, on local disk or in a
  bucket (where directories cannot be renamed): the arrays go into a directory that
  ``meta.json`` does not name yet (``variables/``, or ``variables.next/`` when replacing
  ``variables/``), then ``meta.json`` is written in one atomic step naming it (its
  ``"variables"`` field), then the old directory is removed. ``meta.json`` always names complete
  arrays; directories it does not name are leftovers of a stopped run, removed on the next save.
  """
  directory = storage.path(directory)
  if class_names is not None and len(class_names) != model_kwargs['num_classes']:
    raise ValueError(f'{len(class_names)} class names for {model_kwargs["num_classes"]} classes')
  current = _variables_dir(directory)
  if current is not None and not overwrite:
    raise FileExistsError(f'{directory} holds weights ({directory / META_FILE}); pass '
                          'overwrite=True (--overwrite) to replace them.')
  directory.mkdir(parents=True, exist_ok=True)
  name = VARIABLES_DIR if current != VARIABLES_DIR else f'{VARIABLES_DIR}.next'
  _remove_leftovers(directory, keep=current)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / name, variables)
  meta = {'model': model_name, 'kwargs': {k: json_value(v) for k, v in model_kwargs.items()},
          'class_names': list(class_names) if class_names is not None else None,
          'source': source, 'variables': name}
  storage.write_json(directory / META_FILE, meta, sort_keys=True)  # the switch to the new copy
  _remove_leftovers(directory, keep=name)
  return str(directory)


def _variables_dir(directory: epath.Path) -> Optional[str]:
  """The variables directory that ``directory/meta.json`` names, or None without ``meta.json``."""
  return read_meta(directory)['variables'] if (directory / META_FILE).exists() else None


def _remove_leftovers(directory: epath.Path, keep: Optional[str]) -> None:
  """Removes every ``variables*`` entry but ``keep`` (orbax's temporary directories included)."""
  for entry in directory.glob(f'{VARIABLES_DIR}*'):
    if entry.name != keep:
      if entry.is_dir():
        entry.rmtree()
      else:
        entry.unlink()


def _checkpoint_steps(workdir: epath.Path) -> Tuple[epath.Path, List[int]]:
  """The trainer's checkpoint directory and its finished steps (as orbax lists them)."""
  checkpoints = workdir / CHECKPOINT_DIR
  options = ocp.CheckpointManagerOptions(create=False, read_only=True)
  with ocp.CheckpointManager(checkpoints, item_names=(STATE_ITEM,), options=options) as manager:
    return checkpoints, sorted(manager.all_steps())


def checkpoint_steps(workdir: str) -> List[int]:
  """The finished checkpoint steps of a trainer workdir, ascending (empty if none)."""
  path = storage.path(workdir)
  if not (path / CHECKPOINT_DIR).is_dir():
    return []
  return _checkpoint_steps(path)[1]


def read_meta(path: str) -> Dict[str, Any]:
  """``{'model', 'kwargs', 'class_names', 'source'}`` of a pretrained directory or a workdir."""
  path = storage.path(path)
  if (path / META_FILE).exists():
    meta = storage.read_json(path / META_FILE)
    if not isinstance(meta, dict) or not isinstance(meta.get('model'), str) or \
        not isinstance(meta.get('kwargs'), dict):
      raise MetaError(f'{path / META_FILE}: not a dtf_jax meta.json (needs "model" and "kwargs")')
    meta.setdefault('class_names', None)
    meta.setdefault('source', None)
    meta.setdefault('variables', VARIABLES_DIR)
    name = meta['variables']
    # A name inside the directory: no separator, no '..' (a meta.json must not reach elsewhere).
    if not isinstance(name, str) or not name.startswith(VARIABLES_DIR) or '/' in name or \
        os.sep in name or '\\' in name or name in ('.', '..'):
      raise MetaError(f'{path / META_FILE}: "variables" must name a {VARIABLES_DIR}* folder in '
                      f'{path}, not {name!r}')
    return meta
  if (path / CONFIG_FILE).exists():
    config = storage.read_json(path / CONFIG_FILE)
    name, kwargs = config_model_kwargs(config)
    kwargs['dtype'] = str(kwargs['dtype'])
    return {'model': name, 'kwargs': kwargs, 'class_names': config.get('class_names'),
            'source': {'kind': 'workdir', 'path': str(path)}}
  raise FileNotFoundError(f'{path}: neither a dtf_jax pretrained directory ({META_FILE} and '
                          f'{VARIABLES_DIR}/) nor a trainer workdir ({CONFIG_FILE} and '
                          f'{CHECKPOINT_DIR}/)')


def _restore_variables(state_dir: epath.Path) -> Dict[str, Any]:
  """``params`` and ``batch_stats`` of a trainer checkpoint, as numpy (optimizer state unread)."""
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(state_dir).item_metadata
  if metadata is None:
    raise CheckpointError(f'{state_dir}: its array metadata cannot be read (damaged or '
                          'incomplete)')
  tree = metadata.tree
  item = {k: jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree[k])
          for k in ('params', 'batch_stats') if k in tree}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  return checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))


def load_pretrained(path: str, step: Optional[int] = None,
                    **overrides: Any) -> Tuple[nn.Module, Dict[str, Any]]:
  """Rebuilds the model and restores its variables (as host arrays) from a pretrained directory
  or a trainer workdir (its latest checkpoint, or ``step``).

  ``overrides`` replace model arguments that do not change parameter shapes (e.g. ``dtype``,
  ``dropout_rate``).
  """
  meta = read_meta(path)
  kwargs = dict(meta['kwargs'], **overrides)
  if isinstance(kwargs.get('dtype'), str):
    kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
  model = create_model(meta['model'], **kwargs)
  path = storage.path(path)
  if (path / META_FILE).exists():
    if step is not None:
      raise CheckpointError(f'{path} is a pretrained directory: it has no steps (step={step})')
    with ocp.StandardCheckpointer() as checkpointer:
      variables = checkpointer.restore(path / meta['variables'])
  else:
    checkpoints, steps = _checkpoint_steps(path)
    if not steps:
      raise FileNotFoundError(f'{path}: no checkpoint in {checkpoints}')
    if step is not None and step not in steps:
      raise FileNotFoundError(f'{path}: no checkpoint for step {step} (steps: {steps})')
    variables = _restore_newest(checkpoints, [step] if step is not None else steps[::-1])
  check_variables(variables, model, f'{path} ({meta["model"]})')
  return model, variables


def _restore_newest(checkpoints: epath.Path, steps: Sequence[int]) -> Dict[str, Any]:
  """The variables of the first of ``steps`` that restores; a damaged one is skipped with a
  warning naming it and the step used. ``CheckpointError`` if none restores."""
  errors = []
  for step in steps:
    try:
      variables = _restore_variables(checkpoints / str(step) / STATE_ITEM)
    except Exception as e:  # pylint: disable=broad-except  # orbax raises many kinds
      errors.append(f'checkpoint {step} in {checkpoints} does not restore: {error_reason(e)}')
      quiet_closed_event_loop_noise()  # the failed reads' leftovers: hundreds of tracebacks
      continue
    for error in errors:
      print(f'warning: skipped {error}; using step {step}', file=sys.stderr, flush=True)
    return variables
  raise CheckpointError(errors[0] + (f' (nor do the {len(errors) - 1} before it)'
                                     if len(errors) > 1 else ''))


def check_variables(variables: Mapping[str, Any], model: nn.Module, what: str) -> None:
  """Raises ``VariablesMismatchError`` unless ``variables`` has exactly the names and shapes of
  ``model``'s ``params`` and ``batch_stats`` (a file's metadata can disagree with its arrays)."""
  want = {f'{c}/{k}': tuple(v.shape) for c, flat in variable_shapes(model).items()
          for k, v in flat.items()}
  have = {f'{c}/{"/".join(k)}': tuple(np.shape(v)) for c in ('params', 'batch_stats')
          for k, v in traverse_util.flatten_dict(dict(variables.get(c, {}))).items()}
  problems = []
  for label, names in (('missing', sorted(want.keys() - have.keys())),
                       ('unexpected', sorted(have.keys() - want.keys()))):
    if names:
      problems.append(f'{len(names)} {label} ({", ".join(names[:4])}{", ..." * (len(names) > 4)})')
  shapes = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
  if shapes:
    problems.append(f'{len(shapes)} of another shape (' + ', '.join(
        f'{k}: {have[k]} for {want[k]}' for k in shapes[:4]) + ', ...' * (len(shapes) > 4) + ')')
  if problems:
    raise VariablesMismatchError(f'{what}: the arrays do not fit the model: '
                                 f'{"; ".join(problems)}')

"""Saving and loading model variables with the arguments that rebuild the model.

A pretrained directory holds ``variables/`` (an orbax checkpoint of ``{'params', 'batch_stats'}``)
and ``meta.json`` (``{"model": name, "kwargs": {...}}``, the arguments of ``create_model``)::

    model, variables = dtf_jax.pretrained.load_pretrained('dtf_r50_k400')
    logits = model.apply(variables, video, train=False)
"""

import json
import os
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from dtf_jax.models import create_model

META_FILE = 'meta.json'
VARIABLES_DIR = 'variables'


def _json_ready(value):
  if isinstance(value, tuple):
    return list(value)
  if not isinstance(value, (int, float, str, bool, list, type(None))):
    return str(jax.numpy.dtype(value))  # dtypes
  return value


def save_pretrained(directory: str, model_name: str, model_kwargs: Dict[str, Any],
                    variables: Dict[str, Any], *, overwrite: bool = False) -> str:
  """Writes ``variables`` and ``meta.json`` under ``directory``; returns its absolute path.

  ``model_kwargs`` must include ``num_classes`` and ``clip_length``. Both files are written
  atomically (orbax renames a finished temporary directory; ``meta.json`` is renamed into place).
  """
  directory = os.path.abspath(directory)
  target = os.path.join(directory, VARIABLES_DIR)
  if os.path.exists(target) and not overwrite:
    raise FileExistsError(f'{target} exists; pass overwrite=True (--overwrite) to replace it.')
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(target, variables, force=overwrite)
  meta = {'model': model_name, 'kwargs': {k: _json_ready(v) for k, v in model_kwargs.items()}}
  tmp = os.path.join(directory, META_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, os.path.join(directory, META_FILE))
  return directory


def load_pretrained(directory: str, **overrides: Any) -> Tuple[nn.Module, Dict[str, Any]]:
  """Rebuilds the model from ``meta.json`` and restores its variables (as host arrays).

  ``overrides`` replace model arguments that do not change parameter shapes (e.g. ``dtype``,
  ``dropout_rate``).
  """
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, META_FILE)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f'{meta_path} not found: not a dtf_jax pretrained directory '
                            f'(expected {META_FILE} and {VARIABLES_DIR}/).')
  with open(meta_path) as f:
    meta = json.load(f)
  kwargs = dict(meta['kwargs'], **overrides)
  model = create_model(meta['model'], **kwargs)
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(os.path.join(directory, VARIABLES_DIR))
  return model, variables

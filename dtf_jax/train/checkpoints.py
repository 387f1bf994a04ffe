"""Checkpoints (orbax, ``workdir/checkpoints``), ``config.json``, and starting from other weights.

A checkpoint holds params, optimizer state, batch stats, step, rng and the input position; the
last ``keep_checkpoints`` are kept plus the best by eval top-1.
"""

import json
from typing import Any, Dict, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from dtf_jax import convert, storage
from dtf_jax.errors import quiet_closed_event_loop_noise
from dtf_jax.models import model_spec
from dtf_jax.pretrained import CHECKPOINT_DIR, CONFIG_FILE, STATE_ITEM, CheckpointError, \
    VariablesMismatchError, error_reason, load_pretrained
from dtf_jax.train.config import Setup, log
from dtf_jax.train.state import TrainState


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """Keeps the last ``keep`` checkpoints and the best one by eval top-1."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(keep),
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m['top1'], n=1,
                                    keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(storage.path(workdir) / CHECKPOINT_DIR, options=options,
                               item_names=('state', 'progress'))


def save_checkpoint(manager, state: TrainState, progress: dict, metrics=None) -> None:
  step = int(progress['step'])
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             progress=ocp.args.JsonSave(progress)),
               metrics=metrics, force=True)
  manager.wait_until_finished()


def restore_checkpoint(manager, step: int, s: Setup) -> Tuple[TrainState, dict]:
  """Restores onto this run's mesh and shardings (any device count)."""
  target = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        s.abstract_state, s.state_sharding)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore()))
  return restored.state, restored.progress


def restore_variables(manager, step: int, s: Setup) -> Tuple[Dict[str, Any], dict]:
  """``({'params', 'batch_stats'}, {})`` of ``step`` on this run's shardings, for eval: the
  optimizer state is not read."""
  target = {k: jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                            getattr(s.abstract_state, k), getattr(s.state_sharding, k))
            for k in ('params', 'batch_stats')}
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
      target)
  path = storage.path(manager.directory) / str(step) / STATE_ITEM
  variables = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True))
  return variables, {}


def restore_step(manager, step: int, s: Setup, restore=restore_checkpoint):
  """``restore(manager, step, s)`` (:func:`restore_checkpoint` or :func:`restore_variables`),
  failing with one line (:class:`CheckpointError`)."""
  try:
    return restore(manager, step, s)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'checkpoint {step} in {manager.directory} does not restore: '
                          f'{error_reason(e)}') from e


def restore_latest(manager, s: Setup, set_aside: bool = False, restore=restore_checkpoint):
  """The newest checkpoint that restores: ``(state, progress, step)``, or ``None`` when there is
  none. A newer one that does not restore is skipped, with its reason logged, and with
  ``set_aside`` renamed to ``STEP.unreadable`` (kept for inspection, out of the resumed run's
  way). If no checkpoint restores, the newest one's error is raised: a config that fits none of
  them must not start the run afresh."""
  steps = sorted(manager.all_steps(), reverse=True)
  errors = []
  for step in steps:
    try:
      state, progress = restore_step(manager, step, s, restore)
    except CheckpointError as e:
      errors.append(e)
      quiet_closed_event_loop_noise()  # the failed reads' leftovers: hundreds of tracebacks
      continue
    for skipped, error in zip(steps, errors):
      log(f'skipped {error}')
      if set_aside:
        path = storage.path(manager.directory) / str(skipped)
        path.rename(path.parent / f'{skipped}.unreadable')
        log(f'  set aside as {path}.unreadable')
    if errors and set_aside:
      manager.reload()
    return state, progress, step
  if errors:
    raise errors[0]
  return None


def load_init_arrays(path: str, s: Setup) -> Tuple[Dict[str, Any], set]:
  """Arrays to start from, flat (``'params/a/b'``), and those to keep at their fresh
  initialisation. ``path``: a checkpoint file (``.pth``/``.pt``/``.safetensors``: official DTF, or
  ImageNet ResNet / Swin inflated with ``config.init_stem``; the conversion report is logged), a
  pretrained dir (``meta.json``) or a trainer workdir (its latest checkpoint)."""
  location = storage.path(path)
  if not location.exists():
    raise FileNotFoundError(f'init_from={path!r} does not exist')
  if not location.is_dir():
    try:
      loaded, report = convert.map_state_dict(s.model, convert.read_state_dict(path),
                                              source='auto', stem_init=s.config.init_stem)
    except convert.ConversionError as e:
      raise CheckpointError(f'init_from {path}: {e}') from None
    log(f'init_from {path}:\n{report.format()}')
    return ({f'{c}/{p}': v for c, arrays in loaded.items() for p, v in arrays.items()},
            {target for target, _, _ in report.initialised})
  _, variables = load_pretrained(path)
  loaded = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  return traverse_util.flatten_dict(loaded, sep='/'), set()


def init_from(state: TrainState, path: str, s: Setup) -> TrainState:
  """Params and batch stats from ``path`` (see :func:`load_init_arrays`).

  Arrays of the classifier (``head``) with another shape (another number of classes) keep their
  fresh initialisation, as do those a conversion leaves out (DTF blocks and the head when
  inflating ImageNet weights); any other mismatch is an error naming the arrays."""
  have, keep_fresh = load_init_arrays(path, s)
  classifier = model_spec(s.model).classifier
  current = {'params': state.params, 'batch_stats': state.batch_stats}
  want = traverse_util.flatten_dict(current, sep='/')
  missing = sorted(set(want) - set(have) - keep_fresh)
  unexpected = sorted(set(have) - set(want))
  reinit = sorted(k for k in set(want) & set(have)
                  if np.shape(want[k]) != np.shape(have[k]) and k.split('/')[1] == classifier)
  mismatched = sorted(f'{k}: checkpoint {np.shape(have[k])} vs model {np.shape(want[k])}'
                      for k in set(want) & set(have)
                      if np.shape(want[k]) != np.shape(have[k]) and k not in reinit)
  if missing or unexpected or mismatched:
    hint = (' (config.model.patch_norm=True needs a checkpoint with a patch-embedding norm)'
            if any('patch_embed_norm' in k for k in missing) else '')
    raise VariablesMismatchError(
        f'init_from {path}: missing {missing[:10]}, unexpected {unexpected[:10]}, shape '
        f'mismatch {mismatched[:10]}{hint}')
  fresh = set(reinit) | (set(want) - set(have))
  merged = traverse_util.unflatten_dict(
      {k: old if k in fresh else jax.device_put(np.asarray(have[k], old.dtype), old.sharding)
       for k, old in want.items()}, sep='/')
  if reinit:
    log(f'init_from {path}: classifier re-initialised ({", ".join(reinit)})')
  log(f'init_from {path}: loaded {len(want) - len(fresh)} arrays, {len(fresh)} freshly '
      f'initialised')
  params = merged['params']
  return state.replace(params=params, batch_stats=merged.get('batch_stats', {}),
                       opt_state=jax.jit(s.tx.init, out_shardings=s.state_sharding.opt_state)(
                           params))


def write_config(config, workdir: str, class_names) -> None:
  """``workdir/config.json``: the resolved config plus the training data's ``class_names`` (what
  ``dtf_jax.pretrained.load_pretrained(workdir)`` rebuilds the model from)."""
  if jax.process_index() == 0:
    workdir = storage.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = json.loads(config.to_json_best_effort())
    data['class_names'] = list(class_names)
    storage.write_json(workdir / CONFIG_FILE, data, sort_keys=True)

"""The training loop: steps, logs, checkpoints, periodic eval, SIGTERM, the workdir's lock."""

import contextlib
import signal
import time
from typing import Optional

import jax
import ml_collections
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions
from jax.experimental import multihost_utils

from dtf_jax import lockfile, storage
from dtf_jax.data import pipeline
from dtf_jax.train.checkpoints import checkpoint_manager, init_from, restore_latest, \
    save_checkpoint, write_config
from dtf_jax.train.config import log, setup, train_data
from dtf_jax.train.evaluate import evaluate
from dtf_jax.train.sharding import to_global
from dtf_jax.train.step import NonFiniteLossError, make_train_step


class _Preemption:
  """Turns SIGTERM into a flag read at step boundaries."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, manager, step: int, every: int) -> bool:
    """This process got SIGTERM; with several processes, checked every ``every`` steps (all
    processes agree through a collective, and orbax's preemption notice is honoured)."""
    if jax.process_count() == 1:
      return self.requested
    if step % every:
      return False
    flag = multihost_utils.process_allgather(np.array(self.requested)).any()
    return bool(flag) or manager.reached_preemption(step)


# A training run holds WORKDIR/train.lock (dtf_jax.lockfile): a second run on the same workdir is
# refused; evaluation does not take it and may share the workdir.
TRAIN_LOCK = 'train.lock'
_HOLDER = 'training run'


@contextlib.contextmanager
def workdir_lock(workdir):
  """Process 0 holds ``workdir/train.lock`` while the block runs; every process raises
  ``lockfile.LockHeld`` if it cannot be taken. Yields the lock's path."""
  lock = storage.path(workdir) / TRAIN_LOCK
  with contextlib.ExitStack() as stack:
    error = ''
    if jax.process_index() == 0:
      try:
        stack.enter_context(lockfile.hold(lock, _HOLDER))
      except lockfile.LockHeld as e:
        error = str(e)
    if jax.process_count() > 1:
      failed = bool(multihost_utils.process_allgather(np.array(bool(error))).any())
      error = error or (f'process 0 could not take the workdir lock {lock}' if failed else '')
    if error:
      raise lockfile.LockHeld(error)
    yield lock


def train(config: ml_collections.ConfigDict, workdir: str, with_eval: bool = False,
          stop_after: Optional[int] = None):
  """Trains (resuming from the latest checkpoint in ``workdir``); returns the final state and,
  with ``with_eval``, the last eval results. ``stop_after``: save and return after that many
  steps of this call (a time-limited job; the next call resumes). Holds the workdir's lock
  (:func:`workdir_lock`) throughout: ``lockfile.LockHeld`` if another run holds it."""
  with workdir_lock(workdir) as lock:
    return _train(config, storage.path(workdir), with_eval, stop_after, lock)


def _train(config, workdir, with_eval, stop_after, lock):
  s = setup(config)
  writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
  manager = checkpoint_manager(workdir, config.keep_checkpoints)
  progress = {'step': 0, 'data_index': 0}
  restored = restore_latest(manager, s, set_aside=jax.process_index() == 0)
  if restored is not None:
    state, progress, latest = restored
    log(f'resumed from {manager.directory}/{latest} (input position {progress["data_index"]})')
  else:
    state = s.init_state()
    if config.init_from:
      state = init_from(state, config.init_from, s)
  # Only now: a config that cannot restore the checkpoints must not replace the one that can.
  write_config(config, workdir, s.train_source.class_names)
  if jax.process_index() == 0:
    parameter_overview.log_parameter_overview(state.params)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  log(f'{config.model.name}: {num_params:,} parameters; mesh {dict(s.mesh.shape)}; '
      f'{s.total_steps} steps ({s.steps_per_epoch} per epoch), global batch {config.batch_size}')
  train_step = make_train_step(s)
  per_host = config.batch_size // jax.process_count()
  step = int(progress['step'])
  data_index = int(progress['data_index'])
  batches = pipeline.guarded(s.train_source, train_data(config, s, data_index))
  report = periodic_actions.ReportProgress(num_train_steps=s.total_steps, writer=writer)
  eval_results = None
  window, window_start = [], time.time()  # metrics of the steps since the last log
  pending = None  # (step, metrics) whose loss is checked while the next step runs

  def check_finite(step_done, m):
    # A finite loss with a non-finite gradient would still leave NaN parameters behind.
    loss, grad_norm = float(m['loss']), float(m['grad_norm'])
    if not (np.isfinite(loss) and np.isfinite(grad_norm)):
      raise NonFiniteLossError(
          f'loss is {loss} (gradient norm {grad_norm}) at step {step_done}; stopping. The last '
          f'good checkpoint is {manager.latest_step()} in {manager.directory}')
    return m

  end = s.total_steps if stop_after is None else min(s.total_steps, step + stop_after)
  try:
    with _Preemption() as preemption:
      while step < end:
        state, m = train_step(state, to_global(next(batches), s.batch_sharding))
        step += 1
        data_index += per_host
        if pending is not None:
          window.append(check_finite(*pending))
        pending = (step, m)
        report(step)
        last = step == end
        log_now = step % config.log_every_steps == 0 or last
        eval_now = with_eval and (step == s.total_steps or (
            config.eval_every_steps > 0 and step % config.eval_every_steps == 0))
        preempted = preemption.reached(manager, step, config.preemption_check_steps)
        preempted = preempted and not last
        save_now = eval_now or preempted or last or step % config.checkpoint_every_steps == 0
        if log_now or save_now:
          window.append(check_finite(*pending))
          pending = None
        if log_now:
          summary = {f'train/{k}': float(np.mean([float(w[k]) for w in window])) for k in window[0]}
          summary['train/clips_per_second'] = (len(window) * config.batch_size /
                                               (time.time() - window_start))
          writer.write_scalars(step, summary)
          window, window_start = [], time.time()
        paused = time.time()
        if eval_now:
          eval_results = evaluate(s, {'params': state.params, 'batch_stats': state.batch_stats},
                                    step, workdir, writer)
        if save_now:
          if jax.process_index() == 0:  # in a bucket the lock is advisory: still ours?
            lockfile.check(lock, _HOLDER)
          save_checkpoint(manager, state, {'step': step, 'data_index': data_index},
                          {'top1': eval_results['top1']}
                          if eval_now and eval_results['labelled'] else None)
        window_start += time.time() - paused  # clips/s counts training time only
        if preempted:
          log(f'SIGTERM: saved step {step} in {manager.directory}; exiting')
          break
  finally:  # also when a non-finite loss or an error stops the run
    writer.flush()
    writer.close()
    manager.close()
  return state, eval_results

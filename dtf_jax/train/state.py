"""The training state and the optimisation recipe (schedule, optimizer)."""

from typing import Any

import jax
import optax
from flax import struct


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def lr_schedule(config, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up from peak/100, then cosine to ``lr.end``; peak scaled with the batch size."""
  peak = config.lr.base * config.batch_size / config.lr.base_batch
  warmup = min(int(round(config.lr.warmup_epochs * steps_per_epoch)), total_steps - 1)
  return optax.warmup_cosine_decay_schedule(peak / 100, peak, max(warmup, 0), total_steps,
                                            end_value=config.lr.end)


def make_optimizer(config, schedule) -> optax.GradientTransformation:
  opt = config.optimizer
  parts = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm > 0 else []
  if opt.name == 'sgd':  # PyTorch SGD: weight decay added to the gradient, then momentum.
    parts += [optax.add_decayed_weights(opt.weight_decay),
              optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov)]
  else:
    parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay))
  return optax.chain(*parts)

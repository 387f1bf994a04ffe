"""Training and evaluation on a device mesh: one config-driven loop (fields: ``configs/base.py``).

    state = train(config, workdir)              # --mode=train (resumes from workdir if it can)
    results = evaluate_checkpoint(config, workdir)   # --mode=eval

Mesh ``('data', 'fsdp')``: batches are split over all devices; parameters and optimizer state are
replicated, or with ``mesh.fsdp > 1`` sharded along their largest dimension divisible by it. Host
batches become global arrays with ``jax.make_array_from_process_local_data``; the step is jitted
with the state donated. Batch-norm statistics are those of the global (micro-)batch.

Checkpoints (``workdir/checkpoints``, orbax): params, optimizer state, batch stats, step, rng and
the input position; the last ``keep_checkpoints`` plus the best by eval top-1. A restart resumes
from the latest one and continues the same data stream; SIGTERM saves and exits cleanly.
"""

import dataclasses
import functools
import json
import signal
import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dtf_jax.data import pipeline  # before clu: hides accelerators from TensorFlow
from dtf_jax import convert
from dtf_jax import metrics as metrics_lib
from dtf_jax.models import create_model, list_models
from dtf_jax.models.swin import SwinTransformer
from dtf_jax import multihost, storage
from dtf_jax.pretrained import CHECKPOINT_DIR, CONFIG_FILE, config_model_kwargs, load_pretrained

from clu import metric_writers, parameter_overview, periodic_actions  # noqa: E402

BATCH_AXES = ('data', 'fsdp')
FSDP_MIN_SIZE = 2 ** 12  # smaller arrays stay replicated under fsdp


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Config, mesh, model.


# validate_config's numeric ranges (every numeric field of configs/base.py).
POSITIVE_INTS = ('batch_size', 'grad_accum_steps', 'mesh.fsdp', 'eval_batch_size',
                 'data.clip_length', 'data.stride', 'data.size', 'data.eval_size',
                 'data.num_clips', 'data.num_classes', 'data.shuffle_buffer', 'lr.base_batch',
                 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints')
NON_NEGATIVE = ('num_epochs', 'total_steps', 'eval_every_steps', 'lr.warmup_epochs', 'lr.end',
                'optimizer.weight_decay', 'optimizer.grad_clip_norm', 'mixup_alpha',
                'cutmix_alpha')
BELOW_ONE = ('model.dropout_rate', 'model.drop_path_rate', 'label_smoothing', 'optimizer.momentum',
             'optimizer.b1', 'optimizer.b2')  # in [0, 1)
PROBABILITIES = ('data.colour_jitter_prob', 'data.grayscale_prob', 'data.blur_prob')  # [0, 1]
RANGES = ('data.scale_range', 'data.area_range', 'data.aspect_range', 'data.blur_sigma')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the field for a bad value (before anything heavy starts)."""
  def check(ok, field, message):
    if not ok:
      raise ValueError(f'config.{field}: {message}')
  check(config.model.name in list_models(), 'model.name',
        f'{config.model.name!r} is not one of {list_models()}')
  check(config.compute_dtype in ('float32', 'bfloat16'), 'compute_dtype',
        f"{config.compute_dtype!r} must be 'float32' or 'bfloat16'")
  check(config.optimizer.name in ('sgd', 'adamw'), 'optimizer.name',
        f"{config.optimizer.name!r} must be 'sgd' or 'adamw'")
  check(config.data.dataset.startswith(('tfrecord:', 'tfds:')), 'data.dataset',
        f"{config.data.dataset!r} must be 'tfrecord:DIR' or 'tfds:NAME'")
  check(config.data.crop in pipeline.TRAIN_CROPS, 'data.crop', f'must be in {pipeline.TRAIN_CROPS}')
  check(config.data.flip in pipeline.FLIP_MODES, 'data.flip', f'must be in {pipeline.FLIP_MODES}')
  check(config.data.num_crops in (1, 3), 'data.num_crops', 'must be 1 or 3')
  def value(field):
    node = config
    for part in field.split('.'):
      node = node[part]
    return node
  for field in POSITIVE_INTS:
    check(isinstance(value(field), int) and value(field) >= 1, field,
          f'must be a positive int, got {value(field)!r}')
  for field in NON_NEGATIVE:
    check(value(field) >= 0, field, f'must be >= 0, got {value(field)!r}')
  for field in BELOW_ONE:
    check(0 <= value(field) < 1, field, f'must be in [0, 1), got {value(field)!r}')
  for field in PROBABILITIES:
    check(0 <= value(field) <= 1, field, f'must be in [0, 1], got {value(field)!r}')
  for field in RANGES:
    low, high = value(field)
    check(0 < low <= high, field, f'must be (low, high) with 0 < low <= high, got {value(field)}')
  check(config.data.area_range[1] <= 1, 'data.area_range', 'is a fraction of the frame: <= 1')
  check(config.lr.base > 0, 'lr.base', f'must be > 0, got {config.lr.base!r}')
  check(config.eval_checkpoint_step >= -1, 'eval_checkpoint_step',
        f'must be a step >= 0, or -1 for the latest, got {config.eval_checkpoint_step!r}')
  jitter = tuple(config.data.colour_jitter)
  check(len(jitter) == 4 and min(jitter) >= 0 and jitter[3] <= 0.5, 'data.colour_jitter',
        f'must be (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, got {jitter}')
  check(config.batch_size % config.grad_accum_steps == 0, 'grad_accum_steps',
        f'{config.grad_accum_steps} does not divide batch_size {config.batch_size}')
  check(config.num_epochs > 0 or config.total_steps > 0, 'num_epochs',
        'num_epochs or total_steps must be > 0')
  check(config.init_stem in convert.STEM_INITS, 'init_stem', f'must be in {convert.STEM_INITS}')
  parsers = [('distributed.initialize', multihost.normalise_mode, config.distributed.initialize)]
  if config.data.dataset.startswith('tfrecord:'):  # local paths or supported URLs
    parsers.append(('data.dataset', storage.path, config.data.dataset[len('tfrecord:'):]))
  if config.init_from:
    parsers.append(('init_from', storage.path, config.init_from))
  for field, parse, value in parsers:
    try:
      parse(value)
    except ValueError as e:
      check(False, field, str(e))


def make_mesh(fsdp: int = 1) -> jax.sharding.Mesh:
  n = jax.device_count()
  if n % fsdp:
    raise ValueError(f'config.mesh.fsdp={fsdp} does not divide the {n} devices')
  return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def param_spec(shape: Tuple[int, ...], fsdp: int) -> P:
  """Shards the largest dimension divisible by ``fsdp`` over the 'fsdp' axis (big arrays only)."""
  if fsdp == 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return P(*[None] * dim, 'fsdp')
  return P()


def model_kwargs(config: ml_collections.ConfigDict, num_classes: int) -> Dict[str, Any]:
  return dict(config_model_kwargs(config)[1], num_classes=num_classes)


def build_model(config, num_classes):
  return create_model(config.model.name, **model_kwargs(config, num_classes))


# ---------------------------------------------------------------------------------------------
# Optimisation.


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


def cutmix_box(rng, height: int, width: int, lam):
  """A box covering about ``1 - lam`` of the frame (centre uniform, clipped at the borders):
  ``(y0, y1, x0, x1)`` int32 scalars."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (ratio * height).astype(jnp.int32), (ratio * width).astype(jnp.int32)
  rng_y, rng_x = jax.random.split(rng)
  cy = jax.random.randint(rng_y, (), 0, height)
  cx = jax.random.randint(rng_x, (), 0, width)
  return (jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height),
          jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width))


def mix_batch(rng, video, targets, mixup_alpha: float, cutmix_alpha: float):
  """Mixup or CutMix of a batch with itself reversed (example ``i`` with ``B - 1 - i``).

  ``video``: ``B T H W C``; ``targets``: ``B num_classes`` (soft labels). With both on, each
  batch uses one of them with probability 1/2. Mixup: ``lam ~ Beta(a, a)``, videos and targets
  mixed by ``lam``. CutMix: one box (the same in every frame) from the partner, ``lam`` = the
  kept area. Returns the mixed video and targets."""
  rng_choice, rng_lam, rng_box = jax.random.split(rng, 3)
  partner_video, partner_targets = video[::-1], targets[::-1]

  def mixup(_):
    lam = jax.random.beta(rng_lam, mixup_alpha, mixup_alpha)
    return (lam * video + (1 - lam) * partner_video).astype(video.dtype), lam

  def cutmix(_):
    height, width = video.shape[2], video.shape[3]
    lam = jax.random.beta(rng_lam, cutmix_alpha, cutmix_alpha)
    y0, y1, x0, x1 = cutmix_box(rng_box, height, width, lam)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    return jnp.where(inside[None, None, :, :, None], partner_video, video), lam

  if mixup_alpha > 0 and cutmix_alpha > 0:
    video, lam = jax.lax.cond(jax.random.bernoulli(rng_choice), cutmix, mixup, None)
  else:
    video, lam = (mixup if mixup_alpha > 0 else cutmix)(None)
  return video, lam * targets + (1 - lam) * partner_targets


def make_train_step(model, tx, schedule, config, state_sharding, batch_sharding):
  """Jitted ``(state, batch) -> (state, metrics)`` with the state donated."""
  accum = config.grad_accum_steps
  smoothing = config.label_smoothing
  mixing = config.mixup_alpha > 0 or config.cutmix_alpha > 0

  def micro_step(params, batch_stats, batch, rng):
    video = batch['video']
    targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], model.num_classes), smoothing)
    if mixing:
      rng, mix_rng = jax.random.split(rng)
      video, targets = mix_batch(mix_rng, video, targets, config.mixup_alpha,
                                 config.cutmix_alpha)

    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats},
                                    video, train=True, mutable=['batch_stats'],
                                    rngs={'dropout': rng})
      loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
      return loss.mean(), (logits, updates)
    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    correct = jnp.sum(jnp.argmax(logits, -1) == batch['label'])
    return grads, updates['batch_stats'], loss, correct

  def step_fn(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if accum == 1:
      grads, batch_stats, loss, correct = micro_step(state.params, state.batch_stats, batch, rng)
    else:  # Micro-batch i holds examples i, i + accum, ... (each device keeps its rows).
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1),
          batch)

      def body(carry, xs):
        grads_sum, batch_stats, loss_sum, correct_sum = carry
        mb, i = xs
        mb = jax.lax.with_sharding_constraint(mb, batch_sharding)
        g, batch_stats, loss, correct = micro_step(state.params, batch_stats, mb,
                                                   jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, grads_sum, g), batch_stats, loss_sum + loss,
                correct_sum + correct), None
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, batch_stats, loss, correct), _ = jax.lax.scan(
          body, (zeros, state.batch_stats, 0.0, 0), (micro, jnp.arange(accum)))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'accuracy': correct / batch['label'].shape[0],
               'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  replicated = NamedSharding(batch_sharding.mesh, P())
  return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)


# ---------------------------------------------------------------------------------------------
# State creation, checkpoints, initialisation from pretrained weights.


@dataclasses.dataclass
class Setup:
  """Everything derived from the config: model, data sources, schedule, shardings."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model: Any
  train_source: Optional[pipeline.VideoSource]
  total_steps: int
  steps_per_epoch: int
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  abstract_state: TrainState
  state_sharding: Any
  batch_sharding: NamedSharding
  init_fn: Any  # rng -> TrainState

  def init_state(self) -> TrainState:
    return jax.jit(self.init_fn, out_shardings=self.state_sharding)(
        jax.random.PRNGKey(self.config.seed))


def setup(config: ml_collections.ConfigDict, with_train_data: bool = True) -> Setup:
  validate_config(config)
  mesh = make_mesh(config.mesh.fsdp)
  if config.batch_size % jax.device_count():
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the '
                     f'{jax.device_count()} devices')
  if (config.batch_size // config.grad_accum_steps) % jax.device_count():
    raise ValueError(f'micro-batch {config.batch_size // config.grad_accum_steps} '
                     f'(batch_size / grad_accum_steps) is not divisible by the '
                     f'{jax.device_count()} devices')
  train_source = None
  steps_per_epoch = 1
  if with_train_data:
    train_source = pipeline.make_source(config.data.dataset, config.data.train_split,
                                        config.data.data_dir or None, jax.process_count())
    _check_classes(config, train_source)
    steps_per_epoch = max(train_source.num_videos // config.batch_size, 1)
  total_steps = config.total_steps or int(config.num_epochs * steps_per_epoch)
  model = build_model(config, config.data.num_classes)
  schedule = lr_schedule(config, total_steps, steps_per_epoch)
  tx = make_optimizer(config, schedule)
  shape = (1, config.data.clip_length, config.data.size, config.data.size, 3)

  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros(shape, jnp.float32), train=False)
    return TrainState(step=jnp.array(0, jnp.int32), params=variables['params'],
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(variables['params']), rng=state_rng)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  state_sharding = jax.tree.map(
      lambda x: NamedSharding(mesh, param_spec(x.shape, config.mesh.fsdp)), abstract)
  batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
  return Setup(config, mesh, model, train_source, total_steps, steps_per_epoch, schedule, tx,
               abstract, state_sharding, batch_sharding, init)


def _check_classes(config, source: pipeline.VideoSource) -> None:
  if source.num_classes != config.data.num_classes:
    raise ValueError(f'config.data.num_classes={config.data.num_classes} but {source.name} '
                     f'[{source.split}] has {source.num_classes} classes')


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
      raise ValueError(f'init_from {path}: {e}') from None
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
  current = {'params': state.params, 'batch_stats': state.batch_stats}
  want = traverse_util.flatten_dict(current, sep='/')
  missing = sorted(set(want) - set(have) - keep_fresh)
  unexpected = sorted(set(have) - set(want))
  reinit = sorted(k for k in set(want) & set(have)
                  if np.shape(want[k]) != np.shape(have[k]) and k.split('/')[1] == 'head')
  mismatched = sorted(f'{k}: checkpoint {np.shape(have[k])} vs model {np.shape(want[k])}'
                      for k in set(want) & set(have)
                      if np.shape(want[k]) != np.shape(have[k]) and k not in reinit)
  if missing or unexpected or mismatched:
    hint = (' (config.model.patch_norm=True needs a checkpoint with a patch-embedding norm)'
            if any('patch_embed_norm' in k for k in missing) else '')
    raise ValueError(f'init_from {path}: missing {missing[:10]}, unexpected {unexpected[:10]}, '
                     f'shape mismatch {mismatched[:10]}{hint}')
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


# ---------------------------------------------------------------------------------------------
# Data on the mesh.


def to_global(batch: Dict[str, np.ndarray], sharding: NamedSharding, keys=('video', 'label')):
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in keys}


def host_local(array: jax.Array, mesh) -> np.ndarray:
  """The rows of a batch-sharded global array that this process fed in."""
  return np.asarray(multihost_utils.global_array_to_host_local_array(array, mesh, P(BATCH_AXES)))


def train_data(config, s: Setup, start_index: int):
  per_host = config.batch_size // jax.process_count()
  return pipeline.train_dataset(
      s.train_source, batch_size=per_host, clip_length=config.data.clip_length,
      stride=config.data.stride, size=config.data.size, crop=config.data.crop,
      scale_range=tuple(config.data.scale_range), area_range=tuple(config.data.area_range),
      aspect_range=tuple(config.data.aspect_range),
      flip=config.data.flip, flip_pairs=tuple(map(tuple, config.data.flip_pairs)),
      colour_jitter=tuple(config.data.colour_jitter),
      colour_jitter_prob=config.data.colour_jitter_prob, grayscale_prob=config.data.grayscale_prob,
      blur_prob=config.data.blur_prob, blur_sigma=tuple(config.data.blur_sigma),
      shuffle_buffer=config.data.shuffle_buffer, seed=config.seed, start_index=start_index,
      process_index=jax.process_index())


# ---------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(config, s: Setup, state: TrainState, step: int, workdir: str,
             writer=None) -> Dict[str, float]:
  """Multi-view evaluation of ``state`` on ``data.eval_split``; writes the report files under
  ``workdir/eval_step{step}`` (process 0) and returns ``metrics.split_metrics``: top-1, top-5 and
  mean class accuracy, or only the video count of an unlabelled split."""
  source = pipeline.make_source(config.data.dataset, config.data.eval_split,
                                config.data.data_dir or None, jax.process_count())
  _check_classes(config, source)
  if config.eval_batch_size % jax.device_count():
    raise ValueError(f'config.eval_batch_size={config.eval_batch_size} is not divisible by the '
                     f'{jax.device_count()} devices')
  per_host = config.eval_batch_size // jax.process_count()
  data = pipeline.eval_dataset(
      source, batch_size=per_host, clip_length=config.data.clip_length, stride=config.data.stride,
      size=config.data.eval_size, num_clips=config.data.num_clips,
      num_crops=config.data.num_crops, process_index=jax.process_index())
  model = s.model
  if isinstance(model, SwinTransformer):  # attention masks follow the frame size
    model = model.clone(image_size=config.data.eval_size)

  @functools.partial(jax.jit, out_shardings=s.batch_sharding)
  def predict(variables, video):
    return jax.nn.softmax(model.apply(variables, video, train=False).astype(jnp.float32))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  scores, indices, labels, ids = [], [], [], {}
  start = time.time()
  for i, batch in enumerate(data.dataset.as_numpy_iterator()):
    video = jax.make_array_from_process_local_data(s.batch_sharding, batch['video'])
    local = host_local(predict(variables, video), s.mesh)
    keep = batch['mask']
    scores.append(local[keep])
    indices.append(batch['video_index'][keep])
    labels.append(batch['label'][keep])
    ids.update(zip(batch['video_index'][keep].tolist(),
                   (v.decode() for v in batch['video_id'][keep])))
    if (i + 1) % 50 == 0 or i + 1 == data.num_batches:
      log(f'eval: {i + 1}/{data.num_batches} batches ({time.time() - start:.0f} s)')
  num_classes = config.data.num_classes
  scores = np.concatenate(scores) if scores else np.zeros((0, num_classes), np.float32)
  indices = np.concatenate(indices) if indices else np.zeros((0,), np.int64)
  labels = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
  video_scores, counts, video_labels, video_ids = _gather_videos(
      scores, indices, labels, ids, source)
  if not np.all(counts == data.views_per_video):
    raise RuntimeError(f'eval: views per video {np.unique(counts)}, expected '
                       f'{data.views_per_video} for each of {source.num_videos} videos')
  extra = {'step': step, 'num_views': int(counts.sum()), 'split': config.data.eval_split,
           'views_per_video': data.views_per_video}
  directory = storage.path(workdir) / f'eval_step{step}'
  if jax.process_index() == 0:
    results = metrics_lib.write_eval_report(directory, video_scores, video_labels, video_ids,
                                            source.class_names, extra)
  else:
    results = metrics_lib.split_metrics(video_scores, video_labels)
  views = f'({source.num_videos} videos x {data.views_per_video} views) -> {directory}'
  if not results['labelled']:
    log(f'eval step {step}: {config.data.eval_split} is unlabelled: predictions only, no '
        f'accuracy {views}')
    return results
  if writer is not None:
    writer.write_scalars(step, {f'eval/{k}': results[k]
                                for k in ('top1', 'top5', 'mean_class_accuracy')})
  log(f'eval step {step}: top1 {results["top1"]:.4f} top5 {results["top5"]:.4f} mean class '
      f'{results["mean_class_accuracy"]:.4f} {views}')
  return results


ID_BYTES = 256


def _gather_videos(scores, indices, labels, ids, source):
  """This host's view scores -> all videos' mean scores, counts, labels and ids (every host)."""
  num_videos = source.num_videos
  local_index = np.array(sorted(ids), np.int64)
  position = {v: i for i, v in enumerate(local_index)}
  rows = np.array([position[v] for v in indices], np.int64)
  means, counts = metrics_lib.aggregate_views(scores, rows, len(local_index))
  video_labels = np.zeros(len(local_index), np.int64)
  video_labels[rows] = labels
  id_bytes = np.zeros((len(local_index), ID_BYTES), np.uint8)
  for i, v in enumerate(local_index):
    raw = ids[v].encode()[:ID_BYTES]
    id_bytes[i, :len(raw)] = np.frombuffer(raw, np.uint8)
  if jax.process_count() > 1:  # Pad to the largest host, gather, drop the padding.
    size = max(source.host_sizes)
    pad = size - len(local_index)
    parts = [np.pad(local_index, (0, pad), constant_values=-1), np.pad(means, ((0, pad), (0, 0))),
             np.pad(counts, (0, pad)), np.pad(video_labels, (0, pad)),
             np.pad(id_bytes, ((0, pad), (0, 0)))]
    parts = [np.asarray(x).reshape(-1, *x.shape[2:])
             for x in multihost_utils.process_allgather(parts)]
    keep = parts[0] >= 0
    local_index, means, counts, video_labels, id_bytes = (x[keep] for x in parts)
  order = np.argsort(local_index)
  all_counts = np.zeros(num_videos, np.int64)
  all_counts[local_index] = counts
  if len(local_index) != num_videos or not np.array_equal(local_index[order],
                                                          np.arange(num_videos)):
    raise RuntimeError(f'eval: got {len(local_index)} of {num_videos} videos')
  video_ids = [bytes(b).rstrip(b'\0').decode() for b in id_bytes[order]]
  return means[order], all_counts, video_labels[order], video_ids


# ---------------------------------------------------------------------------------------------
# The loop.


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


def write_config(config, workdir: str, class_names) -> None:
  """``workdir/config.json``: the resolved config plus the training data's ``class_names`` (what
  ``dtf_jax.pretrained.load_pretrained(workdir)`` rebuilds the model from)."""
  if jax.process_index() == 0:
    workdir = storage.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = json.loads(config.to_json_best_effort())
    data['class_names'] = list(class_names)
    storage.write_json(workdir / CONFIG_FILE, data, sort_keys=True)


def train(config: ml_collections.ConfigDict, workdir: str, with_eval: bool = False,
          stop_after: Optional[int] = None):
  """Trains (resuming from the latest checkpoint in ``workdir``); returns the final state and,
  with ``with_eval``, the last eval results. ``stop_after``: save and return after that many
  steps of this call (a time-limited job; the next call resumes)."""
  workdir = storage.path(workdir)
  s = setup(config)
  writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
  manager = checkpoint_manager(workdir, config.keep_checkpoints)
  progress = {'step': 0, 'data_index': 0}
  latest = manager.latest_step()
  if latest is not None:
    state, progress = restore_checkpoint(manager, latest, s)
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
  train_step = make_train_step(s.model, s.tx, s.schedule, config, s.state_sharding,
                               s.batch_sharding)
  per_host = config.batch_size // jax.process_count()
  step = int(progress['step'])
  data_index = int(progress['data_index'])
  batches = iter(train_data(config, s, data_index))
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
      preempted = preemption.reached(manager, step, config.log_every_steps) and not last
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
        eval_results = evaluate(config, s, state, step, workdir, writer)
      if save_now:
        save_checkpoint(manager, state, {'step': step, 'data_index': data_index},
                        {'top1': eval_results['top1']}
                        if eval_now and eval_results['labelled'] else None)
      window_start += time.time() - paused  # clips/s counts training time only
      if preempted:
        log(f'SIGTERM: saved step {step} in {manager.directory}; exiting')
        break
  writer.flush()
  manager.close()
  return state, eval_results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """``--mode=eval``: the latest (or ``eval_checkpoint_step``) checkpoint of ``workdir``."""
  workdir = storage.path(workdir)
  s = setup(config, with_train_data=False)
  manager = checkpoint_manager(workdir, config.keep_checkpoints)
  step = manager.latest_step() if config.eval_checkpoint_step < 0 else config.eval_checkpoint_step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {manager.directory}')
  if step not in manager.all_steps():
    raise FileNotFoundError(f'no checkpoint for step {step} in {manager.directory} '
                            f'(steps: {list(manager.all_steps())})')
  state, _ = restore_checkpoint(manager, step, s)
  writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
  results = evaluate(config, s, state, step, workdir, writer)
  writer.flush()
  manager.close()
  return results


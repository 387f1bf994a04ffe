"""The config checked and turned into a :class:`Setup`: model, data sources, schedule, shardings."""

import dataclasses
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dtf_jax import convert, multihost, storage
from dtf_jax.data import hide_accelerators_from_tf, pipeline
from dtf_jax.models import create_model, list_models
from dtf_jax.pretrained import config_model_kwargs
from dtf_jax.train.sharding import BATCH_AXES, make_mesh, param_spec
from dtf_jax.train.state import TrainState, lr_schedule, make_optimizer


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


POSITIVE_INTS = ('batch_size', 'grad_accum_steps', 'mesh.fsdp', 'eval_batch_size',
                 'data.clip_length', 'data.stride', 'data.size', 'data.eval_size',
                 'data.num_clips', 'data.num_classes', 'data.shuffle_buffer', 'lr.base_batch',
                 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                 'preemption_check_steps')


NON_NEGATIVE = ('num_epochs', 'total_steps', 'eval_every_steps', 'lr.base', 'lr.warmup_epochs',
                'lr.end', 'optimizer.weight_decay', 'optimizer.grad_clip_norm', 'mixup_alpha',
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
  try:  # the model fields (e.g. model.remat) as create_model checks them
    build_model(config, config.data.num_classes)
  except ValueError as e:
    check(False, 'model', str(e))


def model_kwargs(config: ml_collections.ConfigDict, num_classes: int) -> Dict[str, Any]:
  return dict(config_model_kwargs(config)[1], num_classes=num_classes)


def build_model(config, num_classes):
  return create_model(config.model.name, **model_kwargs(config, num_classes))


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

  predict_fn: Any = None  # evaluate's jitted forward pass, compiled once per Setup

  def init_state(self) -> TrainState:
    return jax.jit(self.init_fn, out_shardings=self.state_sharding)(
        jax.random.PRNGKey(self.config.seed))


def check_batches(config: ml_collections.ConfigDict, num_devices: int, train: bool = True,
                  evaluation: bool = False) -> None:
  """The global batches (train and micro-batch, eval) against the device count."""
  sizes = ((('config.batch_size', config.batch_size),
            ('micro-batch (batch_size / grad_accum_steps)',
             config.batch_size // config.grad_accum_steps)) if train else ())
  if evaluation:
    sizes += (('config.eval_batch_size', config.eval_batch_size),)
  for what, size in sizes:
    if size % num_devices:
      raise ValueError(f'{what}={size} is not divisible by the {num_devices} devices')


def setup(config: ml_collections.ConfigDict, with_train_data: bool = True,
          devices=None) -> Setup:
  """Checks ``config`` and builds everything a run needs from it (not the state itself).
  ``devices``: the mesh's (default: all of JAX's; abstract TPU devices to compile ahead of
  time)."""
  validate_config(config)
  hide_accelerators_from_tf()  # before the input pipelines make TensorFlow create its devices
  mesh = make_mesh(config.mesh.fsdp, devices)
  check_batches(config, mesh.size)
  train_source = None
  steps_per_epoch = 1
  if with_train_data:
    train_source = pipeline.make_source(config.data.dataset, config.data.train_split,
                                        config.data.data_dir or None, jax.process_count(),
                                        config.data.skip_corrupt_records)
    check_classes(config, train_source)
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
  return Setup(config=config, mesh=mesh, model=model, train_source=train_source,
               total_steps=total_steps, steps_per_epoch=steps_per_epoch, schedule=schedule, tx=tx,
               abstract_state=abstract, state_sharding=state_sharding,
               batch_sharding=batch_sharding, init_fn=init)


def check_classes(config, source: pipeline.VideoSource) -> None:
  """The dataset's classes against ``data.num_classes``."""
  if source.num_classes != config.data.num_classes:
    raise ValueError(f'config.data.num_classes={config.data.num_classes} but {source.name} '
                     f'[{source.split}] has {source.num_classes} classes')


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

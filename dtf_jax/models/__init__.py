"""Model registry: ``create_model(name, num_classes=..., clip_length=..., **kwargs)``.

Names: ``c2d_r50``, ``dtf_r50``, ``c2d_r101``, ``dtf_r101`` (ResNet, see ``resnet.py``) and
``c2d_swin_{t,s,b,l}``, ``dtf_swin_{t,s,b,l}`` (Swin, see ``swin.py``). ``c2d_*`` are the same
backbones without a temporal module. Keyword arguments are the model's attributes; those that fix
the architecture of a name (e.g. ``temporal``) may still be overridden for ablations (``temporal``
takes any name of ``dtf_jax.layers.temporal.TEMPORAL_MODULES``).

Every model maps ``video B T H W 3`` to logits ``B num_classes``; ``model.apply(variables, video,
features=True)`` gives instead the pooled feature ``B D`` (float32) that the linear head maps to
those logits (``logits = features @ head.kernel + head.bias`` at eval).
"""

import dataclasses
import functools
import numbers
from typing import Any, Callable, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from dtf_jax.layers.aggregation import FA_IMPLS
from dtf_jax.layers.dtf import BLOCK_IMPLS, DTFBlock
from dtf_jax.layers.spectral import SPECTRAL_IMPLS
from dtf_jax.layers.temporal import FILTER_ESTIMATOR_NAMES, TEMPORAL_MODULES
from dtf_jax.models.common import REMAT_OPTIONS  # noqa: F401 (the values of `remat`)
from dtf_jax.models.common import ModelArgumentError
from dtf_jax.models.resnet import ResNet
from dtf_jax.models.swin import SwinTransformer

_SWIN_SIZES = {
    't': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    's': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    'b': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
    'l': dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.5),
}

@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What callers need to know of a model family without building a model."""
  family: str                          # 'resnet' or 'swin'
  classifier: str = 'head'             # the classifier's module (params['head'])
  size_argument: Optional[str] = None  # the create_model argument the frame size fixes, if any
  example_size: int = 64               # the frame size of example inputs when none fixes it


_SPECS = {ResNet: ModelSpec('resnet'),
          SwinTransformer: ModelSpec('swin', size_argument='image_size')}

_REGISTRY: Dict[str, tuple] = {}
for _temporal in ('c2d', 'dtf'):
  _kind = 'none' if _temporal == 'c2d' else 'dtf'
  for _depth, _stages in ((50, (3, 4, 6, 3)), (101, (3, 4, 23, 3))):
    _REGISTRY[f'{_temporal}_r{_depth}'] = (ResNet, dict(stage_sizes=_stages, temporal=_kind))
  for _size, _arch in _SWIN_SIZES.items():
    _REGISTRY[f'{_temporal}_swin_{_size}'] = (SwinTransformer, dict(_arch, temporal=_kind))


def list_models() -> List[str]:
  """Names accepted by :func:`create_model`."""
  return sorted(_REGISTRY)


def model_fields(cls: Callable) -> List[str]:
  """Attributes of a model class that can be set as keyword arguments."""
  return [f.name for f in dataclasses.fields(cls) if f.name not in ('parent', 'name')]


def model_arguments(name: str) -> List[str]:
  """The :func:`create_model` keyword arguments that model ``name`` takes (its attributes)."""
  if name not in _REGISTRY:
    raise ModelArgumentError(f'Unknown model {name!r}; known models: {", ".join(list_models())}.')
  return model_fields(_REGISTRY[name][0])


def model_spec(model) -> ModelSpec:
  """The :class:`ModelSpec` of a model name or of a model built by :func:`create_model`."""
  if isinstance(model, str):
    if model not in _REGISTRY:
      raise ModelArgumentError(
          f'Unknown model {model!r}; known models: {", ".join(list_models())}.')
    return _SPECS[_REGISTRY[model][0]]
  return _SPECS[type(model)]


def example_input_shape(model: nn.Module, batch: int = 1) -> Tuple[int, ...]:
  """``B T H W 3`` of an input ``model`` takes: its clip length and the frame size it was built
  for (Swin's ``image_size``), or any size where none is fixed (ResNets)."""
  spec = model_spec(model)
  size = getattr(model, spec.size_argument) if spec.size_argument else spec.example_size
  return (batch, model.clip_length, size, size, 3)


def variable_shapes(model: nn.Module) -> Dict[str, Dict[str, jax.ShapeDtypeStruct]]:
  """``{'params': {'a/b': shape and dtype}, 'batch_stats': {...}}`` of ``model``, flat, without
  computing or allocating anything."""
  video = jax.ShapeDtypeStruct(example_input_shape(model), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), video)
  return {c: {'/'.join(k): v for k, v in traverse_util.flatten_dict(shapes[c]).items()}
          for c in ('params', 'batch_stats') if c in shapes}


def size_kwargs(name: str, size: int) -> Dict[str, Any]:
  """Extra :func:`create_model` arguments that a frame size implies (Swin is built for it)."""
  argument = model_spec(name).size_argument
  return {argument: size} if argument else {}


def create_model(name: str, *, num_classes: int, clip_length: int, **kwargs: Any) -> nn.Module:
  """Builds the Flax module ``name``; input ``B T H W 3`` float, output logits ``B num_classes``.

  Use ``model.init(rngs, video, train=False)``, ``model.apply(variables, video, train=False)``,
  and for training ``model.apply(variables, video, train=True, mutable=['batch_stats'],
  rngs={'dropout': rng})``.
  """
  if name not in _REGISTRY:
    raise ModelArgumentError(f'Unknown model {name!r}; known models: {", ".join(list_models())}.')
  cls, defaults = _REGISTRY[name]
  allowed = model_fields(cls)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ModelArgumentError(
        f'Unknown argument(s) {unknown} for model {name!r}; allowed: '
        f'{sorted(set(allowed) - {"num_classes", "clip_length"})}.')
  config = dict(defaults, num_classes=num_classes, clip_length=clip_length, **kwargs)
  fields = {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING and f.name not in ('parent', 'name')}
  check_model_args(name, dict(fields, **config))
  for key in ('depths', 'num_heads', 'stage_sizes', 'dtf_stages'):
    if key in config:
      config[key] = tuple(config[key])
  return cls(**config)


# Attributes that must be positive ints, and what they are.
_POSITIVE_INTS = {
    'num_classes': 'classifier outputs', 'clip_length': 'input frames T',
    'early_stride': 'frames folded into one time step by the stem', 'width': 'stem channels',
    'image_size': 'frame height = width in pixels', 'embed_dim': 'channels of stage 1',
    'window_size': 'attention window in tokens', 'patch_size': 'tubelet height = width in pixels',
}
# Attributes that are one positive int per stage.
_STAGE_COUNTS = {'stage_sizes': 'bottlenecks', 'depths': 'blocks', 'num_heads': 'attention heads'}


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_model_args(name: str, args: Dict[str, Any]) -> None:
  """Raises ``ValueError`` naming the argument, its value and what is allowed unless ``args``
  (every attribute of model ``name`` that is set) describe a model that can be built.

  What depends on the input as well (a clip length that ``early_stride`` does not divide, a Swin
  ``image_size`` that the patches or windows cannot tile) is checked by the model when it runs.
  """
  def fail(key, allowed):
    raise ModelArgumentError(f'{name}: {key}={args[key]!r} is not allowed: {allowed}.')

  for key, meaning in _POSITIVE_INTS.items():
    if key in args and not (_is_int(args[key]) and args[key] > 0):
      fail(key, f'must be a positive int ({meaning})')
  for key in ('dropout_rate', 'drop_path_rate'):
    if key in args and not (_is_real(args[key]) and 0 <= args[key] < 1):
      fail(key, 'must be a rate in [0, 1)')
  if 'mlp_ratio' in args and not (_is_real(args['mlp_ratio']) and args['mlp_ratio'] > 0):
    fail('mlp_ratio', 'must be a positive number (MLP hidden size / channels)')
  for key, meaning in _STAGE_COUNTS.items():
    value = args.get(key, ())
    if key in args and not (isinstance(value, (list, tuple)) and value
                            and all(_is_int(v) and v > 0 for v in value)):
      fail(key, f'must be a non-empty list of positive ints ({meaning} per stage)')
  if 'dtype' in args:
    try:
      jnp.dtype(args['dtype'])
    except TypeError:
      fail('dtype', "must be a floating dtype, e.g. 'float32' or 'bfloat16'")
    if not jnp.issubdtype(jnp.dtype(args['dtype']), jnp.floating):
      fail('dtype', "must be a floating dtype, e.g. 'float32' or 'bfloat16'")
  if args.get('temporal') not in TEMPORAL_MODULES:
    fail('temporal', f'must be one of {sorted(TEMPORAL_MODULES)}')
  if 'remat' in args and args['remat'] not in REMAT_OPTIONS:
    fail('remat', f'must be one of {REMAT_OPTIONS} (what the backward pass recomputes)')
  if 'fa_impl' in args and args['fa_impl'] not in FA_IMPLS:
    fail('fa_impl', f'must be one of {FA_IMPLS} (the DTF frame-wise aggregation implementation)')
  if 'spectral_impl' in args and args['spectral_impl'] not in SPECTRAL_IMPLS:
    fail('spectral_impl', f'must be one of {SPECTRAL_IMPLS} (the DTF time DFT implementation)')
  if 'block_impl' in args and args['block_impl'] not in BLOCK_IMPLS:
    fail('block_impl', f'must be one of {BLOCK_IMPLS} (how the whole DTF block runs)')
  if args['clip_length'] < args['early_stride']:
    fail('clip_length', f'the stem folds early_stride={args["early_stride"]} frames into one '
                        f'time step, so it needs at least {args["early_stride"]} frames')
  if args['clip_length'] % args['early_stride']:
    fail('clip_length', f'the stem folds early_stride={args["early_stride"]} frames into one '
                        f'time step, so it must be a multiple of {args["early_stride"]}')

  if 'stage_sizes' in args:  # ResNet
    stages = len(args['stage_sizes'])
    dtf_stages = args['dtf_stages']
    if not (isinstance(dtf_stages, (list, tuple))
            and all(_is_int(s) and 1 <= s <= stages for s in dtf_stages)):
      fail('dtf_stages', f'must be a list of stages in 1..{stages} (len(stage_sizes))')
    channels = {s: args['width'] * 2 ** (s - 1) for s in dtf_stages}
    channel_arg = 'width'
  else:  # Swin
    depths, heads = args['depths'], args['num_heads']
    if len(depths) != len(heads):
      fail('num_heads', f'must have one entry per stage, as depths={tuple(depths)!r} has')
    for s, h in enumerate(heads):
      dim = args['embed_dim'] * 2 ** s
      if dim % h:
        fail('embed_dim', f'stage {s + 1} has {dim} channels, which its {h} heads '
                          f'(num_heads={tuple(heads)!r}) must divide')
    channels = {s + 1: args['embed_dim'] * 2 ** s for s in range(len(depths))}
    channel_arg = 'embed_dim'

  steps, rem = divmod(args['clip_length'], args['early_stride'])
  if args['temporal'] in FILTER_ESTIMATOR_NAMES and not rem:
    bins, group = steps // 2 + 1, DTFBlock.group_factor
    for stage, c in channels.items():
      if (c * bins * 2) % group:
        fail('clip_length', f'with early_stride={args["early_stride"]} it gives {steps} time '
                            f'steps ({bins} frequency bins), and the DTF block of stage {stage} '
                            f'({c} channels) needs channels * bins * 2 divisible by its group '
                            f'factor {group}; change clip_length, early_stride or {channel_arg}')

"""Model registry: ``create_model(name, num_classes=..., clip_length=..., **kwargs)``.

Names: ``c2d_r50``, ``dtf_r50``, ``c2d_r101``, ``dtf_r101`` (ResNet, see ``resnet.py``) and
``c2d_swin_{t,s,b,l}``, ``dtf_swin_{t,s,b,l}`` (Swin, see ``swin.py``). ``c2d_*`` are the same
backbones without a temporal module. Keyword arguments are the model's attributes; those that fix
the architecture of a name (e.g. ``temporal``) may still be overridden for ablations.
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from dtf_jax.models.resnet import ResNet
from dtf_jax.models.swin import SwinTransformer

_SWIN_SIZES = {
    't': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    's': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    'b': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
    'l': dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.5),
}

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


def example_input_shape(model: nn.Module, batch: int = 1) -> Tuple[int, ...]:
  """``B T H W 3`` of an input ``model`` takes: its clip length and, for Swin (built for one frame
  size), its ``image_size``; ResNets take any size (64 here)."""
  size = model.image_size if isinstance(model, SwinTransformer) else 64
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
  return {'image_size': size} if 'swin' in name else {}


def create_model(name: str, *, num_classes: int, clip_length: int, **kwargs: Any) -> nn.Module:
  """Builds the Flax module ``name``; input ``B T H W 3`` float, output logits ``B num_classes``.

  Use ``model.init(rngs, video, train=False)``, ``model.apply(variables, video, train=False)``,
  and for training ``model.apply(variables, video, train=True, mutable=['batch_stats'],
  rngs={'dropout': rng})``.
  """
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}; known models: {", ".join(list_models())}.')
  cls, defaults = _REGISTRY[name]
  allowed = model_fields(cls)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(f'Unknown argument(s) {unknown} for model {name!r}; allowed: '
                     f'{sorted(set(allowed) - {"num_classes", "clip_length"})}.')
  for key in ('depths', 'num_heads', 'stage_sizes', 'dtf_stages'):
    if key in kwargs:
      kwargs[key] = tuple(kwargs[key])
  config = dict(defaults, **kwargs)
  return cls(num_classes=num_classes, clip_length=clip_length, **config)

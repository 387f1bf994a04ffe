"""Official DTF PyTorch state dicts (``FuchenUSTC/DTF``) -> dtf_jax Flax variables.

PyTorch layouts: convs ``O I T kh kw``, linears ``O I``, tensors ``B C T H W``. Flax layouts: convs
``T kh kw I O``, dense ``I O``. The DTF filter estimator ``filter_g.weight`` is
``[O, (C + K2) * T, 1, 1]`` with channel-major-then-time input order; ours is ``[T, C + K2, O]``.
The complex mixing ``linear1.complex_weight`` is ``[C_out, C_in, 2]``; ours ``[2, C_in, C_out]``.

The conversion is strict: every official key is used, verified and ignored (fixed
``weights_cor``, buffers that the model recomputes, ``num_batches_tracked``), or skipped because
the official module owns but never uses it (reported); anything else, and any missing or
mis-shaped tensor, is an error that lists them all.
"""

import dataclasses
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dtf_jax.models import create_model
from dtf_jax.models.swin import SwinTransformer, effective_window, relative_position_index, \
    shifted_window_mask


class ConversionError(ValueError):
  """The state dict does not fit the model; the message lists every problem."""


@dataclasses.dataclass
class ConversionReport:
  """What happened to each official key."""
  used: List[str] = dataclasses.field(default_factory=list)
  verified: List[str] = dataclasses.field(default_factory=list)
  skipped_unused: List[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    return (f'{len(self.used)} tensors converted, {len(self.verified)} fixed tensors/buffers '
            f'verified and dropped, {len(self.skipped_unused)} unused official tensors skipped')


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch
    value = value.detach().cpu().float().numpy() if value.is_floating_point() else \
        value.detach().cpu().numpy()
  return np.asarray(value)


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Accepts ``{'state_dict': ...}`` wrappers and ``module.`` prefixes; returns numpy arrays."""
  for wrapper in ('state_dict', 'model'):
    if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
      state_dict = state_dict[wrapper]
  out = {}
  for key, value in state_dict.items():
    out[key[len('module.'):] if key.startswith('module.') else key] = _to_numpy(value)
  return out


def _rename_resnet(key: str) -> str:
  """Official C2D/DTF-ResNet module path -> ours (dotted)."""
  for pattern, repl in ((r'^conv1\.', 'stem_conv.'), (r'^bn1\.', 'stem_bn.'), (r'^fc\.', 'head.'),
                        (r'^layer(\d+)\.(\d+)\.', r'stage\1_block\2.'),
                        (r'\.downsample\.0\.', '.downsample_conv.'),
                        (r'\.downsample\.1\.', '.downsample_bn.'), (r'\.dtf_blk\.', '.temporal.')):
    key = re.sub(pattern, repl, key)
  return key


def _rename_swin(key: str) -> str:
  """Official C2D/DTF-Swin module path -> ours (dotted)."""
  key = re.sub(r'^layers\.(\d+)\.blocks\.(\d+)\.',
               lambda m: f'stage{int(m.group(1)) + 1}_block{m.group(2)}.', key)
  key = re.sub(r'^layers\.(\d+)\.downsample\.', lambda m: f'stage{int(m.group(1)) + 1}_merge.', key)
  for pattern, repl in ((r'\.mlp\.fc(\d)\.', r'.mlp_fc\1.'), (r'\.dtf_block\.', '.temporal.'),
                        (r'^patch_embed\.proj\.', 'patch_embed.'), (r'^fc\.', 'head.')):
    key = re.sub(pattern, repl, key)
  return key


# DTF block tensors: official name inside the block -> (collection, our name, transform).
_DTF_TENSORS = {
    'filter_g.weight': ('params', 'filter_kernel', 'filter'),
    'linear1.complex_weight': ('params', 'mix_kernel', 'complex_mix'),
    'alpha1': ('params', 'alpha', 'flatten'),
    'bias': ('params', 'bias', 'flatten'),
    'norm1.norm.running_mean': ('batch_stats', 'spectrum_norm/mean', 'copy'),
    'norm1.norm.running_var': ('batch_stats', 'spectrum_norm/var', 'copy'),
}


def _target(renamed: str, expected) -> Optional[Tuple[str, str, str]]:
  """(collection, flax path, transform) for a renamed key, or None if it has no place."""
  if '.temporal.' in renamed:
    module, leaf = renamed.split('.temporal.')
    if leaf not in _DTF_TENSORS:
      return None
    collection, name, transform = _DTF_TENSORS[leaf]
    return collection, f'{module}/temporal/{name}', transform
  module, _, leaf = renamed.rpartition('.')
  module = module.replace('.', '/')
  params = expected['params']
  if leaf == 'running_mean':
    return 'batch_stats', f'{module}/mean', 'copy'
  if leaf == 'running_var':
    return 'batch_stats', f'{module}/var', 'copy'
  if leaf == 'weight' and f'{module}/scale' in params:
    return 'params', f'{module}/scale', 'copy'
  if leaf == 'weight' and f'{module}/kernel' in params:
    return 'params', f'{module}/kernel', 'conv' if params[f'{module}/kernel'].ndim == 5 else 'dense'
  if leaf in ('bias', 'relative_position_bias_table'):
    return 'params', f'{module}/{leaf}', 'copy'
  return None


def _transform(kind: str, value: np.ndarray, shape) -> np.ndarray:
  """Official layout -> ours (``shape`` is the target shape, used by ``filter``)."""
  if kind == 'copy':
    return value
  if kind == 'flatten':
    return value.reshape(-1)
  if kind == 'conv':  # O I [T] kh kw -> [T] kh kw I O
    value = value if value.ndim == 5 else value[:, :, None]
    return value.transpose(2, 3, 4, 1, 0)
  if kind == 'dense':
    return value.T
  if kind == 'complex_mix':  # C_out C_in 2 -> 2 C_in C_out
    return value.transpose(2, 1, 0)
  if kind == 'filter':  # [O, (C+K2)*T, 1, 1], channel-major then time -> [T, C+K2, O]
    time, in_channels, out = shape
    if value.shape != (out, in_channels * time, 1, 1):
      return value  # reported by the shape check
    return value.reshape(out, in_channels, time).transpose(2, 1, 0)
  raise KeyError(kind)


def _official_shape(kind: str, shape) -> Tuple[int, ...]:
  """The official (PyTorch) shape that becomes ``shape`` under transform ``kind``."""
  shape = tuple(shape)
  if kind == 'conv':
    return (shape[-1], shape[-2]) + shape[:-2]
  if kind == 'dense':
    return shape[::-1]
  if kind == 'complex_mix':
    return (shape[2], shape[1], shape[0])
  if kind == 'filter':
    return (shape[2], shape[1] * shape[0], 1, 1)
  if kind == 'flatten':
    return (1, shape[0], 1, 1, 1)
  return shape


_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
               'var': 'running_var', 'relative_position_bias_table': 'relative_position_bias_table'}
_DTF_NAMES = {f'{c}/{name}': leaf for leaf, (c, name, _) in _DTF_TENSORS.items()}


def _official_leaf(collection: str, path: str, dtf_name: str) -> Tuple[str, str]:
  """(official module path with our names, official tensor name) of one of our variables."""
  if '/temporal/' in path:
    module, rest = path.split('/temporal/')
    return f'{module}.{dtf_name}', _DTF_NAMES[f'{collection}/{rest}']
  module, _, leaf = path.rpartition('/')
  return module.replace('/', '.'), _LEAF_NAMES.get(leaf, leaf)


def _official_resnet_name(collection: str, path: str) -> str:
  """Official C2D/DTF-ResNet key of one of our variables (inverse of :func:`_rename_resnet`)."""
  module, leaf = _official_leaf(collection, path, 'dtf_blk')
  for pattern, repl in ((r'^stem_conv', 'conv1'), (r'^stem_bn', 'bn1'), (r'^head', 'fc'),
                        (r'^stage(\d+)_block(\d+)', r'layer\1.\2'),
                        (r'downsample_conv', 'downsample.0'), (r'downsample_bn', 'downsample.1')):
    module = re.sub(pattern, repl, module)
  return f'{module}.{leaf}'


def _official_swin_name(collection: str, path: str) -> str:
  """Official C2D/DTF-Swin key of one of our variables (inverse of :func:`_rename_swin`)."""
  module, leaf = _official_leaf(collection, path, 'dtf_block')
  module = re.sub(r'^stage(\d+)_block(\d+)',
                  lambda m: f'layers.{int(m.group(1)) - 1}.blocks.{m.group(2)}', module)
  module = re.sub(r'^stage(\d+)_merge', lambda m: f'layers.{int(m.group(1)) - 1}.downsample',
                  module)
  for pattern, repl in ((r'mlp_fc(\d)', r'mlp.fc\1'), (r'^patch_embed', 'patch_embed.proj'),
                        (r'^head', 'fc')):
    module = re.sub(pattern, repl, module)
  return f'{module}.{leaf}'


def _flatten(tree) -> Dict[str, Any]:
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _expected_variables(model, clip_length: int):
  """Shapes of the model's variables, without allocating them."""
  size = model.image_size if isinstance(model, SwinTransformer) else 64
  video = jax.ShapeDtypeStruct((1, clip_length, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), video)
  return {c: _flatten(shapes[c]) for c in ('params', 'batch_stats') if c in shapes}


def _swin_block_layout(model: SwinTransformer) -> Dict[str, Tuple[int, int, int]]:
  """``stage{s}_block{b}`` -> (tokens per side, effective window, effective shift)."""
  layout, res = {}, model.image_size // model.patch_size
  for s, depth in enumerate(model.depths):
    for b in range(depth):
      layout[f'stage{s + 1}_block{b}'] = (res,) + effective_window(
          res, model.window_size, 0 if b % 2 == 0 else model.window_size // 2)
    res //= 2
  return layout


def _swin_block(key: str) -> Tuple[str, str]:
  """``layers.i.blocks.j.rest`` -> (``stage{i+1}_block{j}``, ``rest``); ('', key) otherwise."""
  m = re.fullmatch(r'layers\.(\d+)\.blocks\.(\d+)\.(.*)', key)
  return (f'stage{int(m.group(1)) + 1}_block{m.group(2)}', m.group(3)) if m else ('', key)


def _unused_swin_tensor(key: str, layout, temporal: str) -> bool:
  """The official DTF-Swin gives every block a ``conv`` and a ``dtf_block``; only blocks with
  effective shift 0 call the DTF block, none calls ``conv``."""
  block, rest = _swin_block(key)
  if block not in layout or temporal == 'none':
    return False
  return rest.startswith('conv.') or (rest.startswith('dtf_block.') and layout[block][2] > 0)


def _check_fixed(key: str, value: np.ndarray, layout) -> str:
  """Verifies a tensor that the model computes itself; returns '' if right, else the problem."""
  if key.endswith('weights_cor'):
    channels = value.shape[0]
    if np.allclose(value, 1.0 / channels, rtol=1e-5, atol=0):
      return ''
    return f'{key}: expected every entry to be 1/C = {1.0 / channels:.6g} (fixed weights)'
  block, _ = _swin_block(key)
  if block not in layout:
    return f'{key}: no such block in the model'
  res, window, shift = layout[block]
  if key.endswith('relative_position_index'):
    if np.array_equal(value, relative_position_index(window)):
      return ''
    return f'{key}: differs from the relative position index of window {window}'
  if shift > 0 and np.allclose(value, shifted_window_mask(res, window, shift)):
    return ''
  return f'{key}: differs from the mask of window {window}, shift {shift} (or block unshifted)'


def convert_official_state_dict(model_name: str, state_dict: Mapping[str, Any], *,
                                num_classes: int, clip_length: int, return_report: bool = False,
                                **kwargs) -> Dict[str, Any]:
  """Official state dict -> ``{'params': ..., 'batch_stats': ...}`` for ``create_model(...)``.

  ``state_dict`` maps official key names to torch tensors or numpy arrays, optionally wrapped in
  ``{'state_dict': ...}`` and/or prefixed with ``module.``. ``kwargs`` go to ``create_model``
  (e.g. ``image_size`` for Swin). Raises :class:`ConversionError` listing every missing,
  unexpected or mis-shaped key. With ``return_report=True`` returns ``(variables, report)``.
  """
  model = create_model(model_name, num_classes=num_classes, clip_length=clip_length, **kwargs)
  expected = _expected_variables(model, clip_length)
  tensors = unwrap_state_dict(state_dict)
  is_swin = isinstance(model, SwinTransformer)
  layout = _swin_block_layout(model) if is_swin else {}
  report = ConversionReport()
  out = {c: {} for c in expected}
  unexpected, mismatched, bad_fixed = [], [], []

  rename = _rename_swin if is_swin else _rename_resnet
  for key, value in tensors.items():
    if key.endswith('num_batches_tracked'):
      report.verified.append(key)
      continue
    if is_swin and _unused_swin_tensor(key, layout, model.temporal):
      report.skipped_unused.append(key)
      continue
    if key.endswith(('weights_cor', 'relative_position_index', 'attn_mask')):
      problem = _check_fixed(key, value, layout)
      (bad_fixed.append(problem) if problem else report.verified.append(key))
      continue
    target = _target(rename(key), expected)
    if target is None or target[1] not in expected.get(target[0], {}):
      unexpected.append(key if target is None else f'{key} (-> {target[0]}/{target[1]})')
      continue
    collection, path, transform = target
    shape = expected[collection][path].shape
    converted = _transform(transform, value, shape)
    if converted.shape != shape:
      mismatched.append(f'{key}: shape {tuple(value.shape)}, the model needs '
                        f'{_official_shape(transform, shape)} (for {collection}/{path} '
                        f'{tuple(shape)})')
      out[collection][path] = None  # reported as mis-shaped, not as missing
      continue
    # A copy: the result must not share memory with the (mutable) torch tensors.
    out[collection][path] = jnp.array(converted, jnp.float32, copy=True)
    report.used.append(key)

  official_name = _official_swin_name if is_swin else _official_resnet_name
  missing = [f'{official_name(c, p)} (for {c}/{p} {tuple(s.shape)})'
             for c in expected for p, s in expected[c].items() if p not in out[c]]
  problems = []
  for title, items in (('missing (the model needs them, the state dict lacks them)', missing),
                       ('unexpected (no place in the model)', unexpected),
                       ('mis-shaped', mismatched), ('wrong fixed values', bad_fixed)):
    if items:
      problems.append(f'{len(items)} {title}:\n  ' + '\n  '.join(sorted(items)))
  if problems:
    raise ConversionError(f'Cannot load the state dict into {model_name} (clip_length='
                          f'{clip_length}, num_classes={num_classes}, {kwargs}):\n'
                          + '\n'.join(problems))
  out = {c: {p: v for p, v in out[c].items() if v is not None} for c in out}
  variables = {c: flax.traverse_util.unflatten_dict(
      {tuple(p.split('/')): v for p, v in out[c].items()}) for c in out}
  return (variables, report) if return_report else variables

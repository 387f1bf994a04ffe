"""PyTorch state dicts -> dtf_jax Flax variables: official DTF checkpoints and ImageNet inflation.

    variables = convert_state_dict('dtf_r50', read_state_dict('resnet50.pth'), num_classes=400,
                                   clip_length=16, source='imagenet_resnet')

Sources (``imagenet.py`` detects them from the keys): ``dtf``, the official DTF/C2D models
(``FuchenUSTC/DTF``); ``imagenet_resnet``, torchvision ResNets; ``imagenet_swin``, Swin in the
official or the timm layout. ImageNet keys are first renamed to the official DTF names, then all
sources share one mapping onto our variables.

PyTorch layouts: convs ``O I T kh kw`` (2D: ``O I kh kw``), linears ``O I``, tensors ``B C T H W``.
Flax layouts: convs ``T kh kw I O``, dense ``I O``. The DTF filter estimator ``filter_g.weight``
is ``[O, (C + K2) * T, 1, 1]`` with channel-major-then-time input order; ours is
``[T, C + K2, O]``. The complex mixing ``linear1.complex_weight`` is ``[C_out, C_in, 2]``; ours
``[2, C_in, C_out]``.

Inflation (ImageNet sources): 2D kernels get a time axis of 1; the ResNet stem and the Swin patch
embedding get ``early_stride`` (``stem_init`` ``center`` or ``average``); relative position bias
tables of another window are resized bicubically; DTF blocks keep their initialisation (alpha 0:
each block starts as the identity) and the ImageNet head is dropped unless ``keep_head``.

The conversion is strict: every key of the file is loaded, or ignored for a stated reason (fixed
``weights_cor`` and buffers that the model recomputes, after checking them; tensors the official
model owns but never uses; a dropped head or patch norm); every variable of the model is loaded or,
for ImageNet sources only, left at its initialisation for a stated reason. Anything else, and any
mis-shaped tensor, is an error that lists them all.
"""

import dataclasses
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import einops
import flax
import jax
import jax.numpy as jnp
import numpy as np

from dtf_jax.convert import imagenet
from dtf_jax.convert.state_dict import unwrap_state_dict
from dtf_jax.errors import UserError
from dtf_jax.models import create_model, example_input_shape, model_spec, variable_shapes
from dtf_jax.models.swin import SwinTransformer, effective_window, relative_position_index, \
    shifted_window_mask

# Reasons for ignored tensors and for variables left at their initialisation.
UNUSED_OFFICIAL = 'owned but never used by the official model'
STEP_COUNTER = 'BN step counter'
NEW_DTF = 'DTF block: keeps its initialisation (alpha 0, the block starts as the identity)'
NEW_HEAD = 'new classifier head'
VERIFIED = 'buffer the model computes (verified equal)'


class ConversionError(UserError, ValueError):
  """The state dict does not fit the model; the message lists every problem."""


def _shape(value) -> Tuple[int, ...]:
  return tuple(int(d) for d in np.shape(value))


@dataclasses.dataclass
class ConversionReport:
  """What happened to every tensor of the file and every variable of the model.

  ``loaded``: (file key, file shape, our variable, its shape); ``initialised``: (our variable,
  shape, reason); ``ignored``: (file key, shape, reason); ``notes``: inflation choices."""
  source: str = 'dtf'
  layout: str = 'official'
  loaded: List[Tuple[str, Tuple[int, ...], str, Tuple[int, ...]]] = dataclasses.field(
      default_factory=list)
  initialised: List[Tuple[str, Tuple[int, ...], str]] = dataclasses.field(default_factory=list)
  ignored: List[Tuple[str, Tuple[int, ...], str]] = dataclasses.field(default_factory=list)
  notes: List[str] = dataclasses.field(default_factory=list)

  def ignored_keys(self, reason: str) -> List[str]:
    return [key for key, _, why in self.ignored if why.startswith(reason)]

  def summary(self) -> str:
    return (f'{self.source} checkpoint ({self.layout} layout): {len(self.loaded)} arrays loaded, '
            f'{len(self.initialised)} left at their initialisation, {len(self.ignored)} ignored')

  def format(self) -> str:
    """The whole report: summary, notes, then every array with its shape."""
    lines = [self.summary()] + [f'  note: {n}' for n in self.notes]
    lines.append(f'loaded ({len(self.loaded)}):')
    lines += [f'  {k} {s} -> {t} {ts}' for k, s, t, ts in self.loaded]
    lines.append(f'left at their initialisation ({len(self.initialised)}):')
    lines += [f'  {t} {s}: {why}' for t, s, why in self.initialised]
    lines.append(f'ignored ({len(self.ignored)}):')
    lines += [f'  {k} {s}: {why}' for k, s, why in self.ignored]
    return '\n'.join(lines)


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
                        (r'^patch_embed\.proj\.', 'patch_embed.'),
                        (r'^patch_embed\.norm\.', 'patch_embed_norm.'), (r'^fc\.', 'head.')):
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
    return einops.rearrange(value, 'o i t kh kw -> t kh kw i o')
  if kind == 'dense':
    return value.T
  if kind == 'complex_mix':  # C_out C_in 2 -> 2 C_in C_out
    return einops.rearrange(value, 'o i r -> r i o')
  if kind == 'filter':  # [O, (C+K2)*T, 1, 1], channel-major then time -> [T, C+K2, O]
    time, in_channels, out = shape
    if value.shape != (out, in_channels * time, 1, 1):
      return value  # reported by the shape check
    return einops.rearrange(value, 'o (i t) 1 1 -> t i o', t=time)
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
  for pattern, repl in ((r'mlp_fc(\d)', r'mlp.fc\1'), (r'^patch_embed$', 'patch_embed.proj'),
                        (r'^patch_embed_norm$', 'patch_embed.norm'), (r'^head', 'fc')):
    module = re.sub(pattern, repl, module)
  return f'{module}.{leaf}'


def _flatten(tree) -> Dict[str, Any]:
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


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


def _check_fixed(key: str, value: np.ndarray, layout, from_imagenet: bool) -> Tuple[str, str]:
  """A tensor that the model computes itself -> ``(problem, reason ignored)``, one of them ''.

  An official checkpoint must hold exactly what the model computes. An ImageNet Swin may come
  from another window or resolution: a buffer laid out unlike ours is recomputed, and a mask of a
  block the model leaves unshifted is unused."""
  if key.endswith('weights_cor'):
    channels = value.shape[0]
    if np.allclose(value, 1.0 / channels, rtol=1e-5, atol=0):
      return '', 'fixed correlation weights 1/C (verified)'
    return f'{key}: expected every entry to be 1/C = {1.0 / channels:.6g} (fixed weights)', ''
  block, _ = _swin_block(key)
  if block not in layout:
    return f'{key}: no such block in the model', ''
  res, window, shift = layout[block]
  if key.endswith('relative_position_index'):
    ours, what = relative_position_index(window), f'the relative position index of window {window}'
  elif shift > 0:
    ours = shifted_window_mask(res, window, shift)
    what = f'the mask of window {window}, shift {shift}'
  elif from_imagenet:
    return '', f'attention mask the model does not use (block unshifted at {res}x{res} tokens)'
  else:
    return (f'{key}: differs from the mask of window {window}, shift {shift} (or block '
            f'unshifted)', '')
  if from_imagenet and value.shape != ours.shape:
    return '', f'buffer recomputed by the model (window {window}, {res}x{res} tokens)'
  if value.shape == ours.shape and np.allclose(value, ours):
    return '', VERIFIED
  return f'{key}: differs from {what}', ''


def map_state_dict(model, state_dict: Mapping[str, Any], *, source: str = 'auto',
                   stem_init: str = 'center', keep_head: bool = False
                   ) -> Tuple[Dict[str, Dict[str, np.ndarray]], ConversionReport]:
  """Maps a state dict onto ``model``'s variables without initialising anything.

  Returns ``({collection: {'a/b/c': float32 array}}, report)``: the arrays taken from the file
  (``report.initialised`` lists the variables left out, with the reason). ``source``: one of
  ``imagenet.SOURCES`` or ``'auto'`` (detected from the keys). Raises :class:`ConversionError`
  listing every problem."""
  tensors = unwrap_state_dict(state_dict)
  try:
    detected, family, layout = imagenet.detect_source({k: v.shape for k, v in tensors.items()})
  except ValueError as e:
    raise ConversionError(str(e)) from None
  model_family = model_spec(model).family
  is_swin = model_family == 'swin'
  if source not in imagenet.SOURCES + ('auto',):
    raise ConversionError(f'source must be one of {imagenet.SOURCES} or auto, got {source!r}')
  if source not in ('auto', detected):
    raise ConversionError(f'source={source!r}, but the file is a {family} checkpoint of source '
                          f'{detected!r} ({layout} layout)')
  if family != model_family:
    raise ConversionError(f'the file is a {family} checkpoint (source {detected!r}, {layout} '
                          f'layout) but the model is a {model_family} ({type(model).__name__})')
  if stem_init not in imagenet.STEM_INITS:
    raise ConversionError(f'stem_init must be one of {imagenet.STEM_INITS}, got {stem_init!r}')
  source = detected
  from_imagenet = source != 'dtf'
  expected = variable_shapes(model)
  params = expected['params']
  swin_layout = _swin_block_layout(model) if is_swin else {}
  report = ConversionReport(source=source, layout=layout)
  out = {c: {} for c in expected}
  unexpected, mismatched, bad_fixed = [], [], []
  inflated, resized = set(), set()

  rename = _rename_swin if is_swin else _rename_resnet
  for key, value in tensors.items():
    shape = _shape(value)
    official = imagenet.to_official_name(key, layout) if from_imagenet else key
    if key.endswith('num_batches_tracked'):
      report.ignored.append((key, shape, STEP_COUNTER))
      continue
    if is_swin and not from_imagenet and _unused_swin_tensor(key, swin_layout, model.temporal):
      report.ignored.append((key, shape, UNUSED_OFFICIAL))
      continue
    if key.endswith(('weights_cor', 'relative_position_index', 'attn_mask')):
      problem, reason = _check_fixed(official, value, swin_layout, from_imagenet)
      (bad_fixed.append(problem) if problem else report.ignored.append((key, shape, reason)))
      continue
    renamed = rename(official)
    target = _target(renamed, expected)
    if from_imagenet and target is not None and target[1].startswith('head/') and not keep_head:
      report.ignored.append((key, shape, f'{imagenet.head_description(shape[0])} dropped: the '
                                         f'model gets a new one'))
      continue
    if from_imagenet and renamed.startswith('patch_embed_norm.') and not model.patch_norm:
      report.ignored.append((key, shape, 'patch-embedding norm dropped (patch_norm=False, the '
                                         'official architecture; the released code lost it too)'))
      continue
    if target is None or target[1] not in expected.get(target[0], {}):
      unexpected.append(f'{key} {shape}' + ('' if target is None else
                                            f' (-> {target[0]}/{target[1]})'))
      continue
    collection, path, transform = target
    want = expected[collection][path].shape
    converted = _transform(transform, value, want)
    if (from_imagenet and transform == 'conv' and value.ndim == 4 and len(want) == 5
        and want[0] > 1 and converted.shape[1:] == want[1:]):
      converted = _transform('conv', imagenet.inflate_kernel(value, want[0], stem_init), want)
      inflated.add(f'{key} -> {path}: 2D kernel inflated to {want[0]} frames ({stem_init})')
    if (from_imagenet and path.endswith('relative_position_bias_table') and len(shape) == 2
        and shape != tuple(want) and shape[1] == want[1]):
      try:
        converted = imagenet.resize_relative_position_table(value, want[0])
        resized.add(f'relative position bias tables resized bicubically from window '
                    f'{imagenet.window_of_table(shape[0])} to {imagenet.window_of_table(want[0])}')
      except ValueError:
        pass  # reported as mis-shaped below
    if converted.shape != want:
      mismatched.append(f'{key}: shape {shape}, the model needs '
                        f'{_official_shape(transform, want)} (for {collection}/{path} '
                        f'{tuple(want)})')
      out[collection][path] = None  # reported as mis-shaped, not as missing
      continue
    # A copy: the result must not share memory with the (mutable) torch tensors.
    out[collection][path] = np.array(converted, np.float32, copy=True)
    report.loaded.append((key, shape, f'{collection}/{path}', tuple(want)))
  report.notes += sorted(inflated) + sorted(resized)
  if from_imagenet and is_swin:
    report.notes.append('patch-embedding norm loaded (patch_norm=True: the model starts as the 2D '
                        'network)' if model.patch_norm else
                        'patch-embedding norm dropped (patch_norm=False)')

  official_name = _official_swin_name if is_swin else _official_resnet_name
  missing = []
  for collection, variables in expected.items():
    for path, struct in variables.items():
      if path in out[collection]:
        continue
      if from_imagenet and '/temporal/' in path:
        report.initialised.append((f'{collection}/{path}', _shape(struct), NEW_DTF))
      elif from_imagenet and path.startswith('head/') and not keep_head:
        report.initialised.append((f'{collection}/{path}', _shape(struct), NEW_HEAD))
      else:
        name = imagenet.from_official_name(official_name(collection, path), layout, family)
        missing.append(f'{name} (for {collection}/{path} {tuple(struct.shape)})')
  if from_imagenet and is_swin and 'patch_embed_norm/scale' in params and not any(
      p.startswith('patch_embed_norm/') for p in out['params']):
    missing.append('(patch_norm=True needs the patch-embedding norm of an ImageNet Swin; build '
                   'the model with patch_norm=False for a checkpoint without one)')
  problems = []
  for title, items in (('missing (the model needs them, the file lacks them)', missing),
                       ('unexpected (no place in the model)', unexpected),
                       ('mis-shaped', mismatched), ('wrong fixed values', bad_fixed)):
    if items:
      problems.append(f'{len(items)} {title}:\n  ' + '\n  '.join(sorted(items)))
  if problems:
    fields = {f: getattr(model, f) for f in ('clip_length', 'num_classes')}
    raise ConversionError(f'Cannot load the {source} checkpoint ({family}, {layout} layout) into '
                          f'{type(model).__name__} {fields}:\n' + '\n'.join(problems))
  out = {c: {p: v for p, v in out[c].items() if v is not None} for c in out}
  return out, report


def init_variables(model, paths, seed: int = 0) -> Dict[str, np.ndarray]:
  """Fresh values of the variables ``paths`` (``'collection/a/b'``) of ``model``, as
  ``model.init(PRNGKey(seed), ...)`` gives them. Jitted and returning only those arrays, so
  that the forward pass and the other initialisers are compiled away."""
  video = jnp.zeros(example_input_shape(model), jnp.float32)
  paths = set(paths)

  def init(rng):
    variables = _flatten(model.init(rng, video, train=False))
    return {p: v for p, v in variables.items() if p in paths}
  return {p: np.asarray(v) for p, v in jax.jit(init)(jax.random.PRNGKey(seed)).items()}


def convert_state_dict(model_name: str, state_dict: Mapping[str, Any], **kwargs) -> Dict[str, Any]:
  """State dict -> ``{'params': ..., 'batch_stats': ...}`` for ``create_model(model_name, ...)``;
  the arguments of :func:`convert_with_report`, which also returns the report."""
  return convert_with_report(model_name, state_dict, **kwargs)[0]


def convert_with_report(model_name: str, state_dict: Mapping[str, Any], *, num_classes: int,
                        clip_length: int, source: str = 'dtf', stem_init: str = 'center',
                        keep_head: bool = False, drop_patch_norm: bool = False, seed: int = 0,
                        **kwargs) -> Tuple[Dict[str, Any], 'ConversionReport']:
  """State dict -> ``(variables, report)``: ``{'params': ..., 'batch_stats': ...}`` for
  ``create_model(model_name, ...)`` and the :class:`ConversionReport`.

  ``state_dict`` maps key names to torch tensors or numpy arrays (wrappers ``{'state_dict': ...}``
  / ``{'model': ...}`` and ``module.`` prefixes are accepted; :func:`read_state_dict` reads
  files). ``source``: ``'dtf'`` (official DTF/C2D), ``'imagenet_resnet'``, ``'imagenet_swin'``
  or ``'auto'``. ImageNet Swin checkpoints turn ``patch_norm`` on (their patch norm is loaded and
  the model starts as the 2D network) unless ``drop_patch_norm``. Variables left out (DTF blocks,
  a new head) get a fresh initialisation from ``seed``. ``kwargs`` go to ``create_model`` (e.g.
  ``image_size`` for Swin). Raises :class:`ConversionError` listing every problem.
  """
  tensors = unwrap_state_dict(state_dict)
  if source in ('imagenet_swin', 'auto') and model_spec(model_name).family == 'swin':
    detected = imagenet.detect_source({k: v.shape for k, v in tensors.items()})[0]
    if detected == 'imagenet_swin':
      kwargs.setdefault('patch_norm', not drop_patch_norm)
  model = create_model(model_name, num_classes=num_classes, clip_length=clip_length, **kwargs)
  loaded, report = map_state_dict(model, tensors, source=source, stem_init=stem_init,
                                  keep_head=keep_head)
  if report.initialised:
    fresh = init_variables(model, [target for target, _, _ in report.initialised], seed)
    for target, value in fresh.items():
      collection, path = target.split('/', 1)
      loaded[collection][path] = value
  variables = {c: flax.traverse_util.unflatten_dict(
      {tuple(p.split('/')): jnp.asarray(v) for p, v in loaded[c].items()}) for c in loaded}
  return variables, report


def convert_official_state_dict(model_name: str, state_dict: Mapping[str, Any], *,
                                num_classes: int, clip_length: int, **kwargs) -> Dict[str, Any]:
  """An official DTF/C2D state dict: :func:`convert_state_dict` with ``source='dtf'``."""
  return convert_state_dict(model_name, state_dict, num_classes=num_classes,
                            clip_length=clip_length, source='dtf', **kwargs)

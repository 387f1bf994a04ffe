"""Grad-CAM and DTF's learnt frequency filters for one video, laid out like the paper's Fig. 7.

    python -m dtf_jax.tools.visualize --checkpoint runs/quickstart \\
        --video data/synthetic/videos/validation/000000.mp4 --out runs/quickstart/visualize

``CKPT`` is a pretrained directory or a trainer workdir, as for ``tools.predict``. The view is one
clip of the file (``--clip`` of the eval protocol's ``--clips``, default the middle one), centre
crop, made as ``tools.predict`` makes views (the converter's decoding, the eval pipeline).

Grad-CAM of the target class (``--class``, default the view's top-1) at the output
``A: T' h w D`` of stage ``--stage`` (default: the deepest stage whose map has at least 4x4
locations; the last stage at 224 pixels): channel weights ``w = mean_{t,y,x} d logit / d A``, map
``cam[t, y, x] = sum_d w_d A[t, y, x, d]`` (shown rectified, as usual). The two locations are the
cells of that map with the largest (red) and the smallest (blue) time-mean ``cam``; in another
stage a location is the cell that contains its centre.

For each location and DTF stage, the filter ``F`` (``T'//2 + 1`` bins x ``C`` channels, complex)
that the stage's DTF block (``--block``, default its last) estimated there: its magnitude per
bin, and the equivalent temporal kernel ``k = irfft(F, T')``, the circular convolution along time
that the modulation performs (with the block's orthonormal transforms,
``irfft(rfft(x) * F) = x (*) k``, ``y[t] = sum_n k[n] x[t - n mod T']``), shown at lags
``-T'//2 ..``. Each is plotted over channels as the mean and the band from the 25th to the 75th
percentile.

Written to ``--out``: ``gradcam.png`` (the view's frames and the Grad-CAM on them, with the two
locations), ``filters.png`` (one row per location and quantity, one column per DTF stage),
``values.npz`` (every plotted number, and the filters per channel) and ``index.html`` (both
pictures with the prediction and the locations). Exit code 1 if the file cannot be decoded. An
``--out`` that is a file, or a folder holding an earlier visualization (without ``--overwrite``),
is refused before any work.
"""

import argparse
import dataclasses
import html
import io
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from dtf_jax import errors, storage
from dtf_jax.data import hide_accelerators_from_tf, ops
from dtf_jax.layers.dtf import FILTER_NAME
from dtf_jax.models import model_spec
from dtf_jax.tools import predict

MIN_CAM_SIDE = 4  # the default Grad-CAM stage is the deepest whose map is at least this wide
LOCATIONS = (('largest', 'tab:red'), ('smallest', 'tab:blue'))


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def stage_blocks(model) -> List[List[str]]:
  """Names of the top-level blocks of each stage, ``[stage 1 blocks, ...]``."""
  sizes = getattr(model, 'stage_sizes', None) or model.depths
  return [[f'stage{s + 1}_block{b}' for b in range(n)] for s, n in enumerate(sizes)]


def _intercepting(blocks, delta=None):
  """A Flax interceptor that records the outputs of the top-level modules ``blocks`` (in
  ``captured``) and adds ``delta[name]`` to them."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    name = context.module.path[0] if len(context.module.path) == 1 else None
    if context.method_name == '__call__' and name in blocks:
      captured[name] = out
      if delta is not None:
        out = out + delta[name]
    return out
  return nn.intercept_methods(interceptor), captured


def stage_shapes(model, variables, video) -> List[Tuple[int, ...]]:
  """The output shape of each stage's last block, as returned (nothing is computed)."""
  import jax  # pylint: disable=import-outside-toplevel
  lasts = [blocks[-1] for blocks in stage_blocks(model)]

  def shapes(variables, video):
    context, captured = _intercepting(lasts)
    with context:
      model.apply(variables, video, train=False)
    return [captured[name] for name in lasts]
  return [s.shape for s in jax.eval_shape(shapes, variables, video)]


@dataclasses.dataclass
class Analysis:
  """What the pictures show, for one view (``T'`` time steps of the model, float64/complex128).

  ``cam``: ``T' h w`` Grad-CAM (not rectified) of ``target`` at the stage; ``activation`` and
  ``gradient``: ``T' h w D``, the stage output and d logit[target] / d it; ``filters``: per stage
  (1-based) and DTF block name (``stage2_block3``, in order), its filter ``F H W C`` (complex).
  """
  logits: np.ndarray
  target: int
  activation: np.ndarray
  gradient: np.ndarray
  cam: np.ndarray
  filters: Dict[int, Dict[str, np.ndarray]]


def analyse(model, variables, video, stage: int, target: Optional[int] = None,
            shapes: Optional[List[Tuple[int, ...]]] = None) -> Analysis:
  """Runs ``video 1 T H W 3`` once forward and backward: Grad-CAM at ``stage`` (1-based) for
  ``target`` (default the top-1 class) and the filters that the DTF blocks sow. ``shapes``:
  :func:`stage_shapes`, if already known."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  block = stage_blocks(model)[stage - 1][-1]
  shape = (shapes or stage_shapes(model, variables, video))[stage - 1]

  @jax.jit
  def run(variables, video, target):
    def forward(delta):
      context, captured = _intercepting((block,), {block: delta})
      with context:
        logits, state = model.apply(variables, video, train=False, mutable=['intermediates'])
      return logits[0].astype(jnp.float32), (captured[block], state.get('intermediates', {}))
    logits, backward, (activation, intermediates) = jax.vjp(
        forward, jnp.zeros(shape, jnp.float32), has_aux=True)
    target = jnp.where(target >= 0, target, jnp.argmax(logits))
    (gradient,) = backward(jax.nn.one_hot(target, logits.shape[0], dtype=logits.dtype))
    return logits, target, activation, gradient, intermediates

  logits, target, activation, gradient, intermediates = jax.device_get(
      run(variables, jnp.asarray(video), -1 if target is None else target))
  steps_first = lambda x: np.asarray(x, np.float64).reshape((-1,) + x.shape[-3:])  # noqa: E731
  activation, gradient = steps_first(activation), steps_first(gradient)
  filters = {}
  for number, blocks in enumerate(stage_blocks(model), start=1):
    for name in blocks:
      sown = intermediates.get(name, {}).get('temporal', {}).get(FILTER_NAME)
      if sown is not None:
        pair = np.asarray(sown[0][0], np.float64)  # F H W C 2 of the one view
        filters.setdefault(number, {})[name] = pair[..., 0] + 1j * pair[..., 1]
  return Analysis(np.asarray(logits, np.float64), int(target), activation, gradient,
                  gradcam(activation, gradient), filters)


def gradcam(activation: np.ndarray, gradient: np.ndarray) -> np.ndarray:
  """``T' h w D`` each -> the Grad-CAM map ``T' h w``: channels weighted by their mean gradient."""
  return activation @ gradient.mean(axis=(0, 1, 2))


def extreme_locations(cam: np.ndarray) -> Dict[str, Tuple[int, int]]:
  """``(y, x)`` cells of the largest and the smallest time-mean of ``cam T' h w``."""
  mean = cam.mean(0)
  return {'largest': np.unravel_index(np.argmax(mean), mean.shape),
          'smallest': np.unravel_index(np.argmin(mean), mean.shape)}


def map_cell(cell: Tuple[int, int], source: Tuple[int, int], target: Tuple[int, int]):
  """The cell of a ``target`` (h, w) map that contains the centre of ``cell`` of a ``source``
  map of the same image."""
  return tuple(int((c + 0.5) * t / s) for c, s, t in zip(cell, source, target))


def equivalent_kernel(filt: np.ndarray, steps: int) -> Tuple[np.ndarray, np.ndarray]:
  """Filter ``F ...`` (complex) -> ``(lags, kernel)``: the kernel ``T' ...`` of the circular
  convolution along time that the modulation by ``filt`` performs, at lags ``-T'//2 ..``."""
  kernel = np.fft.irfft(filt, n=steps, axis=0)
  lags = np.arange(steps) - steps // 2
  return lags, np.roll(kernel, steps // 2, axis=0)


def band(values: np.ndarray) -> np.ndarray:
  """``N C`` -> ``3 N``: mean, 25th and 75th percentile over channels."""
  return np.stack([values.mean(1), *np.percentile(values, (25, 75), axis=1)])


def filter_values(analysis: Analysis, locations: Dict[str, Tuple[int, int]],
                  block_index: int = -1):
  """Per DTF stage (the block ``block_index`` of its DTF blocks) and location (cells of the
  Grad-CAM map, :func:`extreme_locations`): the filter at the location, ``magnitude`` and
  ``kernel`` bands (see :func:`band`) and the lags.

  Returns ``[(stage, block, {location: {'cell', 'filter F C', 'magnitude 3 F', 'kernel 3 T''}},
  lags)]``, by stage.
  """
  cam_shape = analysis.cam.shape[1:]
  out = []
  for stage, blocks in sorted(analysis.filters.items()):
    names = list(blocks)
    if not -len(names) <= block_index < len(names):
      raise ValueError(f'--block {block_index}: stage {stage} has {len(names)} DTF blocks '
                       f'({", ".join(names)})')
    name = names[block_index]
    filt = blocks[name]  # F H W C
    steps = analysis.cam.shape[0]  # T', the same in every stage
    per_location = {}
    for where, cell in locations.items():
      y, x = map_cell(cell, cam_shape, filt.shape[1:3])
      at = filt[:, y, x]  # F C
      lags, kernel = equivalent_kernel(at, steps)
      per_location[where] = {'cell': (y, x), 'filter': at, 'magnitude': band(np.abs(at)),
                             'kernel': band(kernel)}
    out.append((stage, name, per_location, lags))
  return out


def view_frames(video: np.ndarray) -> np.ndarray:
  """A normalised view ``T H W 3`` (``ops.normalize``) -> uint8 frames as the model saw them."""
  pixels = (video * np.array(ops.IMAGENET_STD) + np.array(ops.IMAGENET_MEAN)) * 255.0
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _png(fig) -> bytes:
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100, bbox_inches='tight')
  plt.close(fig)
  return buffer.getvalue()


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def plot_gradcam(frames: np.ndarray, cam: np.ndarray, locations: Dict[str, Tuple[int, int]],
                 max_frames: int, title: str) -> bytes:
  """Frames ``T H W 3`` (top row) and the rectified Grad-CAM ``T' h w`` over them (bottom row),
  the two ``locations`` (cells of ``cam``) outlined; up to ``max_frames`` frames, evenly
  spaced."""
  plt = _pyplot()
  from matplotlib.patches import Rectangle  # pylint: disable=import-outside-toplevel
  import PIL.Image  # pylint: disable=import-outside-toplevel
  length, size_h, size_w = frames.shape[:3]
  steps, h, w = cam.shape
  shown = np.unique(np.linspace(0, length - 1, min(max_frames, length)).round().astype(int))
  heat = np.maximum(cam, 0) / max(np.maximum(cam, 0).max(), 1e-12)
  fig, axes = plt.subplots(2, len(shown), figsize=(1.6 * len(shown), 3.6), squeeze=False)
  for col, t in enumerate(shown):
    step = t * steps // length  # the model time step that frame t falls in
    up = np.asarray(PIL.Image.fromarray((heat[step] * 255).astype(np.uint8)).resize(
        (size_w, size_h), PIL.Image.BILINEAR)) / 255.0
    for row in range(2):
      ax = axes[row, col]
      ax.imshow(frames[t])
      if row:
        ax.imshow(up, cmap='jet', alpha=0.5, vmin=0, vmax=1)
      for where, colour in LOCATIONS:
        y, x = locations[where]
        ax.add_patch(Rectangle((x * size_w / w - 0.5, y * size_h / h - 0.5), size_w / w,
                               size_h / h, fill=False, edgecolor=colour, linewidth=1.5))
      ax.set_xticks([])
      ax.set_yticks([])
    axes[0, col].set_title(f'frame {t}', fontsize=8)
  axes[0, 0].set_ylabel('view', fontsize=8)
  axes[1, 0].set_ylabel('Grad-CAM', fontsize=8)
  fig.suptitle(title, fontsize=9)
  return _png(fig)


def plot_filters(values, family: str) -> bytes:
  """Rows: per location |F| per bin and k per lag; columns: DTF stages (see
  :func:`filter_values`)."""
  plt = _pyplot()
  fig, axes = plt.subplots(4, len(values), figsize=(2.4 * len(values), 7.2), squeeze=False)
  for col, (stage, name, per_location, lags) in enumerate(values):
    label = f'res{stage + 1}' if family == 'resnet' else f'stage {stage}'
    for loc, (where, colour) in enumerate(LOCATIONS):
      entry = per_location[where]
      magnitude, kernel = entry['magnitude'], entry['kernel']
      bins = np.arange(magnitude.shape[1])
      ax = axes[2 * loc, col]
      ax.bar(bins, magnitude[0], color=colour, alpha=0.7)
      ax.errorbar(bins, magnitude[0], yerr=np.abs(magnitude[1:] - magnitude[0]), fmt='none',
                  ecolor='black', elinewidth=0.8, capsize=2)
      ax.set_xticks(bins)
      ax.set_title(f'{label} ({name}), cell {entry["cell"]}', fontsize=7)
      ax = axes[2 * loc + 1, col]
      ax.axhline(0, color='grey', linewidth=0.5)
      ax.fill_between(lags, kernel[1], kernel[2], color=colour, alpha=0.25)
      ax.plot(lags, kernel[0], 'o-', color=colour, markersize=3)
      ax.set_xticks(lags)
      if col == 0:
        axes[2 * loc, 0].set_ylabel(f'{where}: |filter|\nper frequency bin', fontsize=8)
        axes[2 * loc + 1, 0].set_ylabel(f'{where}: kernel\nper time lag', fontsize=8)
    for ax in axes[:, col]:
      ax.tick_params(labelsize=7)
  fig.tight_layout()
  return _png(fig)


def write_index(out, title: str, lines: List[str], with_filters: bool) -> None:
  body = ''.join(f'<li>{html.escape(line)}</li>' for line in lines)
  images = '<h2>Grad-CAM</h2><img src="gradcam.png">'
  if with_filters:
    images += ('<h2>Frequency filters and equivalent temporal kernels</h2>'
               '<p>Per location (red: largest Grad-CAM, blue: smallest) and DTF stage: the '
               'filter magnitude per frequency bin and the equivalent kernel per time lag, the '
               'mean over channels with the 25th-75th percentile band.</p>'
               '<img src="filters.png">')
  storage.write_text(out / 'index.html', (
      f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
      f'</head><body><h1>{html.escape(title)}</h1><ul>{body}</ul>{images}</body></html>\n'))


def load_view(file: str, protocol: predict.Protocol, class_names: List[str],
              clip: int) -> Optional[np.ndarray]:
  """Clip ``clip`` of ``file`` (of ``protocol.num_clips``), centre crop, as the eval pipeline
  makes it: ``1 T H W 3`` normalised; None (reported) if the file cannot be decoded."""
  from dtf_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  records, _, failures = predict.encode_files([file], protocol)
  if failures:
    _log(f'{file} cannot be decoded: {failures[0]}')
    return None
  data = pipeline.eval_dataset(
      predict.records_source([records[0][1]], class_names), batch_size=protocol.num_clips,
      clip_length=protocol.clip_length, stride=protocol.stride, size=protocol.size,
      num_clips=protocol.num_clips, num_crops=1, process_index=0)
  return next(data.dataset.as_numpy_iterator())['video'][clip:clip + 1]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(prog='python -m dtf_jax.tools.visualize',
                                   description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n', 1)[1])
  parser.add_argument('--checkpoint', required=True,
                      help='a pretrained directory (convert_torch output) or a trainer workdir.')
  parser.add_argument('--video', required=True, help='one video file (local or URL).')
  parser.add_argument('--out', required=True, help='output directory (local or URL).')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace the visualization that --out already holds.')
  parser.add_argument('--step', type=int, default=None,
                      help='checkpoint step of a workdir (default: the latest).')
  parser.add_argument('--clips', type=int, default=None,
                      help='clips the file is cut into (default: the eval config\'s).')
  parser.add_argument('--clip', type=int, default=None,
                      help='which of them is shown, 0-based (default: the middle one).')
  parser.add_argument('--stage', type=int, default=None,
                      help='Grad-CAM stage, 1-based (default: the deepest with a map of at '
                           f'least {MIN_CAM_SIDE}x{MIN_CAM_SIDE}).')
  parser.add_argument('--class', dest='target', default=None,
                      help='target class, a name or an index (default: the top-1 of the view).')
  parser.add_argument('--block', type=int, default=-1,
                      help='which DTF block of each stage, an index into its DTF blocks '
                           '(default -1: the last).')
  parser.add_argument('--frames', type=int, default=8,
                      help='frames shown in gradcam.png, evenly spaced (default 8).')
  args = parser.parse_args(argv)
  if (args.clips is not None and args.clips < 1) or args.frames < 1:
    parser.error('--clips and --frames must be >= 1')
  return args, parser


def _target_index(target: Optional[str], class_names: List[str]) -> Optional[int]:
  if target is None:
    return None
  if target in class_names:
    return class_names.index(target)
  if target.isdigit() and int(target) < len(class_names):
    return int(target)
  raise ValueError(f'--class {target!r} is neither a class name nor an index in 0..'
                   f'{len(class_names) - 1}; classes: {", ".join(class_names[:20])}'
                   f'{" ..." if len(class_names) > 20 else ""}')


def check_out(args) -> None:
  """Before any work: ``--out`` is (or can become) a writable folder that holds no earlier
  visualization (unless ``--overwrite``)."""
  out = storage.path(args.out)
  if out.exists() and not out.is_dir():
    raise storage.OutputError(f'--out {args.out} is a file; give a folder')
  if (out / 'index.html').exists() and not args.overwrite:
    raise storage.OutputError(f'--out {args.out} holds a visualization (index.html); pass '
                              '--overwrite to replace it')
  storage.check_output(out / 'index.html', '--out', overwrite=True, inputs=[args.video])


def main(argv=None) -> int:
  args, parser = parse_args(argv)
  check_out(args)
  hide_accelerators_from_tf()
  model, variables, class_names, protocol = predict.load_model(
      args.checkpoint, args.step, args.clips, 1, remat='none', dtype='float32')
  clip = protocol.num_clips // 2 if args.clip is None else args.clip
  if not 0 <= clip < protocol.num_clips:
    parser.error(f'--clip {clip}: the file is cut into {protocol.num_clips} clips (0..'
                 f'{protocol.num_clips - 1})')
  try:
    target = _target_index(args.target, class_names)
  except ValueError as e:
    parser.error(str(e))

  video = load_view(args.video, protocol, class_names, clip)
  if video is None:
    return 1

  shapes = stage_shapes(model, variables, video)
  sides = [min(s[-3:-1]) for s in shapes]
  stage = args.stage
  if stage is None:
    stage = max([s + 1 for s, side in enumerate(sides) if side >= MIN_CAM_SIDE] or [1])
  if not 1 <= stage <= len(shapes):
    parser.error(f'--stage {stage}: the model has stages 1..{len(shapes)}')
  _log(f'clip {clip} of {protocol.num_clips}, centre crop; Grad-CAM at stage {stage} '
       f'({shapes[stage - 1][-3]}x{shapes[stage - 1][-2]} locations)')
  analysis = analyse(model, variables, video, stage, target, shapes)
  probs = np.exp(analysis.logits - analysis.logits.max())
  probs /= probs.sum()
  top = int(np.argmax(probs))
  cam_shape = analysis.cam.shape[1:]
  locations = extreme_locations(analysis.cam)
  try:
    values = filter_values(analysis, locations, args.block)
  except ValueError as e:
    parser.error(str(e))

  out = storage.path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  title = (f'{storage.path(args.video).name}: top-1 {class_names[top]} ({probs[top]:.3f}); '
           f'Grad-CAM of {class_names[analysis.target]} at stage {stage}')
  frames = view_frames(video[0])
  storage.write_bytes(out / 'gradcam.png',
                      plot_gradcam(frames, analysis.cam, locations, args.frames, title))
  arrays: Dict[str, Any] = {
      'frames': frames, 'logits': analysis.logits, 'target': analysis.target,
      'stage': stage, 'cam': analysis.cam, 'weights': analysis.gradient.mean(axis=(0, 1, 2)),
      **{f'location_{where}': np.array(cell) for where, cell in locations.items()}}
  lines = [f'checkpoint: {args.checkpoint}', f'video: {args.video} (clip {clip} of '
           f'{protocol.num_clips}, centre crop, {protocol.clip_length} frames at {protocol.size})',
           f'top-1: {class_names[top]} ({probs[top]:.4f}); Grad-CAM target: '
           f'{class_names[analysis.target]}',
           f'Grad-CAM stage {stage}: {cam_shape[0]}x{cam_shape[1]} cells; largest at (y, x) = '
           f'{tuple(map(int, locations["largest"]))}, smallest at '
           f'{tuple(map(int, locations["smallest"]))}']
  if values:
    storage.write_bytes(out / 'filters.png', plot_filters(values, model_spec(model).family))
    for stage_k, name, per_location, lags in values:
      arrays[f'stage{stage_k}_lags'] = lags
      for where, entry in per_location.items():
        for key in ('cell', 'filter', 'magnitude', 'kernel'):
          arrays[f'stage{stage_k}_{where}_{key}'] = np.asarray(entry[key])
      lines.append(f'stage {stage_k}: DTF block {name}; cells ' + ', '.join(
          f'{where} {tuple(map(int, entry["cell"]))}' for where, entry in per_location.items()))
  else:
    _log(f'{type(model).__name__} has no DTF block with a frequency filter: no filters.png')
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  storage.write_bytes(out / 'values.npz', buffer.getvalue())
  write_index(out, title, lines, bool(values))
  print('\n'.join(lines))
  print(f'wrote {out / "index.html"}, gradcam.png' + (', filters.png' if values else '')
        + ', values.npz')
  return 0


if __name__ == '__main__':
  sys.exit(errors.run_main(main))

"""Classifies video files with a trained model: top classes, features, an annotated copy.

    python -m dtf_jax.tools.predict --checkpoint runs/quickstart \\
        --video data/synthetic/videos/validation/00000{0,1}.mp4
    python -m dtf_jax.tools.predict --checkpoint CKPT --video a.mp4 b.webm --json \\
        --features feats.npz --per-view --out annotated/

``CKPT`` is a pretrained directory (``convert_torch`` output) or a trainer workdir (its latest
checkpoint, or ``--step``); the model and the class names come from its ``meta.json`` or
``config.json`` (``dtf_jax.pretrained``).

Each file (any container, length, frame rate and resolution PyAV decodes) goes through the path
of the data a model is evaluated on: the converter's ``encode_video`` turns it into a record (PyAV
decoding, short side resized, JPEG frames), and the eval pipeline (``pipeline.eval_dataset``) cuts
it into views; so a file is seen exactly as ``main.py --mode=eval`` sees it once converted. The
conversion settings are those of the workdir's eval data when its manifest can be read
(``{split}-manifest.json``), else the converter's defaults. The views are the eval config's
(``data.num_clips`` x ``data.num_crops`` at ``data.eval_size``; for a pretrained directory, the
paper's Kinetics protocol: 10 x 3 at 256 for ResNets, 4 x 3 at 224 for Swin), or ``--clips`` /
``--crops``. A file's scores are the mean softmax of its views, as in eval.

Output: per file its top ``--top`` classes with scores (``--json``: one JSON line per file);
``--features OUT.npz``: the pooled pre-classifier feature of each file (``features N D``, the mean
over its views; ``--per-view`` adds ``view_features N V D``), with ``files``, ``scores N C`` and
``class_names``; ``--out``: the video with the top-1 class and score drawn on it (a file for one
video, a directory for several; frames upscaled to a short side of at least 256 to be readable).
A file that cannot be decoded (or a URL of a scheme other than ``gs://``) is reported and skipped;
the exit code is 1 if any was, else 0.

Outputs are checked before any work: an existing ``--out`` or ``--features`` file is refused
without ``--overwrite``, and an output that is one of the input videos (however the path is
spelled) is refused always. The work is bounded by what the videos have: ``--clips`` above the
number of distinct clip starts of the longest video is lowered to it, ``--batch-size`` above the
number of views to that number, and a batch whose compiled forward needs more memory than the
device has free is refused, naming the largest that fits.
"""

import argparse
import dataclasses
import fractions
import io
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from dtf_jax import errors, pretrained, storage
from dtf_jax.errors import UserError
from dtf_jax.data import convert, hide_accelerators_from_tf, video as video_lib
from dtf_jax.models import model_spec

# The paper's Kinetics-400 views (configs/base.py): for pretrained directories, which carry no
# eval config. (family: (eval size, clips, crops)); Swin's eval size is its image size.
PRETRAINED_VIEWS = {'resnet': (256, 10, 3), 'swin': (None, 4, 3)}
MIN_ANNOTATED_SIDE = 256


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How a file becomes views: conversion settings and the eval views."""
  clip_length: int
  stride: int
  size: int
  num_clips: int
  num_crops: int
  encode: convert.EncodeOptions
  source: str  # where the settings came from (printed)


def eval_protocol(checkpoint: str, meta: Dict[str, Any], clips: Optional[int] = None,
                  crops: Optional[int] = None) -> Protocol:
  """The views of ``checkpoint`` (a workdir's eval config, or the paper's for a pretrained
  directory), ``clips`` / ``crops`` replacing its clips and crops."""
  path = storage.path(checkpoint)
  encode, source = convert.EncodeOptions(), 'converter defaults'
  if (path / pretrained.META_FILE).exists():
    family = model_spec(meta['model']).family
    size, num_clips, num_crops = PRETRAINED_VIEWS[family]
    if size is None:
      size = meta['kwargs']['image_size']
    clip_length, stride = meta['kwargs']['clip_length'], 1
    where = f'the paper\'s {family} views (pretrained directory)'
  else:
    data = storage.read_json(path / pretrained.CONFIG_FILE)['data']
    clip_length, stride, size = data['clip_length'], data['stride'], data['eval_size']
    num_clips, num_crops = data['num_clips'], data['num_crops']
    where = f'the eval config of {path / pretrained.CONFIG_FILE}'
    if data['dataset'].startswith('tfrecord:'):
      manifest = storage.path(data['dataset'][len('tfrecord:'):]) / (
          f'{data["eval_split"]}-manifest.json')
      if manifest.exists():
        settings = storage.read_json(manifest)['settings']
        encode = convert.EncodeOptions(short_side=settings['short_side'], fps=settings['fps'],
                                       jpeg_quality=settings['jpeg_quality'])
        source = f'the conversion of {manifest}'
  return Protocol(clip_length, stride, size, clips or num_clips, crops or num_crops, encode,
                  f'views: {where}; frames: {source}')


def load_model(checkpoint: str, step: Optional[int] = None, clips: Optional[int] = None,
               crops: Optional[int] = None, **overrides: Any):
  """``(model, variables, class_names, protocol)`` of ``checkpoint`` (see :func:`eval_protocol`;
  ``overrides`` as in ``pretrained.load_pretrained``), built for the protocol's frame size."""
  meta = pretrained.read_meta(checkpoint)
  protocol = eval_protocol(checkpoint, meta, clips, crops)
  argument = model_spec(meta['model']).size_argument
  if argument and meta['kwargs'].get(argument) != protocol.size:
    overrides[argument] = protocol.size  # Swin is built for one frame size: the eval size
  model, variables = pretrained.load_pretrained(checkpoint, step=step, **overrides)
  num_classes = meta['kwargs']['num_classes']
  class_names = meta['class_names'] or [f'class_{i}' for i in range(num_classes)]
  _log(f'{meta["model"]} from {checkpoint}: {protocol.num_clips} clips x '
       f'{protocol.num_crops} crops of {protocol.clip_length} frames (stride {protocol.stride}) '
       f'at {protocol.size}; {protocol.source}')
  return model, variables, list(class_names), protocol


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def encode_files(files: Sequence[str], protocol: Protocol):
  """Each file as the converter writes it -> ``(records, frames, failures)``: ``[(index,
  serialized SequenceExample)]`` of the decodable files, in order, their frame counts, and
  ``{index: error}`` of the others (undecodable, or a URL that ``dtf_jax.storage`` cannot read)."""
  records, counts, failures = [], [], {}
  for i, path in enumerate(files):
    begin = time.time()
    item = convert.VideoItem(id=str(i), path=path, filename=os.path.basename(path),
                             label_index=-1, label_text='')
    try:
      storage.path(path)  # an unsupported URL scheme: ValueError naming it
      record, frames = convert.encode_video(item, protocol.encode)
    except (video_lib.VideoDecodeError, ValueError) as e:
      failures[i] = str(e)
      _log(f'skipped {path}: {e}')
      continue
    records.append((i, record))
    counts.append(frames)
    _log(f'decoded {path}: {frames} frames ({time.time() - begin:.1f} s)')
  return records, counts, failures


def bounded_clips(protocol: Protocol, frame_counts: Sequence[int]) -> Protocol:
  """``protocol`` with no more clips than the longest video has distinct clip starts (a clip
  spans ``(clip_length - 1) * stride + 1`` frames; a shorter video has one)."""
  span = (protocol.clip_length - 1) * protocol.stride + 1
  most = max(max(1, n - span + 1) for n in frame_counts)
  if protocol.num_clips <= most:
    return protocol
  _log(f'--clips {protocol.num_clips}: the longest video has {most} distinct clip start'
       f'{"s" * (most > 1)} ({max(frame_counts)} frames, clips of {span}); using {most}')
  return dataclasses.replace(protocol, num_clips=most)


def available_memory(device) -> Optional[int]:
  """Bytes free for one program on ``device``: the host's available memory for a CPU device,
  else the device's memory limit less what is in use; None if unknown."""
  if device.platform == 'cpu':
    try:
      with open('/proc/meminfo', encoding='ascii') as f:
        info = dict(line.split(':', 1) for line in f)
      return int(info['MemAvailable'].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
      return None
  stats = device.memory_stats() or {}
  if 'bytes_limit' not in stats:
    return None
  return stats['bytes_limit'] - stats.get('bytes_in_use', 0)


def records_source(records: List[bytes], class_names: Sequence[str]):
  """The records as the eval pipeline's ``VideoSource`` (one process, in order)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from dtf_jax.data import ops, pipeline  # pylint: disable=import-outside-toplevel

  def read(process_index: int, epoch_seed=None) -> tf.data.Dataset:
    del process_index, epoch_seed
    return tf.data.Dataset.from_tensor_slices(records).enumerate().map(
        lambda i, serialized: dict(ops.parse_sequence_example(serialized), video_index=i))
  return pipeline.VideoSource('predict', 'files', tuple(class_names), True, (len(records),), read)


def predict_records(model, variables, records: List[bytes], class_names: Sequence[str],
                    protocol: Protocol, batch_size: int = 8, with_features: bool = False):
  """``(scores N C, view_features N V D or None)``: the mean softmax of each record's views (as
  ``main.py --mode=eval``) and, with ``with_features``, each view's pooled feature."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dtf_jax.data import pipeline  # pylint: disable=import-outside-toplevel

  data = pipeline.eval_dataset(
      records_source(records, class_names), batch_size=batch_size,
      clip_length=protocol.clip_length,
      stride=protocol.stride, size=protocol.size, num_clips=protocol.num_clips,
      num_crops=protocol.num_crops, process_index=0)

  @jax.jit
  def run(variables, video):  # XLA computes the shared backbone once (CSE): same FLOPs as one
    probs = jax.nn.softmax(model.apply(variables, video, train=False).astype(jnp.float32))
    return probs, (model.apply(variables, video, features=True) if with_features else None)

  shape = (batch_size, protocol.clip_length, protocol.size, protocol.size, 3)
  run = run.lower(variables, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
  memory, free = run.memory_analysis(), available_memory(jax.devices()[0])
  if memory is not None and free is not None:
    need = (memory.argument_size_in_bytes + memory.temp_size_in_bytes +
            memory.output_size_in_bytes)
    batch_bytes = np.prod(shape) * 4
    if need + 2 * batch_bytes > free:  # the input pipeline holds about two batches more
      per_view = max(1, (need + 2 * batch_bytes) // batch_size)
      raise MemoryBoundError(
          f'--batch-size {batch_size}: the forward pass of {batch_size} views needs '
          f'{(need + 2 * batch_bytes) / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free; '
          f'use --batch-size {max(1, free // per_view // 2)} or less')

  views = data.views_per_video
  scores = np.zeros((len(records), views, len(class_names)), np.float32)
  features = None
  for b, batch in enumerate(data.dataset.as_numpy_iterator()):
    probs, feats = jax.device_get(run(variables, batch['video']))
    keep = batch['mask']
    rows, cols = batch['video_index'][keep], batch['view_index'][keep]
    scores[rows, cols] = probs[keep]
    if with_features:
      if features is None:
        features = np.zeros((len(records), views, feats.shape[-1]), np.float32)
      features[rows, cols] = feats[keep]
    _log(f'views: batch {b + 1}/{data.num_batches}')
  return scores.mean(1), features


class MemoryBoundError(UserError, ValueError):
  """A batch that does not fit the device's free memory (the message names the flag)."""


def annotate(path: str, out: str, text: str) -> int:
  """Writes ``path``'s frames with ``text`` drawn at the top to the mp4 ``out``; returns the
  number of frames. Frames are upscaled (nearest) to a short side >= ``MIN_ANNOTATED_SIDE``."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=import-outside-toplevel
  frames, fps = video_lib.decode_video(path, short_side=None)
  storage.path(out).parent.mkdir(parents=True, exist_ok=True)
  scale = max(1, math.ceil(MIN_ANNOTATED_SIDE / min(frames.shape[1:3])))
  frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
  h, w = frames.shape[1:3]
  frames = np.pad(frames, ((0, 0), (0, -h % 4), (0, -w % 2), (0, 0)), mode='edge')
  font = ImageFont.load_default(size=max(12, min(h, w) // 16))
  drawn = []
  for frame in frames:
    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    box = draw.textbbox((4, 4), text, font=font)
    draw.rectangle((0, 0, box[2] + 4, box[3] + 4), fill=(0, 0, 0))
    draw.text((4, 4), text, fill=(255, 255, 255), font=font)
    drawn.append(np.asarray(image))
  video_lib.write_mp4(out, np.stack(drawn), fractions.Fraction(fps).limit_denominator(1001))
  return len(drawn)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(prog='python -m dtf_jax.tools.predict',
                                   description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n', 1)[1])
  parser.add_argument('--checkpoint', required=True,
                      help='a pretrained directory (convert_torch output) or a trainer workdir.')
  parser.add_argument('--video', required=True, nargs='+', help='video files (local or URLs).')
  parser.add_argument('--step', type=int, default=None,
                      help='checkpoint step of a workdir (default: the latest).')
  parser.add_argument('--clips', type=int, default=None,
                      help='clips per video (default: the eval config\'s).')
  parser.add_argument('--crops', type=int, choices=(1, 3), default=None,
                      help='crops per clip, 1 (centre) or 3 (default: the eval config\'s).')
  parser.add_argument('--top', type=int, default=5, help='classes printed per file (default 5).')
  parser.add_argument('--batch-size', type=int, default=8,
                      help='views per forward pass (default 8).')
  parser.add_argument('--json', action='store_true',
                      help='one JSON line per file on stdout instead of the table.')
  parser.add_argument('--features', default=None, metavar='OUT.npz',
                      help='save the pooled pre-classifier feature of each file.')
  parser.add_argument('--per-view', action='store_true',
                      help='with --features: also every view\'s feature (view_features N V D).')
  parser.add_argument('--out', default=None,
                      help='write the video with the top-1 class drawn on it (an .mp4 for one '
                           'video, a directory for several).')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace existing --out / --features files (never an input video).')
  args = parser.parse_args(argv)
  if args.top < 1 or args.batch_size < 1 or (args.clips is not None and args.clips < 1):
    parser.error('--top, --batch-size and --clips must be >= 1')
  if args.per_view and not args.features:
    parser.error('--per-view needs --features')
  if args.out and len(args.video) == 1 and not args.out.endswith('.mp4'):
    parser.error('--out: give an .mp4 file for one video (a directory for several)')
  return args


def _annotated_paths(out: str, files: Sequence[str]) -> List[str]:
  """Where the annotated copy of each file goes: ``out`` itself for one file, else
  ``out/STEM.mp4`` (``STEM_K.mp4`` for the K-th file when a stem repeats)."""
  if len(files) == 1:
    return [out]
  paths, used = [], set()
  for k, file in enumerate(files):
    stem = os.path.splitext(os.path.basename(file))[0]
    name = f'{stem}.mp4' if stem not in used else f'{stem}_{k}.mp4'
    paths.append(str(storage.path(out) / name))
    used.add(stem)
  return paths


def check_outputs(args) -> List[str]:
  """Before any work: every file predict would write can be written (see
  ``dtf_jax.storage.check_output``); returns the annotated videos' paths."""
  if args.out and len(args.video) > 1 and storage.path(args.out).exists() and not \
      storage.path(args.out).is_dir():
    raise storage.OutputError(f'--out {args.out} is a file; give a folder for several videos')
  annotated = _annotated_paths(args.out, args.video) if args.out else []
  for out in annotated:
    storage.check_output(out, '--out', args.overwrite, inputs=args.video)
  if args.features:
    storage.check_output(args.features, '--features', args.overwrite, inputs=args.video)
  if args.features and any(storage.same_file(args.features, a) for a in annotated):
    raise storage.OutputError(f'--features {args.features} is also an --out video')
  return annotated


def main(argv=None) -> int:
  args = parse_args(argv)
  annotated = check_outputs(args)
  hide_accelerators_from_tf()  # before TensorFlow (the converter, the pipeline) makes devices
  model, variables, class_names, protocol = load_model(args.checkpoint, args.step, args.clips,
                                                       args.crops)
  num_classes = len(class_names)

  records, frame_counts, failures = encode_files(args.video, protocol)
  scores = features = None
  if records:
    protocol = bounded_clips(protocol, frame_counts)
    views = len(records) * protocol.num_clips * protocol.num_crops
    scores, features = predict_records(model, variables, [r for _, r in records], class_names,
                                       protocol, min(args.batch_size, views),
                                       bool(args.features))
  row_of = {i: r for r, (i, _) in enumerate(records)}  # file index -> row of scores
  top = min(args.top, num_classes)
  for i, file in enumerate(args.video):
    if i in failures:
      line = {'file': file, 'error': failures[i]}
      print(json.dumps(line) if args.json else f'{file}\n  skipped: {failures[i]}', flush=True)
      continue
    row = scores[row_of[i]]
    order = np.argsort(-row, kind='stable')[:top]
    if args.json:
      print(json.dumps({'file': file, 'views': protocol.num_clips * protocol.num_crops,
                        'top': [{'class': class_names[k], 'index': int(k),
                                 'score': round(float(row[k]), 6)} for k in order]}), flush=True)
    else:
      print(file + ''.join(f'\n  {r + 1}. {class_names[k]:<30} {row[k]:.4f}'
                           for r, k in enumerate(order)), flush=True)
    if args.out:
      out = annotated[i]
      count = annotate(file, out, f'{class_names[order[0]]}: {row[order[0]]:.2f}')
      _log(f'wrote {out} ({count} frames)')
  if args.features and records:
    arrays = {'files': np.array([args.video[i] for i, _ in records]),
              'features': features.mean(1), 'scores': scores, 'class_names': np.array(class_names)}
    if args.per_view:
      arrays['view_features'] = features
    archive = io.BytesIO()  # np.savez seeks back; a bucket's upload stream cannot
    np.savez(archive, **arrays)
    storage.write_bytes(args.features, archive.getvalue())
    _log(f'wrote {args.features}: features {arrays["features"].shape}')
  if failures:
    _log(f'{len(failures)} of {len(args.video)} files could not be decoded')
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(errors.run_main(main))

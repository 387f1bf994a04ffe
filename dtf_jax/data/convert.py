"""Converts a video dataset into sharded DMVR-style ``tf.train.SequenceExample`` TFRecords.

    python -m dtf_jax.data.convert kinetics --csv train.csv --csv validate.csv \\
        --videos K400/videos --output OUT
    python -m dtf_jax.data.convert ssv2 --annotations SSV2/labels --videos SSV2/videos --output OUT
    python -m dtf_jax.data.convert ssv1 --labels something-something-v1-labels.csv \\
        --split train=something-something-v1-train.csv \\
        --split validation=something-something-v1-validation.csv --videos SSV1/frames --output OUT
    python -m dtf_jax.data.convert list --split train=train.txt --root VIDEOS \\
        [--class-names classes.txt] --output OUT

Inputs:
  kinetics  CSVs ``label,youtube_id,time_start,time_end,split`` (no ``label`` column: label -1; no
            ``split`` column: the file name's stem); videos ``{youtube_id}_{start:06d}_{end:06d}.*``
            anywhere under ``--videos`` (class sub-folders are fine). Classes: sorted label names.
  ssv2      ``--annotations`` holds ``labels.json`` (template -> index) and ``train.json``,
            ``validation.json`` [, ``test.json``] (lists of ``{id, template, ...}``; ``[``/``]`` of
            templates are stripped); videos ``{id}.webm``.
  ssv1      ``;``-separated CSVs ``id;label`` (only ``id`` for test), a category list (one name per
            line, index = line), frame folders ``{videos}/{id}/*.jpg`` at ``--folder-fps`` (12).
  list      lines ``relative/path label_index`` (a path may be a frame folder); optional class names
            file (one per line); without it the class names are the indices.

Every path (lists, videos, ``--output``) may be local or a URL (``gs://...``).
Output in ``--output``: ``{split}-00000-of-000NN.tfrecord`` (records as in ``SCHEMA``),
``label_map.json`` (class name -> index), ``{split}-manifest.json`` (videos written, frames, skipped
videos with reasons, shards, settings) and ``.convert/`` (per-shard bookkeeping for resuming).

Every video of a split goes to a shard fixed by its id (``sha1(seed:id)`` order, cut into equal
contiguous runs), a shard appears only when complete (``dtf_jax.storage.atomic_write``: a renamed
``NAME.tmp`` on disk, an object published once in a bucket), and JPEG encoding is deterministic:
a run that is killed and started again with the same arguments skips the finished shards and ends
with byte-identical files. Videos that cannot be decoded (missing, empty, corrupt,
truncated, no video stream) or have fewer than ``--min-frames`` frames are skipped and listed.

A run holds ``{output}/.convert/lock`` until it ends, also on errors and Ctrl-C: a second
converter on the same output stops at once naming the holder, and a lock left by a process that
no longer runs on the same host, or whose heartbeat stopped over ten minutes ago, is taken over
with a warning (``dtf_jax.lockfile``; advisory in a bucket).

Ctrl-C stops the run promptly: pending shards are cancelled, worker processes are terminated, only
finished shards stay (no ``.tmp`` left behind) and the same command resumes. A split that writes no
video at all (none listed, or all skipped) still gets its manifest, and the run fails.

Exit codes: 0 done; 1 failure (one line on stderr: missing input, bad annotation, output not
writable, output in use, a split with 0 videos written); 2 bad arguments; 3 stopped by
``--max-shards``; 130 interrupted (Ctrl-C).
"""

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from dtf_jax import lockfile, storage
from dtf_jax.errors import UserError
from dtf_jax.lockfile import LockHeld
from dtf_jax.data.video import FOLDER_FPS

# Records: one tf.train.SequenceExample per video. key -> (part, type, meaning).
SCHEMA = {
    'image/encoded': ('feature_list', 'bytes', 'one JPEG per frame, RGB, H x W'),
    'clip/label/index': ('context', 'int64', 'class index; -1 when unlabelled (test sets)'),
    'clip/label/text': ('context', 'bytes', 'class name (utf-8); empty when unlabelled'),
    'video/filename': ('context', 'bytes', 'video path relative to the input root (or its id)'),
    'video/id': ('context', 'bytes', 'annotation id: youtube_id_start_end, SSv1/v2 id, or path'),
    'video/fps': ('context', 'float', 'frame rate of the stored frames'),
    'video/source_fps': ('context', 'float', 'frame rate of the source video'),
    'video/num_frames': ('context', 'int64', 'number of stored frames N'),
    'image/height': ('context', 'int64', 'frame height H'),
    'image/width': ('context', 'int64', 'frame width W'),
    'image/format': ('context', 'bytes', "b'JPEG'"),
}
FORMATS = ('kinetics', 'ssv2', 'ssv1', 'list')
STATE_DIR = '.convert'
LOCK_NAME = 'lock'  # in STATE_DIR
KINETICS_COLUMNS = ('youtube_id', 'time_start', 'time_end')  # required; label, split optional


class ConvertError(UserError, ValueError):
  """Bad input, unusable output or output in use; the message names the culprit."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during ``convert_split``: ``done`` of ``total`` shards of ``split`` are finished (and
  kept); the same call again resumes."""

  def __init__(self, split: str, done: int, total: int):
    super().__init__(f'{split}: {done} of {total} shards done')
    self.split, self.done, self.total = split, done, total


@dataclasses.dataclass(frozen=True)
class VideoItem:
  """One video to convert: ``id`` (fixes its shard), file or frame folder, label."""
  id: str
  path: str
  filename: str
  label_index: int
  label_text: str


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
  """What decides the content of the records (part of the resume check)."""
  short_side: int = 320
  fps: Optional[float] = None
  jpeg_quality: int = 90
  min_frames: int = 1
  folder_fps: float = FOLDER_FPS


# ---------------------------------------------------------------------------------------------
# Annotation readers: -> (class names, {split: [VideoItem]}).


def _index_videos(videos_dir: str) -> Dict[str, str]:
  """File stem -> path relative to ``videos_dir`` (first in sorted order; ``.mp4`` preferred)."""
  found = {}
  top = storage.path(videos_dir)
  for root, dirs, files in storage.walk(top):
    dirs.sort()
    for name in sorted(files):
      stem, ext = os.path.splitext(name)
      if ext.lower() in ('.tmp', '.part', '.json', '.txt', '.csv'):
        continue
      rel = str((root / name).relative_to(top))
      if stem not in found or (ext.lower() == '.mp4' and not found[stem].lower().endswith('.mp4')):
        found[stem] = rel
  return found


def _dedupe(items: List[VideoItem]) -> List[VideoItem]:
  seen, out = set(), []
  for item in items:
    if item.id not in seen:
      seen.add(item.id)
      out.append(item)
  return out


def read_kinetics(csv_paths: Sequence[str], videos_dir: str,
                  class_names: Optional[Sequence[str]] = None):
  """Kinetics CSVs -> ``(classes, {split: items})``; classes sorted by name unless given."""
  rows, splits = [], {}
  for path in csv_paths:
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=''))
    if reader.fieldnames is None:  # an empty file: a split (its stem) with no video
      splits.setdefault(storage.path(path).stem, [])
      continue
    missing = [c for c in KINETICS_COLUMNS if c not in reader.fieldnames]
    if missing:
      raise ConvertError(
          f'{path}: missing column{"s" if len(missing) > 1 else ""} {", ".join(missing)} (header: '
          f'{",".join(reader.fieldnames)}; required: {", ".join(KINETICS_COLUMNS)})')
    count = 0
    for row in reader:
      line = f'{path}:{reader.line_num}'
      split = (row.get('split') or '').strip() or storage.path(path).stem
      youtube_id = (row.get('youtube_id') or '').strip()
      if not youtube_id:
        raise ConvertError(f'{line}: empty youtube_id')
      rows.append((split, (row.get('label') or '').strip(), youtube_id,
                   _csv_int(row, 'time_start', line), _csv_int(row, 'time_end', line), line))
      count += 1
    if not count:
      splits.setdefault(storage.path(path).stem, [])
  if class_names is None:
    class_names = sorted({label for _, label, *_ in rows if label})
  index = {name: i for i, name in enumerate(class_names)}
  files = _index_videos(videos_dir)
  for split, label, youtube_id, start, end, line in rows:
    vid = f'{youtube_id}_{start:06d}_{end:06d}'
    if label and label not in index:
      raise ConvertError(f'{line}: Kinetics label {label!r} of {vid} is not in the class list')
    rel = files.get(vid, vid + '.mp4')
    splits.setdefault(split, []).append(VideoItem(
        vid, _join(videos_dir, rel), rel, index[label] if label else -1, label))
  return list(class_names), {k: _dedupe(v) for k, v in splits.items()}


def _csv_int(row: dict, key: str, line: str) -> int:
  text = (row.get(key) or '').strip()
  try:
    return int(float(text))
  except (ValueError, OverflowError):
    raise ConvertError(f'{line}: {key} {text!r} is not a number') from None


def _strip_template(template: str) -> str:
  return template.replace('[', '').replace(']', '')


def read_ssv2(annotations_dir: str, videos_dir: str, splits: Optional[Sequence[str]] = None):
  """Something-Something V2 -> ``(classes, {split: items})``, classes ordered by ``labels.json``."""
  annotations = storage.path(annotations_dir)
  labels = {_strip_template(k): int(v)
            for k, v in storage.read_json(annotations / 'labels.json').items()}
  classes = sorted(labels, key=labels.get)
  if [labels[c] for c in classes] != list(range(len(classes))):
    raise ValueError('labels.json: indices are not 0..C-1')
  if splits is None:
    splits = [s for s in ('train', 'validation', 'test')
              if (annotations / f'{s}.json').exists()]
  out = {}
  for split in splits:
    items = []
    for entry in storage.read_json(annotations / f'{split}.json'):
      vid = str(entry['id'])
      label = _strip_template(entry['template']) if entry.get('template') else ''
      if label and label not in labels:
        raise ValueError(f'SSv2 template {label!r} of video {vid} is not in labels.json')
      items.append(VideoItem(vid, _join(videos_dir, f'{vid}.webm'), f'{vid}.webm',
                             labels[label] if label else -1, label))
    out[split] = _dedupe(items)
  return classes, out


def _read_text(path: str) -> str:
  return storage.path(path).read_text(encoding='utf-8')


def _join(root: str, rel: str) -> str:
  """``root/rel`` for a local root or a URL."""
  return str(storage.path(root) / rel) if storage.is_url(root) else os.path.join(root, rel)


def _read_names(path: str) -> List[str]:
  return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def read_ssv1(labels_path: str, split_csvs: Dict[str, str], videos_dir: str):
  """Something-Something V1 -> ``(classes, {split: items})``; class index = line of the list."""
  classes = _read_names(labels_path)
  index = {name: i for i, name in enumerate(classes)}
  out = {}
  for split, path in split_csvs.items():
    items = []
    for line in _read_text(path).splitlines():
      if not line.strip():
        continue
      vid, _, label = line.strip().partition(';')
      if label and label not in index:
        raise ValueError(f'SSv1 label {label!r} of video {vid} is not in {labels_path}')
      items.append(VideoItem(vid, _join(videos_dir, vid), vid,
                             index[label] if label else -1, label))
    out[split] = _dedupe(items)
  return classes, out


def read_list(split_lists: Dict[str, str], root: str, class_names_path: Optional[str] = None):
  """Generic ``relative/path label_index`` lists -> ``(classes, {split: items})``."""
  out, max_label = {}, -1
  for split, path in split_lists.items():
    items = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      parts = line.rsplit(maxsplit=1)
      if len(parts) != 2 or not re.fullmatch(r'-?[0-9]+', parts[1]):
        raise ConvertError(f'{path}:{lineno}: expected "relative/path label_index", got {line!r}')
      rel, label = parts[0], int(parts[1])
      if label < -1:
        raise ConvertError(f'{path}:{lineno}: label {label} of {rel!r} is negative (labels are '
                           '0..C-1, or -1 for an unlabelled video)')
      max_label = max(max_label, label)
      items.append((rel, label, lineno))
    out[split] = items
  classes = (_read_names(class_names_path) if class_names_path
             else [str(i) for i in range(max_label + 1)])
  for split, items in out.items():
    for rel, label, lineno in items:
      if label >= len(classes):
        raise ConvertError(f'{split_lists[split]}:{lineno}: label {label} of {rel!r} but '
                           f'{class_names_path} has only {len(classes)} class names '
                           f'(labels 0..{len(classes) - 1})')
  return classes, {
      split: _dedupe([VideoItem(rel, _join(root, rel), rel, label,
                                classes[label] if label >= 0 else '')
                      for rel, label, _ in items])
      for split, items in out.items()}


# ---------------------------------------------------------------------------------------------
# Encoding and shards.


def _tf():
  """TensorFlow, imported when first needed (``--help`` and argument errors stay fast)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf


def encode_video(item: VideoItem, opts: EncodeOptions, threads: int = 0) -> Tuple[bytes, int]:
  """One video -> ``(serialized SequenceExample, num_frames)``. Raises ``VideoDecodeError``."""
  from dtf_jax.data.video import (  # pylint: disable=import-outside-toplevel
      VideoDecodeError, iter_frames)
  tf = _tf()
  info = {}
  jpegs, shape = [], None
  for frame in iter_frames(item.path, opts.short_side or None, opts.fps, threads, opts.folder_fps,
                           info):
    shape = frame.shape
    jpegs.append(tf.io.encode_jpeg(frame, quality=opts.jpeg_quality).numpy())
  if len(jpegs) < max(opts.min_frames, 1):
    raise VideoDecodeError('too_few_frames' if jpegs else 'no_frames',
                           f'{len(jpegs)} < --min-frames {opts.min_frames}')
  seq = tf.train.SequenceExample()
  ctx = seq.context.feature
  ctx['clip/label/index'].int64_list.value.append(item.label_index)
  ctx['clip/label/text'].bytes_list.value.append(item.label_text.encode())
  ctx['video/filename'].bytes_list.value.append(item.filename.encode())
  ctx['video/id'].bytes_list.value.append(item.id.encode())
  ctx['video/fps'].float_list.value.append(info['fps'])
  ctx['video/source_fps'].float_list.value.append(info['source_fps'])
  ctx['video/num_frames'].int64_list.value.append(len(jpegs))
  ctx['image/height'].int64_list.value.append(shape[0])
  ctx['image/width'].int64_list.value.append(shape[1])
  ctx['image/format'].bytes_list.value.append(b'JPEG')
  frames = seq.feature_lists.feature_list['image/encoded'].feature
  for jpeg in jpegs:
    frames.add().bytes_list.value.append(jpeg)
  return seq.SerializeToString(deterministic=True), len(jpegs)


def assign_shards(items: Sequence[VideoItem], num_shards: int, seed: int = 0):
  """Deterministic shards: items ordered by ``sha1(f'{seed}:{id}')``, cut into contiguous runs."""
  order = sorted(items, key=lambda it: (hashlib.sha1(f'{seed}:{it.id}'.encode()).hexdigest(),
                                        it.id))
  n = len(order)
  return [order[i * n // num_shards:(i + 1) * n // num_shards] for i in range(num_shards)]


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f'{split}-{index:05d}-of-{num_shards:05d}.tfrecord'


def _write_json(path: str, obj) -> None:
  storage.write_json(path, obj, indent=1)


def write_shard(path: str, state_path: str, items: Sequence[VideoItem], opts: EncodeOptions,
                threads: int = 0, progress: Optional[Callable[[int, bool], None]] = None) -> dict:
  """Writes one shard (atomically, see ``dtf_jax.storage``) and then its bookkeeping file;
  returns its stats.

  ``progress(frames, skipped)`` is called after every video.
  """
  from dtf_jax.data.video import VideoDecodeError  # pylint: disable=import-outside-toplevel
  tf = _tf()
  stats = {'file': storage.path(path).name, 'videos': 0, 'frames': 0, 'skipped': []}
  with storage.atomic_write(path) as target, tf.io.TFRecordWriter(str(target)) as writer:
    for item in items:
      try:
        record, frames = encode_video(item, opts, threads)
      except VideoDecodeError as e:
        stats['skipped'].append({'video': item.filename, 'reason': e.reason, 'detail': e.detail})
        frames = None
      except Exception as e:  # pylint: disable=broad-except
        stats['skipped'].append({'video': item.filename, 'reason': 'error',
                                 'detail': f'{type(e).__name__}: {e}'.splitlines()[0][:200]})
        frames = None
      if frames is not None:
        writer.write(record)
        stats['videos'] += 1
        stats['frames'] += frames
      if progress is not None:
        progress(frames or 0, frames is None)
  _write_json(state_path, stats)
  return stats


# Worker processes (spawned: TensorFlow is not fork-safe). Each writes whole shards.
_QUEUE = None


@contextlib.contextmanager
def _sigint_ignored():
  """Ctrl-C is ignored inside (in the main thread; elsewhere signals cannot be set): for starting
  workers, which inherit it and so never print a KeyboardInterrupt of their own when a terminal's
  Ctrl-C reaches the whole process group, and for stopping them, which a second Ctrl-C must not
  cut short."""
  import threading  # pylint: disable=import-outside-toplevel
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)


def _init_worker(queue, single_threaded: bool):
  # Ctrl-C is the parent's to handle: it cancels the shards and terminates the workers.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # a converter process: it never runs JAX
  global _QUEUE  # pylint: disable=global-statement
  _QUEUE = queue
  tf = _tf()
  if single_threaded:
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)


def _shard_task(path, state_path, items, opts, threads):
  return write_shard(path, state_path, items, opts, threads,
                     progress=lambda frames, skipped: _QUEUE.put((frames, skipped)))


class Progress:
  """Plain-text progress lines: videos done, videos/s, frames/s, skipped, ETA."""

  def __init__(self, name: str, total: int, done: int = 0, interval: float = 2.0, stream=None):
    self.name, self.total, self.done, self.interval = name, total, done, interval
    self.stream = stream or sys.stdout
    self.start = self.last = time.monotonic()
    self.new = self.frames = self.skipped = 0

  def update(self, frames: int, skipped: bool) -> None:
    self.done += 1
    self.new += 1
    self.frames += frames
    self.skipped += int(skipped)
    if time.monotonic() - self.last >= self.interval and self.done < self.total:
      self.print()

  def print(self, final: bool = False) -> None:
    self.last = time.monotonic()
    elapsed = max(self.last - self.start, 1e-9)
    rate = self.new / elapsed
    eta = (self.total - self.done) / rate if rate > 0 else float('inf')
    eta_text = 'done' if final else (f'ETA {_hms(eta)}' if math.isfinite(eta) else 'ETA ?')
    percent = 100 * self.done / max(self.total, 1)
    print(f'[{self.name}] {self.done}/{self.total} videos ({percent:.1f}%) {rate:.2f} videos/s '
          f'{self.frames / elapsed:.1f} frames/s, {self.skipped} skipped, {_hms(elapsed)} elapsed, '
          f'{eta_text}', file=self.stream, flush=True)


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _settings(opts: EncodeOptions, num_shards: int, seed: int, items) -> dict:
  # What the records hold, not where the inputs lie: moved input folders still resume.
  digest = hashlib.sha256(json.dumps(
      [(it.id, it.filename, it.label_index, it.label_text) for it in items]).encode())
  return {**dataclasses.asdict(opts), 'num_shards': num_shards, 'seed': seed,
          'videos_digest': digest.hexdigest()}


def convert_split(split: str, items: Sequence[VideoItem], output_dir: str, opts: EncodeOptions,
                  num_shards: int, seed: int = 0, workers: int = 1,
                  decode_threads: int = 1, max_shards: Optional[int] = None,
                  overwrite: bool = False, progress_interval: float = 2.0,
                  extra_manifest: Optional[dict] = None) -> Optional[dict]:
  """Converts one split; returns its manifest, or ``None`` if ``max_shards`` stopped it early.

  Finished shards (file and bookkeeping present, same settings) are kept; others are (re)written.
  ``decode_threads`` are FFmpeg threads per video (1: single-threaded, the default; 0: auto).
  Ctrl-C raises ``Interrupted`` once the workers are stopped and temporaries removed.
  """
  output = storage.path(output_dir)
  state_dir = output / STATE_DIR
  state_dir.mkdir(parents=True, exist_ok=True)
  settings = _settings(opts, num_shards, seed, items)
  settings_path = state_dir / f'{split}-settings.json'
  names = [shard_name(split, i, num_shards) for i in range(num_shards)]
  pattern = re.compile(re.escape(split) + r'-\d{5}-of-\d{5}\.tfrecord(\.tmp)?')
  existing = sorted(p.name for p in output.iterdir() if pattern.fullmatch(p.name))
  manifest_path = output / f'{split}-manifest.json'
  keep = set()  # shards of an earlier run with the same settings
  if settings_path.exists():
    old = storage.read_json(settings_path)
    if old == settings:
      keep = set(names)
    elif not overwrite:
      changed = sorted(k for k in settings if old.get(k) != settings[k])
      raise SystemExit(f'{output_dir} holds {split} shards written with other settings '
                       f'({", ".join(changed)}); pass --overwrite to replace them.')
  elif any(n.endswith('.tfrecord') for n in existing) and not overwrite:
    raise SystemExit(f'{output_dir} holds {split} shards of an unknown run; pass --overwrite.')
  if not keep and manifest_path.exists():
    manifest_path.unlink()
  for n in existing:  # stale temporaries, and shards of other settings
    if n not in keep:
      (output / n).unlink()
  if not keep:
    for p in state_dir.iterdir():
      if pattern.fullmatch(p.name.removesuffix('.json')):
        p.unlink()
  _write_json(settings_path, settings)

  shards = assign_shards(items, num_shards, seed)
  paths = [output / n for n in names]
  states = [state_dir / (n + '.json') for n in names]

  def written(i):  # a shard counts once its file and its bookkeeping file are both there
    return paths[i].exists() and states[i].exists()
  todo = [i for i in range(num_shards) if not written(i)]
  if len(todo) < num_shards:
    print(f'[{split}] resuming: {num_shards - len(todo)} of {num_shards} shards already written')
  done = set(range(num_shards)) - set(todo)
  stopped = max_shards is not None and len(todo) > max_shards
  if stopped:
    todo = todo[:max_shards]
  progress = Progress(split, len(items), sum(len(shards[i]) for i in done), progress_interval)
  try:
    if workers <= 1:
      for i in todo:
        write_shard(paths[i], states[i], shards[i], opts, decode_threads, progress.update)
    elif todo:
      _write_shards_in_pool([(paths[i], states[i], shards[i]) for i in todo], opts, workers,
                            decode_threads, progress)
  except KeyboardInterrupt:
    with _sigint_ignored():  # a second Ctrl-C does not cut the clean-up short
      for i in todo:  # what terminated workers left (an interrupted write here removes its own)
        for name in (paths[i], states[i]):
          tmp = name.parent / (name.name + '.tmp')
          if not storage.is_url(tmp) and tmp.exists():
            tmp.unlink()
      finished = sum(written(i) for i in range(num_shards))
    raise Interrupted(split, finished, num_shards) from None
  progress.print(final=True)
  if stopped:
    print(f'[{split}] stopped after {max_shards} new shards (--max-shards); run again to continue.')
    return None

  manifest = {'split': split, 'videos_listed': len(items), 'videos_written': 0, 'frames': 0,
              'videos_skipped': 0, 'skipped_by_reason': {}, 'skipped': [], 'shards': []}
  for state in states:
    stats = storage.read_json(state)
    manifest['videos_written'] += stats['videos']
    manifest['frames'] += stats['frames']
    manifest['skipped'].extend(stats['skipped'])
    manifest['shards'].append({k: stats[k] for k in ('file', 'videos', 'frames')})
  manifest['skipped'].sort(key=lambda s: s['video'])
  manifest['videos_skipped'] = len(manifest['skipped'])
  for s in manifest['skipped']:
    by_reason = manifest['skipped_by_reason']
    by_reason[s['reason']] = by_reason.get(s['reason'], 0) + 1
  manifest['skipped_by_reason'] = dict(sorted(manifest['skipped_by_reason'].items()))
  manifest['settings'] = settings
  manifest.update(extra_manifest or {})
  manifest['schema'] = {k: list(v) for k, v in SCHEMA.items()}
  _write_json(manifest_path, manifest)
  print(f'[{split}] wrote {manifest["videos_written"]} videos, {manifest["frames"]} frames in '
        f'{num_shards} shards; skipped {manifest["videos_skipped"]} '
        f'{manifest["skipped_by_reason"] or ""} -> {manifest_path}')
  return manifest


def _write_shards_in_pool(tasks, opts: EncodeOptions, workers: int, decode_threads: int,
                          progress: Progress) -> None:
  """Writes ``(path, state_path, items)`` shards in spawned worker processes. On an exception
  here (Ctrl-C) the pending shards are cancelled and the workers terminated before it goes on."""
  ctx = multiprocessing.get_context('spawn')
  queue = ctx.Queue()
  pool = concurrent.futures.ProcessPoolExecutor(
      min(workers, len(tasks)), mp_context=ctx, initializer=_init_worker,
      initargs=(queue, decode_threads == 1))
  try:
    with _sigint_ignored():  # submit() starts the worker processes
      futures = [pool.submit(_shard_task, path, state, items, opts, decode_threads)
                 for path, state, items in tasks]
    pending = set(futures)
    while pending:
      _drain(queue, progress, timeout=0.2)
      pending = {f for f in pending if not f.done()}
    for f in futures:
      f.result()  # re-raises a worker's exception
    _drain(queue, progress, timeout=0.5)
  except BaseException:
    with _sigint_ignored():
      _terminate(pool)
    raise
  pool.shutdown()


def _terminate(pool: concurrent.futures.ProcessPoolExecutor) -> None:
  """Cancels the pool's pending tasks and terminates its workers (their shards in progress are
  left as ``.tmp`` files on disk, or no object in a bucket)."""
  manager = getattr(pool, '_executor_manager_thread', None)
  if hasattr(pool, 'terminate_workers'):  # Python >= 3.14
    pool.terminate_workers()
  else:
    processes = list((getattr(pool, '_processes', None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
      process.terminate()
    for process in processes:
      process.join(10)
  # The pool's manager thread closes its wake-up pipe as it ends; interpreter exit writes to that
  # pipe, and a race between the two prints an OSError traceback. Waiting for the thread ends it.
  if manager is not None:
    manager.join(10)


def _drain(queue, progress: Progress, timeout: float) -> None:
  import queue as queue_lib  # pylint: disable=import-outside-toplevel
  try:
    item = queue.get(timeout=timeout)
    while True:
      progress.update(*item)
      item = queue.get_nowait()
  except queue_lib.Empty:
    pass


def write_label_map(output_dir: str, classes: Sequence[str], overwrite: bool = False) -> str:
  """``label_map.json``: class name -> index. A different existing map is an error."""
  path = storage.path(output_dir) / 'label_map.json'
  label_map = {name: i for i, name in enumerate(classes)}
  if path.exists() and not overwrite and storage.read_json(path) != label_map:
    raise SystemExit(f'{path} holds another label map; pass --overwrite or use another output.')
  _write_json(path, label_map)
  return str(path)


# ---------------------------------------------------------------------------------------------
# The output folder's lock.


@contextlib.contextmanager
def output_lock(output_dir: str, stream=None):
  """Holds ``{output_dir}/.convert/lock`` while the block runs (see ``dtf_jax.lockfile``);
  raises ``LockHeld`` naming the holder if another live converter has it. Yields its path."""
  with lockfile.hold(storage.path(output_dir) / STATE_DIR / LOCK_NAME, 'converter',
                     stream) as lock:
    yield lock


# ---------------------------------------------------------------------------------------------
# Command line.


def _split_arg(value: str) -> Tuple[str, str]:
  name, sep, path = value.partition('=')
  if not sep or not name or not path:
    raise argparse.ArgumentTypeError(f'expected NAME=PATH, got {value!r}')
  return name, path


def parse_args(argv):
  common = argparse.ArgumentParser(add_help=False)
  g = common.add_argument_group('output and encoding (all formats)')
  g.add_argument('--output', required=True, help='output directory (created).')
  g.add_argument('--short-side', type=int, default=320,
                 help='resize frames so that the short side is this many pixels (aspect kept, '
                      'bilinear); 0 keeps the size. Default 320.')
  g.add_argument('--fps', type=float, default=None,
                 help='resample to this frame rate (frames dropped/repeated by timestamp); '
                      'default: keep every decoded frame.')
  g.add_argument('--jpeg-quality', type=int, default=90, help='JPEG quality 1-100 (default 90).')
  g.add_argument('--min-frames', type=int, default=1,
                 help='skip videos with fewer stored frames than this (default 1).')
  shards = g.add_mutually_exclusive_group()
  shards.add_argument('--num-shards', type=int, default=None,
                      help='shards per split (default: ceil(videos / --videos-per-shard)).')
  shards.add_argument('--videos-per-shard', type=int, default=32,
                      help='videos per shard without --num-shards (default 32).')
  g.add_argument('--seed', type=int, default=0,
                 help='seed of the (deterministic) shard assignment.')
  g.add_argument('--workers', type=int, default=1,
                 help='worker processes; each writes whole shards (default 1).')
  g.add_argument('--decode-threads', type=int, default=1,
                 help='FFmpeg decoder threads per video (0: auto; default 1: parallelism comes '
                      'from --workers). Damaged files may get another skip reason with threads.')
  g.add_argument('--splits', default=None,
                 help='comma-separated splits to convert (default: all the input defines).')
  g.add_argument('--max-shards', type=int, default=None,
                 help='write at most this many new shards per split, then stop (run again with '
                      'the same arguments to continue).')
  g.add_argument('--overwrite', action='store_true',
                 help='replace shards written with other settings or another label map.')
  g.add_argument('--progress-interval', type=float, default=2.0,
                 help='seconds between progress lines (default 2).')

  parser = argparse.ArgumentParser(prog='python -m dtf_jax.data.convert',
                                   description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n', 1)[1])
  sub = parser.add_subparsers(dest='format', required=True, metavar='FORMAT')
  fmt = argparse.RawDescriptionHelpFormatter
  exits = ('exit codes: 0 done, 1 failure (one line on stderr), 2 bad arguments, 3 stopped by '
           '--max-shards,\n130 interrupted (Ctrl-C: finished shards stay; the same command '
           'resumes).')
  p = sub.add_parser('kinetics', parents=[common], formatter_class=fmt, epilog=exits,
                     help='Kinetics CSVs + video folder.')
  p.add_argument('--csv', action='append', required=True,
                 help='annotation CSV label,youtube_id,time_start,time_end,split (repeatable).')
  p.add_argument('--videos', required=True,
                 help='folder holding {youtube_id}_{start:06d}_{end:06d}.mp4 (any depth).')
  p.add_argument('--class-names', default=None,
                 help='class list (one per line; index = line) instead of the sorted CSV labels.')
  p = sub.add_parser('ssv2', parents=[common], formatter_class=fmt, epilog=exits,
                     help='Something-Something V2 json + webm videos.')
  p.add_argument('--annotations', required=True,
                 help='folder with labels.json, train.json, validation.json [, test.json].')
  p.add_argument('--videos', required=True, help='folder holding {id}.webm.')
  p = sub.add_parser('ssv1', parents=[common], formatter_class=fmt, epilog=exits,
                     help='Something-Something V1 CSVs + JPEG frame folders.')
  p.add_argument('--labels', required=True, help='category list, one name per line.')
  p.add_argument('--split', action='append', type=_split_arg, required=True, metavar='NAME=CSV',
                 help='split name and its id;label CSV (repeatable).')
  p.add_argument('--videos', required=True, help='folder holding one frame folder {id}/ per video.')
  p.add_argument('--folder-fps', type=float, default=FOLDER_FPS,
                 help='frame rate of the frame folders (default 12).')
  p = sub.add_parser('list', parents=[common], formatter_class=fmt, epilog=exits,
                     help='generic "relative/path label_index" lists.')
  p.add_argument('--split', action='append', type=_split_arg, required=True, metavar='NAME=FILE',
                 help='split name and its list file (repeatable).')
  p.add_argument('--root', required=True, help='folder the listed paths are relative to.')
  p.add_argument('--class-names', default=None, help='class names, one per line (index = line).')
  p.add_argument('--folder-fps', type=float, default=FOLDER_FPS,
                 help='frame rate of listed frame folders (default 12).')
  args = parser.parse_args(argv)
  for flag, ok, rule in (
      ('--jpeg-quality', 1 <= args.jpeg_quality <= 100, 'in 1..100'),
      ('--short-side', args.short_side >= 0, '>= 0 (0 keeps the size)'),
      ('--min-frames', args.min_frames >= 0, '>= 0'),
      ('--num-shards', args.num_shards is None or args.num_shards >= 1, '>= 1'),
      ('--videos-per-shard', args.videos_per_shard >= 1, '>= 1'),
      ('--workers', args.workers >= 1, '>= 1'),
      ('--decode-threads', args.decode_threads >= 0, '>= 0 (0: automatic)'),
      ('--max-shards', args.max_shards is None or args.max_shards >= 1, '>= 1'),
      ('--fps', _positive(args.fps), 'a number > 0'),
      ('--folder-fps', _positive(getattr(args, 'folder_fps', None)), 'a number > 0'),
      ('--progress-interval', args.progress_interval >= 0, '>= 0')):
    if not ok:
      parser.error(f'{flag} must be {rule}, got {getattr(args, flag[2:].replace("-", "_"))}')
  seen = set()
  for name, _ in getattr(args, 'split', None) or ():
    if name in seen:
      parser.error(f'--split {name} is given more than once')
    seen.add(name)
  wanted = args.splits.split(',') if args.splits else []
  if len(set(wanted)) != len(wanted) or '' in wanted:
    parser.error(f'--splits {args.splits}: empty or repeated split names')
  return args


def _positive(x: Optional[float]) -> bool:
  return x is None or (math.isfinite(x) and x > 0)


def _check_inputs(args) -> None:
  """Raises ``ConvertError`` naming the flag of a missing input file or folder."""
  files, folders = [], []
  if args.format == 'kinetics':
    files += [('--csv', p) for p in args.csv]
    folders.append(('--videos', args.videos))
  elif args.format == 'ssv2':
    folders += [('--annotations', args.annotations), ('--videos', args.videos)]
    files.append(('--annotations', str(storage.path(args.annotations) / 'labels.json')))
  elif args.format == 'ssv1':
    files.append(('--labels', args.labels))
    folders.append(('--videos', args.videos))
  else:
    folders.append(('--root', args.root))
  files += [(f'--split {name}=', p) for name, p in getattr(args, 'split', None) or ()]
  if getattr(args, 'class_names', None):
    files.append(('--class-names', args.class_names))
  for flag, location in folders:
    p = storage.path(location)
    if not p.is_dir():
      what = 'is not a folder' if p.exists() else 'no such folder'
      raise ConvertError(f'{flag} {location}: {what}')
  for flag, location in files:
    p = storage.path(location)
    if not p.exists() or p.is_dir():
      what = 'is a folder, not a file' if p.exists() else 'no such file'
      raise ConvertError(f'{flag}{"" if flag.endswith("=") else " "}{location}: {what}')


def read_dataset(args):
  """The parsed command line -> ``(classes, {split: items})``."""
  if args.format == 'kinetics':
    names = _read_names(args.class_names) if args.class_names else None
    return read_kinetics(args.csv, args.videos, names)
  if args.format == 'ssv2':
    splits = args.splits.split(',') if args.splits else None
    return read_ssv2(args.annotations, args.videos, splits)
  if args.format == 'ssv1':
    return read_ssv1(args.labels, dict(args.split), args.videos)
  return read_list(dict(args.split), args.root, args.class_names)


def main(argv=None) -> int:
  """The command line; returns the exit code (see the module docstring), or exits with a one-line
  message (1: failure, 2: bad arguments)."""
  args = parse_args(argv)
  os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
  try:
    return _run(args)
  except KeyboardInterrupt as e:
    with _sigint_ignored():
      if isinstance(e, Interrupted):
        print(f'interrupted: {e.done} of {e.total} {e.split} shards are done and kept; run the '
              'same command again to resume.', file=sys.stderr, flush=True)
      else:
        print('interrupted; run the same command again to resume.', file=sys.stderr, flush=True)
  except (ConvertError, LockHeld) as e:
    sys.exit(f'error: {e}')
  except OSError as e:
    sys.exit(f'error: {e.filename}: {e.strerror}' if e.filename and e.strerror else f'error: {e}')
  return 130


def _run(args) -> int:
  _check_inputs(args)
  classes, splits = read_dataset(args)
  if args.splits:
    wanted = args.splits.split(',')
    missing = [s for s in wanted if s not in splits]
    if missing:
      raise ConvertError(f'--splits {",".join(missing)}: not in the input (has '
                         f'{", ".join(sorted(splits)) or "no split"})')
    splits = {s: splits[s] for s in wanted}
  if not splits:
    raise ConvertError('the input defines no split')
  output = storage.path(args.output)
  if output.exists() and not output.is_dir():
    raise ConvertError(f'--output {args.output} is a file, not a folder')
  with contextlib.ExitStack() as stack:
    try:
      output.mkdir(parents=True, exist_ok=True)
      stack.enter_context(output_lock(args.output))
    except OSError as e:
      raise ConvertError(f'--output {args.output}: cannot write there ({e.strerror or e})') from e
    return _convert(args, classes, splits)


def _convert(args, classes, splits) -> int:
  print(f'{args.format}: {len(classes)} classes; '
        + ', '.join(f'{s}: {len(v)} videos' for s, v in splits.items()))
  write_label_map(args.output, classes, args.overwrite)
  opts = EncodeOptions(short_side=args.short_side, fps=args.fps, jpeg_quality=args.jpeg_quality,
                       min_frames=args.min_frames,
                       folder_fps=getattr(args, 'folder_fps', FOLDER_FPS))
  complete, empty = True, []
  for split, items in splits.items():
    num_shards = args.num_shards or max(1, math.ceil(len(items) / args.videos_per_shard))
    manifest = convert_split(
        split, items, args.output, opts, num_shards, seed=args.seed, workers=args.workers,
        decode_threads=args.decode_threads, max_shards=args.max_shards, overwrite=args.overwrite,
        progress_interval=args.progress_interval,
        extra_manifest={'format': args.format, 'num_classes': len(classes)})
    complete &= manifest is not None
    if manifest is not None and manifest['videos_written'] == 0:
      reasons = ', '.join(f'{k} {v}' for k, v in manifest['skipped_by_reason'].items())
      path = storage.path(args.output) / f'{split}-manifest.json'
      empty.append(f'split {split} wrote 0 videos ('
                   + (f'{len(items)} listed, skipped: {reasons}' if items else 'none listed')
                   + f'; see {path})')
  if empty:
    raise ConvertError('; '.join(empty))
  return 0 if complete else 3


if __name__ == '__main__':
  from dtf_jax.data.convert import main as _main  # spawned workers import the same module
  exit_code = _main()
  if exit_code == 130:  # stopped by Ctrl-C, and all is tidied: another one changes nothing
    signal.signal(signal.SIGINT, signal.SIG_IGN)
  sys.exit(exit_code)

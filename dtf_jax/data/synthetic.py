"""Synthetic temporal datasets: classes that no single frame (or short window) can tell apart.

    python -m dtf_jax.data.synthetic --output DIR [--task motion --num-train 800 --num-val 200 \\
        --frames 16 (32 for long_range) --size 64 --seed 0 --workers 2]

Task ``motion`` (the default). Each clip shows one bright main object (box, ellipse or triangle)
over a static random texture, with a second, darker distractor disk moving in a random direction,
a small per-frame brightness flicker and Gaussian pixel noise. Classes are 4 kinds x 2 temporal
directions:

  0 moving_left          1 moving_right               (horizontal translation)
  2 moving_up            3 moving_down                (vertical translation)
  4 growing              5 shrinking                  (scale x2-2.8)
  6 rotating_clockwise   7 rotating_counterclockwise  (135-225 degrees over the clip)

The second class of a pair is the first class's clip played backwards: ``render_clip(2k + 1, rng)``
is exactly ``render_clip(2k, rng)[::-1]`` for the same generator state, so the two classes of a pair
have the same distribution of frame multisets. Any single frame, or any order-free statistic of a
clip (mean frame, sorted frames), carries no information about the direction; only the temporal
order does. Before noise, the main object is always brighter (every channel >= 195) than the texture
(<= 150) and the distractor (<= 160).

Task ``long_range`` (``render_long_range_clip``; 32 frames by default, any ``frames >= 8``). The
class is set by the two ends of the clip only: no window of up to ``T - 2 * (T // 4) + 1`` frames
(9 of 16, 17 of 32, 33 of 64) carries any information about it. A clip shows two flashes of one
large disk (radius 25-30% of the frame, at a random place shared by both flashes) in one of 3
saturated colours (red, green, blue: the cycle r -> g -> b -> r). Each flash lasts
``d = flash_duration(T) = max(1, T // 8)`` frames (2 of 16, 4 of 32); one lies in the first
quarter of the clip (frames ``< T // 4``), the other in the last quarter (frames
``>= T - T // 4``), at random times. The first flash's colour is uniform; the second is the next
colour in the cycle (class 0, ``colour_steps_forward``) or the previous one (class 1,
``colour_steps_backward``). As for ``motion``, ``render_long_range_clip(1, rng)`` is exactly
``render_long_range_clip(0, rng)[::-1]``.

Why nothing shorter than the clip decides the class (``long_range_events`` gives the flashes of a
clip): each flash alone has a uniform colour whatever the class (the first colour is uniform, the
second a fixed step from it), and the flashes' times and place, the texture and the distractor do
not depend on the class; so a window that sees at most one flash, which every window of up to
``T - 2 * (T // 4) + 1`` frames does, has the same distribution of contents for both classes.
Knowing where a window lies in the clip does not help either (a flash of the first quarter is as
likely red, green or blue in both classes), so a module with a short temporal reach cannot use
the clip's ends as a clock. No frame-order-free statistic helps: the distractor carries no time
(below), so the multiset of frames has the same distribution for both classes (one flash of each
colour of a pair ``{c, c + 1}``, whichever comes first). A C2D model (per-frame features averaged
over time, linear head) is therefore at chance; it takes a relation between the first and the last
quarter. The distractor is a darker disk (every channel <= 160) at a new random place in every
frame (so that no frame tells its time); behind everything is the static texture (<= 150), plus a
per-frame flicker and pixel noise. Before noise, inside a flash its colour's channel exceeds both
others by >= 170; in the texture and the distractor every channel exceeds the others by < 130.

Output in ``--output``:
  videos/{train,validation}/NNNNNN.mp4  H.264 (libx264, yuv420p, CRF 18; mpeg4 if libx264 is absent)
  train.txt, val.txt                    ``relative/path label_index`` (paths relative to videos/)
  classes.txt                           class names of the task, one per line (index = line)
  tfrecords/                            converter output (``dtf_jax.data.convert``): splits
                                        ``train`` and ``validation``, frames at the rendered size.
  synthetic.json                        what is generated (the task, its ``VERSIONS`` entry,
                                        the arguments and ``complete``): a run with the same
                                        arguments finds the dataset up to date and does nothing,
                                        or resumes one that was stopped; other arguments or
                                        another version need ``--overwrite``, which replaces it.
Clip ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split_code, i])`` (train 0,
validation 1) with label ``i % num_classes`` (balanced), so every file is determined by ``--task``,
``--seed`` and the task's version alone.
"""

import argparse
import math
import multiprocessing
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from dtf_jax import storage
from dtf_jax.data.video import video_codec, write_mp4

CLASSES = ('moving_left', 'moving_right', 'moving_up', 'moving_down', 'growing', 'shrinking',
           'rotating_clockwise', 'rotating_counterclockwise')
KINDS = ('horizontal', 'vertical', 'scale', 'rotation')
SHAPES = ('box', 'ellipse', 'triangle')
SPLITS = (('train', 0, 'train.txt'), ('validation', 1, 'val.txt'))  # (name, seed code, list file)
NOISE_STD = 4.0     # Gaussian pixel noise (uint8 units)
FLICKER_STD = 3.0   # per-frame global brightness offset
SPEC_FILE = 'synthetic.json'

TASKS = ('motion', 'long_range')
# Of each task's rendering: bump when its clips change. motion 2: larger, faster rotations, which
# the quickstart learns reliably; long_range 3: one flash pair of a large disk, 2 classes (version
# 2 had two pairs of small flashes, 4 classes, which no module learnt at CPU scale).
VERSIONS = {'motion': 2, 'long_range': 3}
DEFAULT_FRAMES = {'motion': 16, 'long_range': 32}
LONG_RANGE_CLASSES = ('colour_steps_forward', 'colour_steps_backward')
FLASH_COLORS = ('red', 'green', 'blue')  # the cycle: forward is +1 (mod 3)
FLASH_RGB = np.array([[235, 35, 35], [30, 225, 30], [40, 60, 255]], np.float32)
LONG_RANGE_MIN_FRAMES = 8


def _shape_sdf(shape: str, u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
  """Approximate signed distance (pixels, < 0 inside) to a shape with half axes ``a`` x ``b``.

  ``u``, ``v``: coordinates in the shape's frame (``T H W``); ``a``, ``b``: scalars or ``T 1 1``.
  """
  if shape == 'box':
    return np.maximum(np.abs(u) - a, np.abs(v) - b)
  if shape == 'ellipse':
    return (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * np.minimum(a, b)
  # Isosceles triangle, apex at (a, 0), base from (-a, -b) to (-a, b).
  n = np.hypot(2 * a, b)
  edge = (b * u + 2 * a * np.abs(v) - a * b) / n  # the two slanted sides (mirror symmetric)
  return np.maximum(edge, -a - u)


def _draw(canvas: np.ndarray, alpha: np.ndarray, color: np.ndarray) -> None:
  """Blends ``color`` (3,) into ``canvas`` (T H W 3 float) with coverage ``alpha`` (T H W)."""
  canvas += alpha[..., None] * (color - canvas)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """Static texture ``float H W 3`` in [20, 150]: upsampled coarse noise plus a colour grating."""
  coarse = rng.uniform(40.0, 130.0, (6, 6, 3))
  pos = (np.arange(size) + 0.5) * (5.0 / size)
  i0 = np.clip(np.floor(pos).astype(int), 0, 4)
  w = (pos - i0)[:, None]
  rows = coarse[i0] * (1 - w[..., None]) + coarse[i0 + 1] * w[..., None]        # size 6 3
  tex = rows[:, i0] * (1 - w[None, :, :]) + rows[:, i0 + 1] * w[None, :, :]     # size size 3
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  theta, freq = rng.uniform(0, np.pi), rng.uniform(2.0, 6.0) / size
  phase = rng.uniform(0, 2 * np.pi)
  grating = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
  return tex + grating[..., None] * rng.uniform(5.0, 20.0, 3)


def _col(x) -> np.ndarray:
  """``(T,)`` -> ``float32 T 1 1`` (per-frame values broadcast over the image)."""
  return np.asarray(x, np.float32).reshape(-1, 1, 1)


def render_clip(label: int, rng: np.random.Generator, frames: int = 16,
                size: int = 64) -> np.ndarray:
  """One clip of class ``label`` -> ``uint8 T H W 3`` (T = ``frames``, H = W = ``size``).

  The draws from ``rng`` depend on the kind (``label // 2``) only; the odd class of a pair is the
  even class's clip reversed in time.
  """
  if not 0 <= label < len(CLASSES):
    raise ValueError(f'label {label} not in 0..{len(CLASSES) - 1}')
  kind, backwards = KINDS[label // 2], label % 2 == 1
  s, t = float(size), np.linspace(0.0, 1.0, frames)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
  background = _background(rng, size)

  # Main object (forward direction: left, up, growing, clockwise).
  shape = SHAPES[rng.integers(len(SHAPES))]
  # Rotating objects are larger and more elongated, so that their orientation stays visible
  # at low resolution (the quickstart trains at 32x32).
  aspect = rng.uniform(2.5, 3.5) if kind == 'rotation' else rng.uniform(1.0, 2.5)
  color = 255.0 - rng.uniform(0.0, 60.0, 3)  # bright, slightly tinted: every channel >= 195
  radius_range = (0.16, 0.20) if kind == 'rotation' else (0.10, 0.16)
  radius = np.full(frames, rng.uniform(*radius_range) * s)
  angle = np.full(frames, rng.uniform(0, 2 * np.pi))
  cx = np.full(frames, rng.uniform(0.3, 0.7) * s)
  cy = np.full(frames, rng.uniform(0.3, 0.7) * s)
  drift = rng.uniform(-0.05, 0.05, (2, 1)) * s * (t - 0.5)[None]  # small nuisance drift
  if kind in ('horizontal', 'vertical'):
    travel = rng.uniform(0.3, 0.5) * s
    mid = rng.uniform(0.4, 0.6) * s
    path = mid + travel * (0.5 - t)  # decreasing: left / up
    if kind == 'horizontal':
      cx, cy = path, cy + drift[1]
    else:
      cx, cy = cx + drift[0], path
  else:
    cx, cy = cx + drift[0], cy + drift[1]
    if kind == 'scale':
      r0 = rng.uniform(0.05, 0.08) * s
      radius = r0 * rng.uniform(2.0, 2.8) ** t
    else:
      # y points down: an increasing angle turns clockwise.
      angle = angle[0] + rng.uniform(0.75, 1.25) * np.pi * t

  # Distractor: a darker disk on a straight random path (independent of the class).
  d_radius = np.float32(rng.uniform(0.04, 0.07) * s)
  d_color = rng.uniform(90.0, 160.0, 3)
  d_start = rng.uniform(0.1, 0.9, 2) * s
  d_dir = rng.uniform(0, 2 * np.pi)
  d_path = d_start[:, None] + rng.uniform(0.3, 0.8) * s * np.array(
      [[np.cos(d_dir)], [np.sin(d_dir)]]) * t[None]

  flicker = rng.normal(0.0, FLICKER_STD, (frames, 1, 1, 1)).astype(np.float32)
  noise = rng.standard_normal((frames, size, size, 3), dtype=np.float32) * NOISE_STD
  canvas = np.broadcast_to(background.astype(np.float32), (frames, size, size, 3)).copy()
  dist = np.hypot(xx - _col(d_path[0]), yy - _col(d_path[1])) - d_radius
  _draw(canvas, np.clip(0.5 - dist, 0.0, 1.0), d_color.astype(np.float32))
  c, sn = _col(np.cos(angle)), _col(np.sin(angle))
  u = (xx - _col(cx)) * c + (yy - _col(cy)) * sn
  v = -(xx - _col(cx)) * sn + (yy - _col(cy)) * c
  a, b = _col(radius * math.sqrt(aspect)), _col(radius / math.sqrt(aspect))
  _draw(canvas, np.clip(0.5 - _shape_sdf(shape, u, v, a, b), 0.0, 1.0), color.astype(np.float32))
  out = np.clip(np.rint(canvas + flicker + noise), 0, 255).astype(np.uint8)
  return np.ascontiguousarray(out[::-1]) if backwards else out


def flash_duration(frames: int) -> int:
  """Frames a long-range flash lasts: ``max(1, frames // 8)`` (2 of 16, 4 of 32, 8 of 64)."""
  return max(1, frames // 8)


def long_range_window(frames: int) -> int:
  """The longest window (frames) that sees at most one of a long-range clip's two flashes.

  ``frames - 2 * (frames // 4) + 1``: a window holding both flashes reaches from the first quarter
  (frames ``< frames // 4``) into the last (``>= frames - frames // 4``).
  """
  return frames - 2 * (frames // 4) + 1


def long_range_events(label: int, rng: np.random.Generator, frames: int = 32) -> np.ndarray:
  """The flashes of a long-range clip of class ``label``: ``int 2 2`` rows (start, colour).

  Rows in time order: the flash of the first quarter, then that of the last; ``colour`` indexes
  ``FLASH_COLORS``; each flash lasts ``flash_duration(frames)`` frames from ``start``. The second
  colour is one step forward (``label`` 0) or backward (1) in the cycle from the first. The draws
  from ``rng`` do not depend on ``label``, and class 1's events are class 0's reversed in time.
  """
  if not 0 <= label < len(LONG_RANGE_CLASSES):
    raise ValueError(f'label {label} not in 0..{len(LONG_RANGE_CLASSES) - 1}')
  if frames < LONG_RANGE_MIN_FRAMES:
    raise ValueError(f'long_range needs frames >= {LONG_RANGE_MIN_FRAMES}, got {frames}')
  duration, quarter = flash_duration(frames), frames // 4
  first = int(rng.integers(len(FLASH_COLORS)))
  starts = rng.integers(quarter - duration + 1, size=2)  # offsets from the clip's two ends
  events = np.array([(starts[0], first),
                     (frames - duration - starts[1], (first + 1) % len(FLASH_COLORS))], np.int64)
  if label == 1:  # the clip reversed: the flashes swap places and their order
    events = np.stack([frames - duration - events[::-1, 0], events[::-1, 1]], axis=1)
  return events


def render_long_range_clip(label: int, rng: np.random.Generator, frames: int = 32,
                           size: int = 64) -> np.ndarray:
  """One long-range clip of class ``label`` -> ``uint8 T H W 3`` (T = ``frames``, H = W = ``size``).

  The flashes are ``long_range_events(label, rng, frames)`` (drawn first); the draws from ``rng``
  do not depend on ``label``, and class 1's clip is class 0's reversed in time.
  """
  if not 0 <= label < len(LONG_RANGE_CLASSES):
    raise ValueError(f'label {label} not in 0..{len(LONG_RANGE_CLASSES) - 1}')
  events = long_range_events(0, rng, frames)  # class 1: the clip reversed, at the end
  duration, s = flash_duration(frames), float(size)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
  canvas = np.broadcast_to(_background(rng, size).astype(np.float32),
                           (frames, size, size, 3)).copy()

  # Distractor: a darker disk at a new random place in every frame (no frame tells its time).
  d_radius = np.float32(rng.uniform(0.06, 0.10) * s)
  d_color = rng.uniform(90.0, 160.0, 3).astype(np.float32)
  d_pos = rng.uniform(0.1, 0.9, (2, frames)) * s
  dist = np.hypot(xx - _col(d_pos[0]), yy - _col(d_pos[1])) - d_radius
  _draw(canvas, np.clip(0.5 - dist, 0.0, 1.0), d_color)

  # Both flashes: one large disk at one place.
  cx, cy = rng.uniform(0.3, 0.7, 2) * s
  radius = rng.uniform(0.25, 0.30) * s
  alpha = np.clip(0.5 - (np.hypot(xx - cx, yy - cy) - radius), 0.0, 1.0)
  for start, colour in events:
    rgb = np.minimum(FLASH_RGB[colour] + rng.uniform(-10.0, 10.0, 3), 255.0).astype(np.float32)
    _draw(canvas[start:start + duration], np.broadcast_to(alpha, (duration, size, size)), rgb)

  flicker = rng.normal(0.0, FLICKER_STD, (frames, 1, 1, 1)).astype(np.float32)
  noise = rng.standard_normal((frames, size, size, 3), dtype=np.float32) * NOISE_STD
  out = np.clip(np.rint(canvas + flicker + noise), 0, 255).astype(np.uint8)
  return np.ascontiguousarray(out[::-1]) if label == 1 else out


def task_classes(task: str) -> tuple:
  """The class names of ``task`` (one of ``TASKS``)."""
  _check_task(task)
  return CLASSES if task == 'motion' else LONG_RANGE_CLASSES


def render(task: str, label: int, rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
  """One clip of ``task`` -> ``uint8 T H W 3``: ``render_clip`` or ``render_long_range_clip``."""
  _check_task(task)
  renderer = render_clip if task == 'motion' else render_long_range_clip
  return renderer(label, rng, frames, size)


def _check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f'task {task!r} is not one of {TASKS}')


def clip_rng(seed: int, split_code: int, index: int) -> np.random.Generator:
  """The generator of clip ``index`` of a split (``split_code`` 0: train, 1: validation)."""
  return np.random.default_rng([seed, split_code, index])


def _write_clips(job):
  """Worker: renders and writes clips ``[(path, label, split_code, index)]``; returns a count."""
  clips, task, seed, frames, size, fps, codec = job
  for path, label, code, index in clips:
    write_mp4(path, render(task, label, clip_rng(seed, code, index), frames, size), fps, codec)
  return len(clips)


def _write_lines(path: str, lines: Sequence[str]) -> None:
  storage.write_text(path, ''.join(line + '\n' for line in lines))


def generate(output_dir: str, num_train: int = 800, num_val: int = 200,
             frames: Optional[int] = None, size: int = 64, seed: int = 0, workers: int = 2,
             fps: int = 12, videos_per_shard: int = 50, jpeg_quality: int = 90,
             convert: bool = True, convert_workers: int = 1, overwrite: bool = False,
             progress_interval: float = 2.0, task: str = 'motion') -> Dict:
  """Writes the videos, lists and (``convert``) TFRecords of ``task``; returns a dict.

  ``frames`` defaults to ``DEFAULT_FRAMES[task]`` (16 for motion, 32 for long_range).

  Keys: ``paths`` (``videos``, ``classes``, ``train.txt``, ``val.txt``, ``tfrecords``),
  ``timing``, ``bytes``, ``codec`` and ``manifests`` (the converter's, per split).

  ``workers`` render/encode processes, ``convert_workers`` converter processes (1: in this
  process). ``timing`` holds seconds for ``videos`` (render + encode), ``convert`` and ``total``;
  ``bytes`` the size on disk of ``videos`` and ``tfrecords``.
  """
  from dtf_jax.data import convert as convert_lib  # pylint: disable=import-outside-toplevel
  classes = task_classes(task)
  frames = DEFAULT_FRAMES[task] if frames is None else frames
  if task == 'long_range' and frames < LONG_RANGE_MIN_FRAMES:
    raise ValueError(f'long_range needs frames >= {LONG_RANGE_MIN_FRAMES}, got {frames}')
  start = time.monotonic()
  root = storage.path(output_dir)
  video_root = str(root / 'videos')
  codec = video_codec()
  paths = {'videos': video_root, 'classes': str(root / 'classes.txt'),
           'tfrecords': str(root / 'tfrecords'),
           **{list_name: str(root / list_name) for _, _, list_name in SPLITS}}
  spec = {'version': VERSIONS[task], 'task': task, 'num_train': num_train, 'num_val': num_val,
          'frames': frames, 'size': size, 'seed': seed, 'fps': fps, 'codec': codec,
          'convert': convert, 'videos_per_shard': videos_per_shard, 'jpeg_quality': jpeg_quality}
  if _up_to_date(root, spec, overwrite):  # else the record says: under way
    print(f'synthetic: {output_dir} is up to date ({task}, version {VERSIONS[task]}, seed {seed}); '
          'nothing to do', flush=True)
    manifests = {split: storage.read_json(root / 'tfrecords' / f'{split}-manifest.json')
                 for split, _, _ in SPLITS} if convert else {}
    return {'paths': paths, 'timing': {'videos': 0.0, 'convert': 0.0, 'total': 0.0},
            'bytes': {'videos': _du(video_root), 'tfrecords': _du(paths['tfrecords'])},
            'codec': codec, 'manifests': manifests}
  root.mkdir(parents=True, exist_ok=True)
  storage.write_json(root / SPEC_FILE, dict(spec, complete=False), sort_keys=True)
  counts = {'train': num_train, 'validation': num_val}
  jobs, total = [], 0
  for split, code, list_name in SPLITS:
    (root / 'videos' / split).mkdir(parents=True, exist_ok=True)
    rels = [(f'{split}/{i:06d}.mp4', i % len(classes), i) for i in range(counts[split])]
    _write_lines(paths[list_name], [f'{r} {label}' for r, label, _ in rels])
    clips = [(str(root / 'videos' / r), label, code, i) for r, label, i in rels]
    chunk = 25
    jobs += [(clips[j:j + chunk], task, seed, frames, size, fps, codec)
              for j in range(0, len(clips), chunk)]
    total += len(clips)
  _write_lines(paths['classes'], classes)

  print(f'synthetic: {task}, {num_train} train + {num_val} validation clips of '
        f'{frames}x{size}x{size}, {codec}, seed {seed} -> {output_dir}', flush=True)
  done, last = 0, time.monotonic()

  def report(n):
    nonlocal done, last
    done += n
    now = time.monotonic()
    if done == total or now - last >= progress_interval:
      last = now
      rate = done / max(now - start, 1e-9)
      print(f'[videos] {done}/{total} clips, {rate:.1f} clips/s, {now - start:.1f}s elapsed',
            flush=True)

  if workers > 1 and len(jobs) > 1:
    # spawn: the parent may hold TensorFlow, which is not fork-safe.
    with multiprocessing.get_context('spawn').Pool(min(workers, len(jobs))) as pool:
      for n in pool.imap_unordered(_write_clips, jobs):
        report(n)
  else:
    for job in jobs:
      report(_write_clips(job))
  t_videos = time.monotonic() - start

  manifests = {}
  if convert:
    classes, splits = convert_lib.read_list(
        {split: paths[name] for split, _, name in SPLITS}, video_root, paths['classes'])
    out = paths['tfrecords']
    storage.path(out).mkdir(parents=True, exist_ok=True)
    opts = convert_lib.EncodeOptions(short_side=0, jpeg_quality=jpeg_quality, min_frames=frames)
    with convert_lib.output_lock(out):  # as the converter's command line holds it
      convert_lib.write_label_map(out, classes)
      for split, items in splits.items():
        num_shards = max(1, math.ceil(len(items) / videos_per_shard))
        manifests[split] = convert_lib.convert_split(
            split, items, out, opts, num_shards, seed=seed, workers=convert_workers,
            progress_interval=progress_interval,
            extra_manifest={'format': 'synthetic', 'num_classes': len(classes)})
  storage.write_json(root / SPEC_FILE, dict(spec, complete=True), sort_keys=True)
  t_total = time.monotonic() - start
  timing = {'videos': t_videos, 'convert': t_total - t_videos, 'total': t_total}
  sizes = {'videos': _du(video_root), 'tfrecords': _du(paths['tfrecords'])}
  print(f'synthetic: videos {t_videos:.1f}s ({_mb(sizes["videos"])}), conversion '
        f'{timing["convert"]:.1f}s ({_mb(sizes["tfrecords"])}), total {t_total:.1f}s', flush=True)
  return {'paths': paths, 'timing': timing, 'bytes': sizes, 'codec': codec,
          'manifests': manifests}


def _up_to_date(root, spec: Dict, overwrite: bool) -> bool:
  """True if ``root`` holds the complete dataset of ``spec``; False if it holds none, or a stopped
  run of ``spec`` (which resumes: the clips are rendered again, the converter keeps its finished
  shards). Files of other arguments or of another version are removed with ``overwrite``, and
  an error naming them without it."""
  record = root / SPEC_FILE
  old = storage.read_json(record) if record.exists() else None
  complete = old.pop('complete', False) if old is not None else False
  if old is not None:
    old.setdefault('task', 'motion')  # records written before the long-range task
  if old == spec:
    if complete:
      return True
    print(f'synthetic: resuming the stopped run in {root}', flush=True)
    return False
  if old is not None:
    found = 'a synthetic dataset of other settings (' + ', '.join(
        f'{k} {old.get(k)} -> {spec[k]}' for k in sorted(spec) if old.get(k) != spec[k]) + ')'
  elif any((root / name).exists() for name in ('videos', 'tfrecords')):
    found = f'files of a synthetic dataset written before {SPEC_FILE} existed'
  else:
    return False
  if not overwrite:
    raise SystemExit(f'{root} holds {found}; pass --overwrite to replace it.')
  print(f'synthetic: replacing {found} in {root}', flush=True)
  if old is not None:
    record.unlink()  # first: a record never describes files that are gone
  for name in ('videos', 'tfrecords'):
    if (root / name).exists():
      (root / name).rmtree()
  return False


def _du(path: str) -> int:
  return sum((root / f).stat().length for root, _, files in storage.walk(path) for f in files)


def _mb(n: int) -> str:
  return f'{n / 2 ** 20:.1f} MiB'


def parse_args(argv: Optional[List[str]] = None):
  parser = argparse.ArgumentParser(prog='python -m dtf_jax.data.synthetic',
                                   description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n', 1)[1])
  parser.add_argument('--output', required=True, help='output directory (created).')
  parser.add_argument('--task', choices=TASKS, default='motion',
                      help='motion (8 classes, default) or long_range (2 classes).')
  parser.add_argument('--num-train', type=int, default=800, help='train clips (default 800).')
  parser.add_argument('--num-val', type=int, default=200, help='validation clips (default 200).')
  parser.add_argument('--frames', type=int, default=None,
                      help='frames per clip (default 16 for motion, 32 for long_range).')
  parser.add_argument('--size', type=int, default=64,
                      help='frame height = width in pixels, a multiple of 4 (default 64).')
  parser.add_argument('--fps', type=int, default=12, help='frame rate of the videos (default 12).')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the clips and of the shard assignment (default 0).')
  parser.add_argument('--workers', type=int, default=2,
                      help='processes rendering and encoding the clips (default 2; 1: in this '
                           'process). ~20 ms per 16x64x64 clip; a spawned worker needs a few '
                           'seconds to start (it imports TensorFlow with the package).')
  parser.add_argument('--convert-workers', type=int, default=1,
                      help='converter processes (default 1: in this process, ~100 clips/s of '
                           '16x64x64 on 2 cores; spawned workers were slower at this size).')
  parser.add_argument('--videos-per-shard', type=int, default=50,
                      help='videos per TFRecord shard (default 50).')
  parser.add_argument('--jpeg-quality', type=int, default=90,
                      help='JPEG quality of the stored frames, 1-100 (default 90).')
  parser.add_argument('--no-convert', action='store_true',
                      help='write only the videos and lists, no TFRecords.')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace a dataset written earlier with other arguments or by another '
                           'version (without it, that is an error; the same arguments again find '
                           'the dataset up to date and do nothing, or resume a stopped run).')
  args = parser.parse_args(argv)
  if args.frames is None:
    args.frames = DEFAULT_FRAMES[args.task]
  min_frames = LONG_RANGE_MIN_FRAMES if args.task == 'long_range' else 2
  if args.num_train < 0 or args.num_val < 0 or args.frames < min_frames or args.workers < 1 \
      or args.convert_workers < 1:
    parser.error(f'--num-train/--num-val must be >= 0, --frames >= {min_frames} (--task '
                 f'{args.task}), workers >= 1')
  if args.size < 16 or args.size % 4:
    parser.error('--size must be a multiple of 4 and >= 16 (yuv420p planes)')
  if not 1 <= args.jpeg_quality <= 100:
    parser.error('--jpeg-quality must be in 1..100')
  return args


def main(argv: Optional[List[str]] = None) -> int:
  args = parse_args(argv)
  os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # this process never runs JAX
  generate(args.output, args.num_train, args.num_val, args.frames, args.size, args.seed,
           args.workers, args.fps, args.videos_per_shard, args.jpeg_quality,
           convert=not args.no_convert, convert_workers=args.convert_workers,
           overwrite=args.overwrite, task=args.task)
  return 0


if __name__ == '__main__':
  from dtf_jax.data.synthetic import main as _main  # spawned workers import the same module
  sys.exit(_main())

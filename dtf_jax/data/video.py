"""Video decoding with PyAV: frames as ``uint8 N H W 3`` RGB, short side resized, optional fps;
and ``write_mp4``, the mp4 writer of the synthetic dataset and of annotated predictions.

``iter_frames`` streams the frames of a video file (or of a folder of JPEG frames) so that a long
video never sits in memory at full size; ``decode_video`` collects them into one array. Any file
that cannot be turned into frames raises ``VideoDecodeError`` whose ``reason`` is one of
``REASONS``; the converter skips such videos and lists them in its manifest.

Rules (the same for every video, so results are reproducible):
  * resize: the short side becomes ``short_side`` (up or down), the long side
    ``round(long * short_side / short)``, with swscale's bilinear filter; ``short_side=None`` or
    ``0`` keeps the size.
  * fps: with ``fps=None`` every decoded frame is kept. Otherwise output frame ``k`` (time
    ``k / fps`` from the first frame) is the last source frame whose timestamp is ``<= k / fps``,
    for every ``k / fps`` before the end of the last source frame (frames are dropped or repeated).
  * truncation: a container that declares ``F`` frames but yields fewer than
    ``TRUNCATED_FRACTION * F`` is a truncated file (an error, not a short video).
"""

import fractions
import io
import os
from typing import Iterator, Optional, Sequence, Tuple

import av
import einops
import numpy as np

from dtf_jax import storage
from dtf_jax.errors import UserError

# Why a video was rejected (``VideoDecodeError.reason``).
REASONS = ('missing', 'empty_file', 'unreadable', 'no_video_stream', 'decode_error', 'truncated',
           'no_frames', 'too_few_frames', 'error')
# A container declaring F frames that decodes to fewer than this fraction of F is truncated.
TRUNCATED_FRACTION = 0.9
FRAME_EXTENSIONS = ('.jpg', '.jpeg', '.png')
FOLDER_FPS = 12.0  # frame rate of a folder of frames (Something-Something V1's)
H264_CRF = 18       # quality of the mp4s that write_mp4 writes with libx264


class VideoDecodeError(UserError):
  """A video that cannot be converted. ``reason`` is one of ``REASONS``, ``detail`` a message."""

  def __init__(self, reason: str, detail: str = ''):
    assert reason in REASONS, reason
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason = reason
    self.detail = detail


def resized_size(height: int, width: int, short_side: Optional[int]) -> Tuple[int, int]:
  """``(H, W)`` after scaling the short side to ``short_side`` (aspect kept, half rounded up)."""
  if not short_side:
    return height, width
  short, long = min(height, width), max(height, width)
  new_long = max(1, (2 * long * short_side + short) // (2 * short))  # round(long * s / short)
  return (short_side, new_long) if height <= width else (new_long, short_side)


def _to_rgb(frame: 'av.VideoFrame', short_side: Optional[int]) -> np.ndarray:
  """One decoded frame -> ``uint8 H W 3`` RGB at the resized size."""
  height, width = resized_size(frame.height, frame.width, short_side)
  return frame.to_ndarray(width=width, height=height, format='rgb24', interpolation='BILINEAR')


def _resample(timed_frames, fps: Optional[float], frame_duration: fractions.Fraction):
  """``(time, item)`` pairs (times in seconds, increasing) -> items at ``fps`` (see module doc)."""
  if fps is None:
    for _, item in timed_frames:
      yield item
    return
  step = fractions.Fraction(fps).limit_denominator(1_000_000)
  k, t0, prev, prev_time = 0, None, None, None
  for time, item in timed_frames:
    if t0 is None:
      t0 = time
    time -= t0
    while prev is not None and k / step < time:
      yield prev
      k += 1
    prev, prev_time = item, time
  if prev is not None:
    end = prev_time + frame_duration
    while k / step < end:
      yield prev
      k += 1


def _video_frames(path: str, short_side: Optional[int], fps: Optional[float], threads: int,
                  info: dict) -> Iterator[np.ndarray]:
  try:
    if storage.path(path).stat().length == 0:
      raise VideoDecodeError('empty_file', '0 bytes')
    source = _readable(path)
  except OSError as e:
    raise VideoDecodeError('missing' if isinstance(e, FileNotFoundError) else 'unreadable',
                           _short(e)) from e
  try:
    container = av.open(source)
  except (av.FFmpegError, OSError, ValueError) as e:
    raise VideoDecodeError('unreadable', _short(e)) from e
  with container:
    if not container.streams.video:
      raise VideoDecodeError('no_video_stream', f'streams: {len(container.streams)}')
    stream = container.streams.video[0]
    if threads != 1:
      stream.thread_type = 'AUTO'
      stream.thread_count = threads
    rate = stream.average_rate or stream.guessed_rate or fractions.Fraction(25)
    info['source_fps'] = float(rate)
    info['fps'] = float(rate) if fps is None else float(fps)
    declared = stream.frames
    count = [0]

    def timed():
      try:
        for frame in container.decode(stream):
          if frame.pts is not None and frame.time_base is not None:
            time = fractions.Fraction(frame.pts) * frame.time_base
          else:
            time = fractions.Fraction(count[0]) / rate
          count[0] += 1
          yield time, frame
      except (av.FFmpegError, OSError, ValueError, MemoryError) as e:
        raise VideoDecodeError('decode_error', f'after {count[0]} frames: {_short(e)}') from e

    last = None
    for frame in _resample(timed(), fps, 1 / fractions.Fraction(rate)):
      if frame is not last:
        last, rgb = frame, _to_rgb(frame, short_side)
      yield rgb
    if count[0] == 0:
      raise VideoDecodeError('no_frames', 'the video stream holds no decodable frame')
    if declared and count[0] < TRUNCATED_FRACTION * declared:
      raise VideoDecodeError('truncated', f'decoded {count[0]} of {declared} declared frames')


def _folder_frames(path: str, short_side: Optional[int], fps: Optional[float],
                   folder_fps: float, info: dict) -> Iterator[np.ndarray]:
  folder = storage.path(path)
  try:
    names = sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(FRAME_EXTENSIONS))
  except OSError as e:
    raise VideoDecodeError('missing' if isinstance(e, FileNotFoundError) else 'unreadable',
                           _short(e)) from e
  if not names:
    raise VideoDecodeError('no_frames', f'no {"/".join(FRAME_EXTENSIONS)} files in the folder')
  info['source_fps'] = float(folder_fps)
  info['fps'] = float(folder_fps) if fps is None else float(fps)
  rate = fractions.Fraction(folder_fps).limit_denominator(1_000_000)
  timed = ((fractions.Fraction(i) / rate, name) for i, name in enumerate(names))
  last = None
  for name in _resample(timed, fps, 1 / rate):
    if name is not last:
      last, rgb = name, _read_image(folder / name, short_side)
    yield rgb


def _read_image(path, short_side: Optional[int]) -> np.ndarray:
  try:
    with av.open(_readable(path)) as container:
      frames = list(container.decode(video=0))
  except (av.FFmpegError, OSError, ValueError, IndexError) as e:
    raise VideoDecodeError('decode_error', f'{path.name}: {_short(e)}') from e
  if len(frames) != 1:
    raise VideoDecodeError('decode_error', f'{path.name}: {len(frames)} images')
  return _to_rgb(frames[0], short_side)


def _readable(path):
  """What ``av.open`` reads: a local path as is; a URL's bytes (read whole: clips are small)."""
  return io.BytesIO(storage.path(path).read_bytes()) if storage.is_url(path) else os.fspath(path)


def _short(e: Exception) -> str:
  """An exception as one line without the file path (stable across machines)."""
  text = getattr(e, 'strerror', None) or str(e)
  return f'{type(e).__name__}: {text}'.splitlines()[0][:200]


def iter_frames(path: str, short_side: Optional[int] = 320, fps: Optional[float] = None,
                threads: int = 0, folder_fps: float = FOLDER_FPS,
                info: Optional[dict] = None) -> Iterator[np.ndarray]:
  """Yields the frames of a video file, or of a folder of image frames, as ``uint8 H W 3`` RGB.

  Args:
    path: a video file PyAV can read, or a folder of ``.jpg``/``.png`` frames (sorted by name);
      local, or a URL (``gs://...``, read through ``dtf_jax.storage``).
    short_side: the short side of the output frames; ``None``/``0`` keeps the size.
    fps: output frame rate (frames dropped or repeated, see the module doc); ``None`` keeps all.
    threads: decoder threads (``0``: FFmpeg's choice, ``1``: single-threaded).
    folder_fps: the frame rate of a folder of frames (Something-Something V1: 12).
    info: if given, receives ``fps`` (of the output) and ``source_fps`` once decoding starts.

  Raises ``VideoDecodeError`` (possibly after some frames were yielded).
  """
  info = {} if info is None else info
  if storage.path(path).is_dir():
    return _folder_frames(path, short_side, fps, folder_fps, info)
  return _video_frames(path, short_side, fps, threads, info)


def decode_video(path: str, short_side: Optional[int] = 320, fps: Optional[float] = None,
                 threads: int = 0,
                 folder_fps: float = FOLDER_FPS) -> Tuple[np.ndarray, float]:
  """Decodes a whole video: ``(frames uint8 N H W 3, fps)``. See ``iter_frames``."""
  info = {}
  frames: Sequence[np.ndarray] = list(iter_frames(path, short_side, fps, threads, folder_fps, info))
  return np.stack(frames), info['fps']


def video_codec() -> str:
  """``libx264`` if this PyAV build has it, else ``mpeg4``."""
  return 'libx264' if 'libx264' in av.codecs_available else 'mpeg4'


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
  """``uint8 H W 3`` RGB (H % 4 == W % 2 == 0) -> ``uint8 (3H/2) W`` yuv420p planes (PyAV's).

  BT.601 limited range (FFmpeg's default matrix, which decoding back to RGB inverts), chroma the
  mean of each 2x2 block. Done in numpy so that the encoder's input is exactly reproducible.
  """
  h, w = frame.shape[:2]
  x = frame.astype(np.float64)
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
  r, g, b = (einops.reduce(c, '(h 2) (w 2) -> h w', 'mean') for c in (r, g, b))
  u = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0
  v = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0
  planes = [y, u.reshape(h // 4, w), v.reshape(h // 4, w)]
  return np.clip(np.rint(np.concatenate(planes, 0)), 0, 255).astype(np.uint8)


def write_mp4(path: str, frames: np.ndarray, fps=12, codec: Optional[str] = None) -> None:
  """Writes ``uint8 T H W 3`` RGB frames (H % 4 == W % 2 == 0) as a yuv420p mp4, deterministic.

  ``fps``: an int or a ``fractions.Fraction`` (e.g. 30000/1001); local path or URL."""
  codec = codec or video_codec()
  buffer = io.BytesIO()
  with av.open(buffer, 'w', format='mp4') as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = 'yuv420p'
    if codec == 'libx264':
      # asm=0: with x264's SIMD paths, re-encoding identical 64x64 frames in one process gave
      # different bytes in 5-15% of the encodes; plain C gave 0 of 100 (costs ~8 ms per clip).
      stream.options = {'crf': str(H264_CRF), 'preset': 'veryfast', 'threads': '1',
                        'x264-params': 'asm=0'}
    else:
      stream.bit_rate = int(4 * stream.width * stream.height * fps)  # ~4 bits per pixel
      stream.options = {'threads': '1'}
    for frame in frames:
      yuv = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format='yuv420p')
      for packet in stream.encode(yuv):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  storage.write_bytes(path, buffer.getvalue())

"""Measures the throughput of the train and eval input pipelines (``dtf_jax.data.pipeline``).

    python -m dtf_jax.tools.benchmark_input --data DIR --split train --clip-length 16 --size 224
    python -m dtf_jax.tools.benchmark_input --data tfds:dtf_synthetic --data-dir D --size 64
    python -m dtf_jax.tools.benchmark_input --data DIR --skip eval --augment released

``--data`` is a converter output folder (or ``tfrecord:DIR``) or ``tfds:NAME``. After
``--warmup-batches`` untimed batches, times ``--batches`` batches of each pipeline and prints
clips/s overall and per core (the cores this process may use, or ``--cores``, which also limits
tf.data's thread pool). The eval pipeline is timed on the same split with ``--num-clips`` x
``--num-crops`` views per video at ``--eval-size`` (views/s = clips/s). ``--augment released``
times the train pipeline with the released colour chain (jitter, grayscale, blur) on.
Clips per CPU-second (the process's CPU time, all threads) is the per-core rate when other
processes share the cores, where clips/s/core understates it.
``--dct-method INTEGER_FAST`` decodes JPEGs with the approximate inverse DCT.
"""

import argparse
import os
import sys
import time

import tensorflow as tf

from dtf_jax import errors
from dtf_jax.data import ops, pipeline
from dtf_jax.tools.model_info import int_at_least


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data', required=True, help="DIR, 'tfrecord:DIR' or 'tfds:NAME'.")
  parser.add_argument('--data-dir', help="TFDS data_dir for 'tfds:NAME'.")
  parser.add_argument('--split', default='train', help='split to read (default train).')
  parser.add_argument('--clip-length', type=int_at_least(1), default=16,
                      help='frames per clip (16).')
  parser.add_argument('--stride', type=int_at_least(1), default=1,
                      help='frame sampling stride (1).')
  parser.add_argument('--size', type=int_at_least(1), default=224, help='train crop size (224).')
  parser.add_argument('--augment', choices=('none', 'released'), default='none',
                      help='train augmentation: none (crop and flip only) or released (the '
                      'DTF/SIFA chain: random resized crop, colour jitter, grayscale, blur, flip; '
                      'pipeline.RELEASED_AUGMENTATION). Default none.')
  parser.add_argument('--crop', choices=pipeline.TRAIN_CROPS, default=None,
                      help='train crop (default: scale_jitter, or random_resized_crop with '
                      '--augment released).')
  parser.add_argument('--dct-method', choices=ops.DCT_METHODS, default='INTEGER_ACCURATE',
                      help='JPEG inverse DCT (INTEGER_ACCURATE, exact; INTEGER_FAST is '
                      'approximate).')
  parser.add_argument('--batch-size', type=int_at_least(1), default=8, help='clips per batch (8).')
  parser.add_argument('--batches', type=int_at_least(1), default=40,
                      help='timed batches per pipeline (40).')
  parser.add_argument('--warmup-batches', type=int_at_least(0), default=5,
                      help='untimed batches first (5).')
  parser.add_argument('--eval-size', type=int_at_least(1), default=None,
                      help='eval crop size (--size).')
  parser.add_argument('--num-clips', type=int_at_least(1), default=1,
                      help='eval clips per video (1).')
  parser.add_argument('--num-crops', type=int, choices=(1, 3), default=3,
                      help='eval crops per clip (3).')
  parser.add_argument('--cores', type=int_at_least(1), default=None,
                      help='limit tf.data to this many threads and count per core by it '
                      '(default: tf.data defaults, all usable cores).')
  parser.add_argument('--skip', choices=('train', 'eval'), help='time only the other pipeline.')
  return parser.parse_args(argv)


def _time(dataset, batches: int, warmup: int, label: str):
  """Iterates ``warmup + batches`` batches; returns (timed clips, seconds, CPU seconds of the
  process, all its threads)."""
  iterator = iter(dataset)
  for _ in range(warmup):
    next(iterator)
  cpu_start = time.process_time()
  clips, start, last = 0, time.perf_counter(), time.perf_counter()
  for i in range(batches):
    batch = next(iterator)
    clips += int(batch['video'].shape[0])
    now = time.perf_counter()
    if now - last > 5 or i == batches - 1:
      print(f'  {label}: {i + 1}/{batches} batches, {clips / (now - start):.1f} clips/s',
            flush=True)
      last = now
  return clips, time.perf_counter() - start, time.process_time() - cpu_start


def main(argv=None) -> int:
  args = parse_args(argv)
  dataset = args.data if args.data.startswith(('tfds:', 'tfrecord:')) else f'tfrecord:{args.data}'
  cores = args.cores or len(os.sched_getaffinity(0))
  options = tf.data.Options()
  if args.cores:  # Otherwise tf.data's default pool, one thread per usable core.
    options.threading.private_threadpool_size = cores
    options.threading.max_intra_op_parallelism = 1
  try:
    source = pipeline.make_source(dataset, args.split, args.data_dir, process_count=1)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: --data {args.data}: {e}')
  print(f'{source.name} [{args.split}]: {source.num_videos} videos, {source.num_classes} classes; '
        f'{cores} cores; batch {args.batch_size}, clip {args.clip_length}x{args.size}^2 '
        f'(stride {args.stride})', flush=True)
  results = {}
  if args.skip != 'train':
    augment = dict(pipeline.RELEASED_AUGMENTATION) if args.augment == 'released' else {}
    augment['crop'] = args.crop or augment.get('crop', 'scale_jitter')
    print(f'augmentation: {args.augment}, crop {augment["crop"]}', flush=True)
    train = pipeline.train_dataset(
        source, batch_size=args.batch_size, clip_length=args.clip_length, stride=args.stride,
        size=args.size, process_index=0, shuffle_buffer=min(256, source.num_videos),
        dct_method=args.dct_method, **augment).with_options(options)
    results['train'] = _time(train, args.batches, args.warmup_batches, 'train')
  if args.skip != 'eval':
    eval_size = args.eval_size or args.size
    data = pipeline.eval_dataset(
        source, batch_size=args.batch_size, clip_length=args.clip_length, stride=args.stride,
        size=eval_size, num_clips=args.num_clips, num_crops=args.num_crops,
        dct_method=args.dct_method, process_index=0)
    batches = min(args.batches, data.num_batches - args.warmup_batches)
    if batches < 1:
      print(f'eval: only {data.num_batches} batches in the split; not timed', file=sys.stderr)
    else:
      results['eval'] = _time(data.dataset.with_options(options), batches,
                              args.warmup_batches, f'eval {args.num_clips}x{args.num_crops} views')
  for name, (clips, seconds, cpu_seconds) in results.items():
    rate = clips / seconds
    print(f'{name:5s} {rate:8.1f} clips/s  {rate / cores:7.1f} clips/s/core  '
          f'({clips} clips in {seconds:.1f} s, {cores} cores)  '
          f'{clips / max(cpu_seconds, 1e-9):.1f} clips per CPU-second')
  return 0


if __name__ == '__main__':
  sys.exit(errors.run_main(main))

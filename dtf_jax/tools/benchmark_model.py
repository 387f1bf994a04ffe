"""Times a model's jitted forward and forward+backward on the default JAX backend.

    python -m dtf_jax.tools.benchmark_model --model dtf_r50 --clip-length 16 --size 224 \\
        --batch 2 --compare c2d_r50

Prints the compile times and, per clip, the median forward and forward+backward (training step
gradients, ``train=True``, batch-norm statistics updated) wall times over ``--repeats`` runs after
``--warmup`` runs, and XLA's cost analysis of each compiled call (bytes accessed and FLOPs per
clip: the memory traffic a block adds shows there on any machine, also where its time does not).
With ``--compare``, both models are timed in the same process with their runs interleaved, and
the ratios model / compare of time and of bytes accessed are printed.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtf_jax.models import create_model, list_models, size_kwargs
from dtf_jax.tools.model_info import int_at_least, usage_error


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  positive = int_at_least(1)
  parser.add_argument('--model', required=True, choices=list_models())
  parser.add_argument('--compare', choices=list_models(), help='second model to time and compare.')
  parser.add_argument('--clip-length', type=positive, default=16,
                      help='input frames T (default 16).')
  parser.add_argument('--size', type=positive, default=224,
                      help='frame height = width (default 224).')
  parser.add_argument('--batch', type=positive, default=2, help='clips per call (default 2).')
  parser.add_argument('--num-classes', type=positive, default=400)
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help='compute dtype (default float32).')
  parser.add_argument('--warmup', type=int_at_least(0), default=2,
                      help='untimed runs after compiling (2).')
  parser.add_argument('--repeats', type=positive, default=7,
                      help='timed runs; the median is shown (7).')
  parser.add_argument('--no-backward', action='store_true', help='time the forward only.')
  return parser.parse_args(argv)


class ModelTimer:
  """Compiles one model's forward and forward+backward and times single calls."""

  def __init__(self, name: str, args):
    self.name = name
    self.model = create_model(name, num_classes=args.num_classes, clip_length=args.clip_length,
                              dtype=jnp.dtype(args.dtype), **size_kwargs(name, args.size))
    rng = np.random.default_rng(0)
    self.video = jnp.asarray(rng.standard_normal(
        (args.batch, args.clip_length, args.size, args.size, 3), dtype=np.float32))
    self.labels = jnp.asarray(rng.integers(0, args.num_classes, args.batch))
    self.variables = jax.jit(self.model.init)(jax.random.PRNGKey(0), self.video[:1])
    self.compile_s = {}
    self.cost = {}  # per call: {'bytes': bytes accessed, 'flops': FLOPs}, XLA's cost analysis
    self.times = {'forward': []}
    forward = jax.jit(lambda v, x: self.model.apply(v, x, train=False))
    self.calls = {'forward': self._compile('forward', forward, self.variables, self.video)}
    if not args.no_backward:
      self.times['forward+backward'] = []
      self.calls['forward+backward'] = self._compile(
          'forward+backward', jax.jit(self._loss_grad), self.variables, self.video, self.labels)
    self.args = {'forward': (self.variables, self.video),
                 'forward+backward': (self.variables, self.video, self.labels)}

  def _loss_grad(self, variables, video, labels):
    def loss_fn(params):
      logits, updates = self.model.apply(
          {'params': params, 'batch_stats': variables.get('batch_stats', {})}, video, train=True,
          mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(1)})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates
    return jax.grad(loss_fn, has_aux=True)(variables['params'])

  def _compile(self, what, fn, *args):
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    self.compile_s[what] = time.perf_counter() - start
    cost = compiled.cost_analysis()
    self.cost[what] = {'bytes': float(cost.get('bytes accessed', 0.0)),
                       'flops': float(cost.get('flops', 0.0))}
    return compiled

  def run(self, what: str, record: bool):
    start = time.perf_counter()
    jax.block_until_ready(self.calls[what](*self.args[what]))
    if record:
      self.times[what].append(time.perf_counter() - start)

  def median_per_clip(self, what: str, batch: int) -> float:
    return statistics.median(self.times[what]) / batch


def main(argv=None):
  args = parse_args(argv)
  names = [args.model] + ([args.compare] if args.compare else [])
  print(f'{", ".join(names)}: batch {args.batch} x {args.clip_length} frames x '
        f'{args.size}x{args.size}, {args.dtype}, backend {jax.default_backend()} '
        f'({jax.device_count()} device(s)); median of {args.repeats} after {args.warmup} warm-up')
  timers = []
  for name in names:
    print(f'compiling {name} ...', flush=True)
    try:
      timer = ModelTimer(name, args)
    except ValueError as e:  # the model cannot be built, or cannot take --clip-length / --size
      flag = '--model' if name == args.model else '--compare'
      usage_error(f'{flag} {name} --clip-length {args.clip_length} --size {args.size}: {e}')
    print('  compile time: ' + ', '.join(f'{w} {s:.1f} s' for w, s in timer.compile_s.items()),
          flush=True)
    timers.append(timer)
  whats = list(timers[0].calls)
  for what in whats:
    for i in range(args.warmup + args.repeats):
      for timer in timers:  # interleaved, so both see the same machine state
        timer.run(what, record=i >= args.warmup)
  for timer in timers:
    print(f'{timer.name}: ' + ', '.join(
        f'{w} {timer.median_per_clip(w, args.batch) * 1e3:.1f} ms/clip' for w in whats))
    print(f'{timer.name} XLA cost per clip: ' + ', '.join(
        f'{w} {timer.cost[w]["bytes"] / args.batch / 2 ** 30:.3f} GiB accessed, '
        f'{timer.cost[w]["flops"] / args.batch / 1e9:.1f} GFLOP' for w in whats))
  if args.compare:
    for what in whats:
      ratio = timers[0].median_per_clip(what, 1) / timers[1].median_per_clip(what, 1)
      print(f'time ratio {args.model} / {args.compare} ({what}): {ratio:.3f}')
    for what in whats:
      ratio = timers[0].cost[what]['bytes'] / timers[1].cost[what]['bytes']
      print(f'bytes-accessed ratio {args.model} / {args.compare} ({what}): {ratio:.3f}')


if __name__ == '__main__':
  main()

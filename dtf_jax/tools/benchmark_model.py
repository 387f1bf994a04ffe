"""Times a model's jitted forward and forward+backward on the default JAX backend.

    python -m dtf_jax.tools.benchmark_model --model dtf_r50 --clip-length 16 --size 224 \\
        --batch 2 --compare c2d_r50

Prints the compile times and, per clip, the median forward and forward+backward (training step
gradients, ``train=True``, batch-norm statistics updated) wall times over ``--repeats`` runs after
``--warmup`` runs, and XLA's cost analysis of each compiled call (bytes accessed and FLOPs per
clip: the memory traffic a block adds shows there on any machine, also where its time does not).
With ``--compare``, both models are timed in the same process with their runs interleaved, and
the ratios model / compare of time and of bytes accessed are printed. ``--fa-impl scan,xla,pallas``
times ``--model`` once per frame-wise aggregation implementation, all in the same run. The
models compile in parallel threads.

``--target v5e:1x1`` (any ``dtf_jax.tpu_target`` topology; needs ``pip install -e '.[tpu]'``)
times nothing: it compiles each model's forward and the trainer's train step (forward, backward,
SGD-momentum update, state donated; ``--batch`` clips per chip) for that TPU on this host, and
prints per chip the compiled programs' FLOPs, bytes accessed, temporaries and peak memory, with
the ratios to ``--compare``: how every change to the DTF block is measured on the TPU compiler.

    python -m dtf_jax.tools.benchmark_model --model dtf_r50 --compare c2d_r50 --dtype bfloat16 \
        --batch 4 --fa-impl scan,xla,pallas --target v5e:1x1

MFU (model FLOP utilisation) per model and call: XLA's FLOPs of the call / its median time /
the device's peak. The peak: ``--peak-tflops`` if given; else the data-sheet dense peak of the
device kind (``PEAK_TFLOPS``: bfloat16, or for ``--dtype float32`` what float32 matmuls run at
with JAX's default precision: TF32 on NVIDIA GPUs, bfloat16 passes on TPUs); else (CPUs, unknown
devices) the measured FLOP/s of a large jitted matmul in ``--dtype``. The line says which.
"""

import argparse
import concurrent.futures
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtf_jax import errors, tpu_target
from dtf_jax.layers.aggregation import FA_IMPLS
from dtf_jax.layers.dtf import BLOCK_IMPLS
from dtf_jax.models import REMAT_OPTIONS, create_model, list_models, model_arguments, size_kwargs
from dtf_jax.tools.model_info import int_at_least, lower_forward, lower_train_step, target_mesh, \
    tpu_target_arg, usage_error

# Data-sheet dense (no sparsity) peak TFLOP/s per device, keyed by jax's ``device_kind``:
# (bfloat16, float32 matmuls at JAX's default precision: TF32 on NVIDIA GPUs, one bfloat16 pass
# on TPUs). Looked up exactly, then by the longest key that starts the device kind.
PEAK_TFLOPS = {
    'NVIDIA H200': (989.0, 494.7),
    'NVIDIA H100 80GB HBM3': (989.0, 494.7),  # SXM
    'NVIDIA H100 PCIe': (756.0, 378.0),
    'NVIDIA A100-SXM4-80GB': (312.0, 156.0),
    'NVIDIA A100-SXM4-40GB': (312.0, 156.0),
    'NVIDIA A100': (312.0, 156.0),
    'TPU v4': (275.0, 275.0),
    'TPU v5 lite': (197.0, 197.0),  # v5e
    'TPU v5': (459.0, 459.0),  # v5p
    'TPU v6 lite': (918.0, 918.0),  # v6e (Trillium)
}
MATMUL_SIZE = 2048  # n of the n x n matmul timed for the measured peak


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
  parser.add_argument('--no-backward', action='store_true',
                      help='time (with --target: compile) the forward only.')
  parser.add_argument('--fa-impl', type=fa_impl_list, default=['auto'],
                      help="the DTF block's frame-wise aggregation implementation(s) of --model: "
                           f"one of {', '.join(FA_IMPLS)}, or several separated by commas, each "
                           'timed as its own model against --compare (default auto: per backend).')
  parser.add_argument('--block-impl', choices=BLOCK_IMPLS, default='auto',
                      help="how the DTF block runs: parts, fused (Pallas TPU kernels, forward and "
                           'backward) or auto (default: fused on TPU).')
  parser.add_argument('--remat', choices=REMAT_OPTIONS, default='none',
                      help='what the backward pass recomputes (default none).')
  parser.add_argument('--peak-tflops', type=float,
                      help='device peak TFLOP/s for MFU (default: data sheet, or measured).')
  parser.add_argument('--target', type=tpu_target_arg, default=None,
                      help='compile (not time) the forward and the train step for this TPU '
                           'topology, e.g. v5e:1x1 (needs libtpu: pip install -e .[tpu]); '
                           '--batch is per chip.')
  args = parser.parse_args(argv)
  if args.peak_tflops is not None and not args.peak_tflops > 0:
    parser.error(f'argument --peak-tflops: must be > 0, got {args.peak_tflops}')
  return args


def fa_impl_list(text: str):
  """argparse ``type``: ``'scan,xla'`` -> ``['scan', 'xla']``, each one of ``FA_IMPLS``."""
  impls = [t.strip() for t in text.split(',')]
  bad = [t for t in impls if t not in FA_IMPLS]
  if bad or len(set(impls)) != len(impls):
    raise argparse.ArgumentTypeError(
        f'expected distinct values among {", ".join(FA_IMPLS)} separated by commas, got {text!r}')
  return impls


def measured_peak_tflops(dtype, n: int = MATMUL_SIZE, repeats: int = 5) -> float:
  """TFLOP/s of a jitted ``n x n`` matmul in ``dtype`` (``2 n^3`` FLOPs), best of ``repeats``."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, a))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best / 1e12


def device_peak(dtype: str, override=None):
  """``(peak TFLOP/s, what it is)`` for MFU; see the module docstring."""
  if override is not None:
    return override, '--peak-tflops'
  kind = jax.devices()[0].device_kind
  key = kind if kind in PEAK_TFLOPS else max(
      (k for k in PEAK_TFLOPS if kind.startswith(k)), key=len, default=None)
  if key is not None and jax.default_backend() != 'cpu':
    peak = PEAK_TFLOPS[key][0 if dtype == 'bfloat16' else 1]
    return peak, f'{kind}, data sheet, dense {dtype}' + (
        ' matmuls at default precision' if dtype == 'float32' else '')
  return measured_peak_tflops(jnp.dtype(dtype)), (
      f'{kind}, measured: {MATMUL_SIZE}x{MATMUL_SIZE} {dtype} matmul, best of 5')


class ModelTimer:
  """One model's forward and forward+backward: :meth:`compile`, then single timed calls."""

  def __init__(self, name: str, args, fa_impl: str = 'auto', label: str = None):
    self.name = label or name
    options = {k: v for k, v in (('fa_impl', fa_impl), ('remat', args.remat),
                                 ('block_impl', args.block_impl))
               if k in model_arguments(name)}
    self.model = create_model(name, num_classes=args.num_classes, clip_length=args.clip_length,
                              dtype=jnp.dtype(args.dtype), **size_kwargs(name, args.size),
                              **options)
    rng = np.random.default_rng(0)
    self.video = jnp.asarray(rng.standard_normal(
        (args.batch, args.clip_length, args.size, args.size, 3), dtype=np.float32))
    self.labels = jnp.asarray(rng.integers(0, args.num_classes, args.batch))
    self.backward = not args.no_backward
    self.compile_s = {}
    self.cost = {}  # per call: {'bytes': bytes accessed, 'flops': FLOPs}, XLA's cost analysis
    self.times = {'forward': []}
    if self.backward:
      self.times['forward+backward'] = []

  def compile(self):
    """Initialises the variables and compiles the calls (thread-safe: several models may compile
    at once)."""
    self.variables = jax.jit(self.model.init)(jax.random.PRNGKey(0), self.video[:1])
    forward = jax.jit(lambda v, x: self.model.apply(v, x, train=False))
    self.calls = {'forward': self._compile('forward', forward, self.variables, self.video)}
    if self.backward:
      self.calls['forward+backward'] = self._compile(
          'forward+backward', jax.jit(self._loss_grad), self.variables, self.video, self.labels)
    self.args = {'forward': (self.variables, self.video),
                 'forward+backward': (self.variables, self.video, self.labels)}
    return self

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

  def mfu(self, what: str, peak_tflops: float) -> float:
    """XLA's FLOPs of the call / its median time / the peak."""
    return self.cost[what]['flops'] / statistics.median(self.times[what]) / (peak_tflops * 1e12)


def compile_for_target(args, specs):
  """``--target``: per model, the forward and the train step compiled for the TPU; prints each
  one's per-chip figures and the ratios to ``--compare``."""
  mesh = target_mesh(args.target)
  devices = list(mesh.devices.flat)
  print(f'{", ".join(label for _, _, label in specs)}: {args.batch} clips per chip x '
        f'{args.clip_length} frames x {args.size}x{args.size}, {args.dtype}, remat {args.remat}; '
        f'compiled for TPU {args.target.name} ({len(devices)} chips), figures per chip '
        f'(XLA\'s plan, nothing runs)', flush=True)
  results = {}
  for name, impl, label in specs:
    options = {k: v for k, v in (('fa_impl', impl), ('block_impl', args.block_impl))
               if k in model_arguments(name)}
    try:
      model = create_model(name, num_classes=args.num_classes, clip_length=args.clip_length,
                           dtype=jnp.dtype(args.dtype), remat=args.remat,
                           **size_kwargs(name, args.size), **options)
      view = jnp.zeros((1, args.clip_length, args.size, args.size, 3), jnp.float32)
      shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), view))
      results[label] = {'forward': tpu_target.compile_stats(lower_forward(
          model, shapes, args.batch, args.clip_length, args.size, mesh))}
      if not args.no_backward:
        results[label]['train step'] = tpu_target.compile_stats(
            lower_train_step(args, devices, model=name, **options))
    except ValueError as e:  # the model cannot be built, or cannot take --clip-length / --size
      flag = '--model' if name == args.model else '--compare'
      usage_error(f'{flag} {name} --clip-length {args.clip_length} --size {args.size}: {e}')
    for what, st in results[label].items():
      print(f'{label} {what}: {st.flops / 1e9:.1f} GFLOP, {st.bytes_accessed / 1e9:.3f} GB '
            f'accessed, temporaries {st.temp_bytes / 2 ** 30:.3f} GiB, peak '
            f'{st.peak_bytes / 2 ** 30:.3f} GiB; compiled in {st.compile_s:.1f} s', flush=True)
  if args.compare:
    base = results[args.compare]
    for label in list(results)[:-1]:
      for what, st in results[label].items():
        b = base[what]
        print(f'ratio {label} / {args.compare} ({what}): bytes accessed '
              f'{st.bytes_accessed / b.bytes_accessed:.2f}, FLOPs {st.flops / b.flops:.2f}, '
              f'temporaries {f"{st.temp_bytes / b.temp_bytes:.2f}" if b.temp_bytes else "-"}, peak '
              f'{st.peak_bytes / b.peak_bytes:.2f}')
  return results


def main(argv=None):
  args = parse_args(argv)
  impls = args.fa_impl
  # --model once per fa_impl (labelled with it when there are several), then --compare.
  specs = [(args.model, impl, args.model if len(impls) == 1 else f'{args.model}[{impl}]')
           for impl in impls]
  if args.compare:
    specs.append((args.compare, impls[0], args.compare))
  if args.target is not None:
    compile_for_target(args, specs)
    return
  print(f'{", ".join(label for _, _, label in specs)}: batch {args.batch} x {args.clip_length} '
        f'frames x {args.size}x{args.size}, {args.dtype}, fa_impl {",".join(impls)}, remat '
        f'{args.remat}, backend {jax.default_backend()} ({jax.device_count()} device(s)); median '
        f'of {args.repeats} after {args.warmup} warm-up')
  timers = []
  for name, impl, label in specs:
    try:
      timers.append(ModelTimer(name, args, impl, label))
    except ValueError as e:  # the model cannot be built, or cannot take --clip-length / --size
      flag = '--model' if name == args.model else '--compare'
      usage_error(f'{flag} {name} --clip-length {args.clip_length} --size {args.size}: {e}')
  print(f'compiling {", ".join(t.name for t in timers)} ...', flush=True)
  with concurrent.futures.ThreadPoolExecutor(len(timers)) as pool:  # XLA compiles in parallel
    futures = [pool.submit(timer.compile) for timer in timers]
  for (name, _, _), timer, future in zip(specs, timers, futures):
    try:
      future.result()
    except ValueError as e:  # e.g. a clip length or frame size the model cannot take
      flag = '--model' if name == args.model else '--compare'
      usage_error(f'{flag} {name} --clip-length {args.clip_length} --size {args.size}: {e}')
    print(f'  {timer.name} compile time: ' + ', '.join(
        f'{w} {s:.1f} s' for w, s in timer.compile_s.items()), flush=True)
  whats = list(timers[0].calls)
  for what in whats:
    for i in range(args.warmup + args.repeats):
      for timer in timers:  # interleaved, so all see the same machine state
        timer.run(what, record=i >= args.warmup)
  for timer in timers:
    print(f'{timer.name}: ' + ', '.join(
        f'{w} {timer.median_per_clip(w, args.batch) * 1e3:.1f} ms/clip' for w in whats))
    print(f'{timer.name} XLA cost per clip: ' + ', '.join(
        f'{w} {timer.cost[w]["bytes"] / args.batch / 2 ** 30:.3f} GiB accessed, '
        f'{timer.cost[w]["flops"] / args.batch / 1e9:.1f} GFLOP' for w in whats))
  peak, source = device_peak(args.dtype, args.peak_tflops)
  print(f'peak {peak:.4g} TFLOP/s ({source})')
  for timer in timers:
    print(f'{timer.name} MFU: ' + ', '.join(
        f'{w} {100 * timer.mfu(w, peak):.3g}% ('
        f'{timer.cost[w]["flops"] / args.batch / 1e9:.4g} GFLOP / '
        f'{timer.median_per_clip(w, args.batch) * 1e3:.4g} ms per clip)' for w in whats))
  if args.compare:
    compare = timers[-1]
    for timer in timers[:-1]:
      for what in whats:
        ratio = timer.median_per_clip(what, 1) / compare.median_per_clip(what, 1)
        print(f'time ratio {timer.name} / {compare.name} ({what}): {ratio:.3f}')
      for what in whats:
        ratio = timer.cost[what]['bytes'] / compare.cost[what]['bytes']
        print(f'bytes-accessed ratio {timer.name} / {compare.name} ({what}): {ratio:.3f}')


if __name__ == '__main__':
  sys.exit(errors.run_main(main))

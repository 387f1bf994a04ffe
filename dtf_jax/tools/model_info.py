"""Prints a model's trainable parameters, GFLOPs per view, XLA compile time and peak memory.

    python -m dtf_jax.tools.model_info --model dtf_r50 --clip-length 16 --size 256

GFLOPs are multiply-accumulates (as the paper and the usual counters report them) of one view
(batch 1), counted from the jaxpr by ``dtf_jax.flops`` (which documents what each op counts).
``--convention ours`` counts every multiply-add of convolutions, matmuls, attention and the whole
DTF path (a complex multiply-add = 4 real ones; FFTs as the direct real DFT). ``--convention paper``
counts as the paper's table does (see ``dtf_jax.flops.PAPER_CONVENTION_NOTE``); both are printed,
the chosen one first. Compile time and memory are for the jitted forward (``train=False``) at
``--batch`` on the default JAX backend; with ``--train``, for the trainer's jitted train step
instead (``dtf_jax.train.step``: forward, backward and the SGD-momentum update of the recipe in
``configs/base.py``, the state donated) at ``--batch`` clips per device, with ``--remat``:

    python -m dtf_jax.tools.model_info --model dtf_swin_b --clip-length 64 --size 224 \\
        --dtype bfloat16 --train --batch 4 --remat block

``--temporal NAME`` replaces the model's temporal module (any name of
``dtf_jax.layers.temporal.TEMPORAL_MODULES``: the paper's baselines and ablations) and, for
ResNets, ``--dtf-stages 4`` (or ``1,2,3,4``) chooses the stages that carry it:

    python -m dtf_jax.tools.model_info --model dtf_r50 --temporal dtf_1d --dtf-stages 4 \\
        --no-compile

``--target v5e:1x1`` (any ``dtf_jax.tpu_target`` topology; needs ``pip install -e '.[tpu]'``)
compiles for that TPU instead of the default backend, on any host, with ``--batch`` clips per
chip, and adds the compiled program's FLOPs, bytes accessed and roofline per chip:

    python -m dtf_jax.tools.model_info --model dtf_r50 --dtype bfloat16 --batch 4 --train \\
        --target v5e:1x1

Memory is XLA's buffer assignment of the compiled program, per device (nothing is run):
peak = arguments + temporaries + outputs - aliased (outputs written into donated arguments, the
new train state, count once). Temporaries are already packed by liveness (buffers that are never
alive together share bytes), so this is the most that is allocated at once, as far as XLA plans.
``--train`` also prints the activations that the forward pass keeps for the backward pass, read
from the jaxpr (what ``--remat`` reduces on any backend). XLA:CPU's plan does not shrink with
remat (README, "Figures"): on CPU, read that line for remat, the peak for the rest.
"""

import argparse
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dtf_jax import errors, flops, tpu_target
from dtf_jax.layers.temporal import TEMPORAL_MODULES
from dtf_jax.models import REMAT_OPTIONS, create_model, list_models, model_spec, size_kwargs


def int_at_least(minimum: int):
  """argparse ``type``: an int >= ``minimum`` (anything else is a usage error naming the flag)."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'expected an int >= {minimum}, got {text!r}') from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f'must be >= {minimum}, got {value}')
    return value
  return parse


def tpu_target_arg(text: str):
  """argparse ``type``: a ``dtf_jax.tpu_target`` topology such as ``v5e:2x2``."""
  try:
    return tpu_target.parse_target(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def target_mesh(target) -> jax.sharding.Mesh:
  """A one-axis ``('batch',)`` mesh of ``target``'s abstract TPU devices; a usage error (exit 2)
  naming the cause when libtpu is missing."""
  missing = tpu_target.libtpu_available()
  if missing:
    usage_error(f'--target {target.name}: {missing}')
  return jax.sharding.Mesh(np.array(tpu_target.target_devices(target)), ('batch',))


def int_list(text: str):
  """argparse ``type``: comma-separated ints, e.g. ``4`` or ``1,2,3,4``."""
  try:
    return tuple(int(part) for part in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'expected comma-separated ints (e.g. 4 or 1,2,3,4), got {text!r}') from None


def usage_error(message: str):
  """Exits with ``message`` as one line on stderr and code 2 (bad usage), as argparse does."""
  print(f'{os.path.basename(sys.argv[0])}: error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  positive = int_at_least(1)
  parser.add_argument('--model', required=True, choices=list_models())
  parser.add_argument('--clip-length', type=positive, default=16,
                      help='input frames T (default 16).')
  parser.add_argument('--size', type=positive, default=224,
                      help='frame height = width (default 224).')
  parser.add_argument('--num-classes', type=positive, default=400, help='classifier outputs (400).')
  parser.add_argument('--batch', type=positive, default=1,
                      help='clips (per device with --train) for compile/memory (1).')
  parser.add_argument('--convention', choices=sorted(flops.CONVENTIONS), default='ours',
                      help='FLOP counting convention printed first (default ours).')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help='compute dtype of the compiled forward / train step (default float32).')
  parser.add_argument('--train', action='store_true',
                      help='compile the train step (forward + backward + optimizer update, the '
                           'state donated) instead of the forward; needs configs/ importable '
                           '(run from the repository root).')
  parser.add_argument('--remat', choices=REMAT_OPTIONS, default='none',
                      help="what the backward pass recomputes (the model's remat): none, block "
                           "(each bottleneck / Swin block), dtf (each DTF block). Default none.")
  parser.add_argument('--temporal', choices=sorted(TEMPORAL_MODULES), default=None,
                      help="replaces the model's temporal module (default: the model's own).")
  parser.add_argument('--dtf-stages', type=int_list, default=None,
                      help='ResNet only: the stages carrying the temporal module, e.g. 4 or '
                           "1,2,3,4 (default: the model's own, all four).")
  parser.add_argument('--no-compile', action='store_true',
                      help='skip compiling (parameters and GFLOPs only).')
  parser.add_argument('--target', type=tpu_target_arg, default=None,
                      help='compile for this TPU topology instead of the default backend, e.g. '
                           'v5e:1x1 or v5e:2x2 (needs libtpu: pip install -e .[tpu]); --batch is '
                           'per chip.')
  args = parser.parse_args(argv)
  if args.dtf_stages is not None and model_spec(args.model).family != 'resnet':
    parser.error(f'--dtf-stages applies to ResNet models only, not --model {args.model}')
  return args


def model_overrides(args) -> dict:
  """The create_model / config.model arguments that ``--temporal`` and ``--dtf-stages`` set."""
  overrides = {}
  if getattr(args, 'temporal', None) is not None:
    overrides['temporal'] = args.temporal
  if getattr(args, 'dtf_stages', None) is not None:
    overrides['dtf_stages'] = args.dtf_stages
  return overrides


def fixed_correlation_weights(params) -> int:
  """Entries of the official models' fixed ``weights_cor`` (``C x T x K2`` per DTF block), which
  PyTorch counts as parameters although they are constant (1/C); dtf_jax does not store them."""
  total, flat = 0, flax.traverse_util.flatten_dict(params)
  for path, leaf in flat.items():
    if path[-1] == 'filter_kernel':
      time, channels = leaf.shape[0], flat[path[:-1] + ('mix_kernel',)].shape[1]
      total += channels * time * (leaf.shape[1] - channels)
  return total


def lower_train_step(args, devices=None, model: str = None, **model_fields):
  """The trainer's train step for ``args`` (``configs/base.py`` recipe of the model's family,
  ``model_fields`` added to ``config.model``) for ``--batch`` clips per device, lowered (shapes
  only: nothing is allocated or run). ``devices``: the mesh's (default: JAX's)."""
  from configs import base  # pylint: disable=import-outside-toplevel
  from dtf_jax.train.config import setup  # pylint: disable=import-outside-toplevel
  from dtf_jax.train.preflight import train_step_lowering  # pylint: disable=import-outside-toplevel
  model = model or args.model
  recipe = base.swin_config if model_spec(model).family == 'swin' else base.resnet_config
  config = recipe(model)
  config.data.clip_length, config.data.size = args.clip_length, args.size
  config.data.num_classes, config.compute_dtype = args.num_classes, args.dtype
  config.model.remat = args.remat
  for key, value in {**model_overrides(args), **model_fields}.items():
    config.model[key] = value
  config.batch_size = args.batch * (jax.device_count() if devices is None else len(devices))
  return train_step_lowering(setup(config, with_train_data=False, devices=devices))()


def lower_forward(model, variables, batch: int, clip_length: int, size: int, mesh=None):
  """``model``'s jitted forward (``train=False``) on ``batch`` clips per device, lowered; on
  ``mesh`` (a ``('batch',)`` mesh) the clips are split over its devices, the variables
  replicated."""
  shape = (batch, clip_length, size, size, 3)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  if mesh is None:
    return forward.lower(variables, jax.ShapeDtypeStruct(shape, jnp.float32))
  video = jax.ShapeDtypeStruct((batch * mesh.size,) + shape[1:], jnp.float32,
                               sharding=NamedSharding(mesh, P('batch')))
  variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                          sharding=NamedSharding(mesh, P())),
                           variables)
  with jax.set_mesh(mesh):
    return forward.lower(variables, video)


def saved_activation_bytes(model, variables, video) -> int:
  """Bytes that the forward pass of ``model`` (``train=True``) keeps for its backward pass, read
  from the jaxpr (the residuals of ``jax.vjp`` that are not arguments): what remat reduces, on
  any backend, whatever its compiler's scheduling makes of it."""
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=import-outside-toplevel

  def loss(params, batch_stats, video):
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, video, train=True,
                            mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(0)})
    return logits.sum()
  residuals = saved_residuals(loss, variables['params'], variables.get('batch_stats', {}), video)
  return sum(aval.size * aval.dtype.itemsize for aval, where in residuals
             if 'from the argument' not in where)


def describe(args) -> dict:
  """Computes the report as a dict (also used by tests)."""
  model = create_model(args.model, num_classes=args.num_classes, clip_length=args.clip_length,
                       dtype=jnp.dtype(args.dtype), remat=args.remat,
                       **size_kwargs(args.model, args.size), **model_overrides(args))
  view = jax.ShapeDtypeStruct((1, args.clip_length, args.size, args.size, 3), jnp.float32)
  macs, shapes = flops.count_model_macs(model, view)
  report = {
      'params': sum(x.size for x in jax.tree_util.tree_leaves(shapes['params'])),
      'fixed_correlation_weights': fixed_correlation_weights(shapes['params']),
      'macs': macs,
  }
  if args.train:
    batch = jax.ShapeDtypeStruct((args.batch,) + view.shape[1:], jnp.float32)
    report['saved_activations'] = saved_activation_bytes(model, shapes, batch)
  if not args.no_compile:
    mesh = None if args.target is None else target_mesh(args.target)
    devices = None if mesh is None else list(mesh.devices.flat)
    if args.train:
      lowered = lower_train_step(args, devices)
    else:
      lowered = lower_forward(model, shapes, args.batch, args.clip_length, args.size, mesh)
    report['stats'] = tpu_target.compile_stats(lowered)
  return report


def main(argv=None):
  args = parse_args(argv)
  variant = ''.join(f', {k} {v}' for k, v in model_overrides(args).items())
  print(f'{args.model}: {args.clip_length} frames x {args.size}x{args.size}, '
        f'{args.num_classes} classes, {args.dtype}{variant}')
  try:
    report = describe(args)
  except ValueError as e:  # the model cannot be built, or cannot take --clip-length / --size
    usage_error(f'--model {args.model} --clip-length {args.clip_length} --size {args.size}: '
                f'{e}')
  print(f'trainable parameters: {report["params"]:,}')
  if report['fixed_correlation_weights']:
    print(f'  + fixed weights_cor (counted as parameters by the official PyTorch models): '
          f'{report["params"] + report["fixed_correlation_weights"]:,}')
  for convention in [args.convention] + [c for c in flops.CONVENTIONS if c != args.convention]:
    print(f'GFLOPs per view ({convention} convention): '
          f'{flops.total_macs(report["macs"], convention) / 1e9:.2f}')
  print('  MACs by category (G): ' + ', '.join(
      f'{c} {m / 1e9:.3f}' for c, m in report['macs'].items() if m))
  print(f'  paper convention: {flops.PAPER_CONVENTION_NOTE}')
  if 'saved_activations' in report:
    print(f'activations kept for the backward pass (batch {args.batch}, remat {args.remat}, from '
          f'the jaxpr): {report["saved_activations"] / 2**20:.2f} MiB')
  if 'stats' in report:
    stats = report['stats']
    what = (f'train step, batch {args.batch} per device, remat {args.remat}' if args.train else
            f'forward, batch {args.batch}')
    target = '' if args.target is None else f', TPU {args.target.name}, per chip'
    where = jax.default_backend() if args.target is None else f'TPU {args.target.name}, per chip'
    print(f'XLA compile time ({what}{target}): {stats.compile_s:.1f} s')
    mib = lambda n: f'{n / 2**20:.1f}'  # noqa: E731
    print(f'XLA memory ({what}, {where}): peak {mib(stats.peak_bytes)} MiB = '
          f'arguments {mib(stats.argument_bytes)} + temporaries {mib(stats.temp_bytes)} + output '
          f'{mib(stats.output_bytes)} - aliased {mib(stats.alias_bytes)} MiB '
          f'({stats.peak_bytes / 2**30:.2f} GiB)')
    print(f'XLA cost ({what}, {where}): {stats.flops / 1e9:.2f} GFLOP, '
          f'{stats.bytes_accessed / 1e9:.3f} GB accessed')
    if args.target is not None:
      chip = args.target.chip
      print(f'roofline ({chip.name} data sheet: {chip.bf16_flops / 1e12:.0f} TFLOP/s bf16, '
            f'{chip.hbm_bytes_per_s / 1e9:.0f} GB/s HBM): >= {stats.roofline_s(chip) * 1e3:.2f} ms')


if __name__ == '__main__':
  sys.exit(errors.run_main(main))

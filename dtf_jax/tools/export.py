"""Exports a checkpoint's inference function with ``jax.export``, for serving without Flax.

    # a trainer workdir (its latest checkpoint, or --step N) -> an export directory
    python -m dtf_jax.tools.export --checkpoint runs/quickstart --out exports/quickstart
    # a pretrained directory (convert_torch output); a ResNet takes any frame size: --size
    python -m dtf_jax.tools.export --checkpoint dtf_r50_k400 --out exports/dtf_r50_k400 \\
        --size 256 --platforms cpu,cuda

``--out`` receives ``function.jaxexport`` (the serialized function, lowered for each of
``--platforms``, any batch size), ``params.npz`` (its variables) and ``meta.json`` (the input
contract: ``B T H W 3`` float32 clips normalised with the ImageNet mean and std; the output:
logits ``B num_classes`` float32; class names; model; platforms), written last; see
``dtf_jax.export``. Load it in Python without the model code::

    fn = dtf_jax.export.load('exports/quickstart')
    logits = fn(video)   # video: B T H W 3, normalised float32

The frame size is ``--size``, else the size a Swin model is built for, else a workdir's
evaluation size (``data.eval_size`` of its ``config.json``).
"""

import argparse
import sys
import time
from typing import Optional

from dtf_jax import errors, export, storage
from dtf_jax.tools.model_info import int_at_least


def platform_list(text: str):
  """argparse ``type``: comma-separated platforms, e.g. ``cpu,cuda,tpu``."""
  platforms = tuple(p.strip() for p in text.split(',') if p.strip())
  if not platforms or set(platforms) - set(export.KNOWN_PLATFORMS):
    raise argparse.ArgumentTypeError(f'expected comma-separated platforms of '
                                     f'{", ".join(export.KNOWN_PLATFORMS)}, got {text!r}')
  return platforms


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True,
                      help='pretrained directory (convert_torch output) or trainer workdir.')
  parser.add_argument('--out', required=True, help='export directory to write (path or URL).')
  parser.add_argument('--step', type=int_at_least(0), default=None,
                      help="workdir only: the checkpoint's step (default: the latest).")
  parser.add_argument('--size', type=int_at_least(1), default=None,
                      help="frame height = width of the exported input (default: Swin's "
                           "image_size, or a workdir's data.eval_size; required otherwise).")
  parser.add_argument('--platforms', type=platform_list, default=export.PLATFORMS,
                      help=f'comma-separated platforms to lower for, of '
                           f'{",".join(export.KNOWN_PLATFORMS)} '
                           f'(default {",".join(export.PLATFORMS)}).')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing export.')
  return parser.parse_args(argv)


def default_size(meta, workdir_config) -> Optional[int]:
  """The frame size when ``--size`` is not given: a Swin's ``image_size`` or the workdir's
  ``data.eval_size`` (``workdir_config``: its ``config.json``, None for a pretrained directory);
  None when neither fixes one."""
  if 'image_size' in meta['kwargs']:
    return meta['kwargs']['image_size']
  if workdir_config is not None:
    return storage.read_json(workdir_config)['data']['eval_size']
  return None


def main(argv=None):
  args = parse_args(argv)
  # Heavy imports after argument parsing, so that --help is quick.
  from dtf_jax import pretrained  # pylint: disable=import-outside-toplevel

  try:
    out = storage.path(args.out)
  except ValueError as e:
    sys.exit(f'--out: {e}')
  try:
    checkpoint = storage.path(args.checkpoint)
    meta = pretrained.read_meta(checkpoint)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'--checkpoint: {e}')
  workdir = not (checkpoint / pretrained.META_FILE).exists()
  size = args.size or default_size(meta, checkpoint / pretrained.CONFIG_FILE if workdir else None)
  if size is None:
    sys.exit(f'--size is needed: {meta["model"]} takes any frame size and {checkpoint} does not '
             'say which (the paper evaluates ResNets at 256)')
  if (out / export.META_FILE).exists() and not args.overwrite:  # before the slow part
    sys.exit(f'--out {out} holds {export.META_FILE} (an export?); pass --overwrite to replace it')

  start = time.time()
  step = args.step
  if workdir and step is None:  # the latest, recorded by number
    step = (pretrained.checkpoint_steps(checkpoint) or [None])[-1]
  where = f', step {step}' if workdir else ''
  print(f'Loading {checkpoint} ({meta["model"]}{where})')
  try:
    model, variables = pretrained.load_pretrained(checkpoint, step=step)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(str(e))
  print(f'Exporting for {", ".join(args.platforms)}: input B x {model.clip_length} x {size} x '
        f'{size} x 3 float32 (any B), {model.num_classes} classes')
  source = {'checkpoint': str(checkpoint), 'step': step, 'checkpoint_source': meta['source']}
  try:
    path = export.export_model(model, variables, out, size=size, model_name=meta['model'],
                               class_names=meta['class_names'], source=source,
                               platforms=args.platforms, overwrite=args.overwrite)
  except (FileExistsError, ValueError) as e:
    sys.exit(str(e))
  written = storage.read_json(out / export.META_FILE)
  files = sum((out / name).stat().length
              for name in (export.FUNCTION_FILE, export.PARAMS_FILE, export.META_FILE))
  print(f'Wrote {path} in {time.time() - start:.1f} s: {written["parameters"]["count"]:,} '
        f'parameters, {files:,} bytes in 3 files ({files / 2**20:.2f} MiB), '
        f'platforms {", ".join(written["platforms"])}')


if __name__ == '__main__':
  sys.exit(errors.run_main(main))

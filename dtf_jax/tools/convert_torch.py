"""Converts an official DTF PyTorch checkpoint (``.pth``) into a dtf_jax pretrained directory.

    python -m dtf_jax.tools.convert_torch --model dtf_r50 --clip-length 16 --num-classes 400 \\
        --input official.pth --output DIR

``DIR`` receives ``variables/`` (orbax) and ``meta.json``; load it with
``dtf_jax.pretrained.load_pretrained(DIR)``. The file is read with
``torch.load(..., weights_only=True)``: a checkpoint cannot run code. Needs the ``torch`` extra.
"""

import argparse
import ast
import sys

from dtf_jax.models import list_models


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', required=True, choices=list_models(), help='dtf_jax model name.')
  parser.add_argument('--clip-length', type=int, required=True, help='input frames T.')
  parser.add_argument('--num-classes', type=int, required=True, help='classifier outputs.')
  parser.add_argument('--input', required=True, help='official .pth state dict.')
  parser.add_argument('--output', required=True, help='directory to write.')
  parser.add_argument('--model-arg', action='append', default=[], metavar='KEY=VALUE',
                      help='extra create_model argument, e.g. image_size=224 (Python literal).')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing output.')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    sys.exit('convert_torch needs PyTorch: pip install "dtf_jax[torch]"')
  from dtf_jax.convert import ConversionError, convert_official_state_dict  # pylint: disable=import-outside-toplevel
  from dtf_jax.pretrained import save_pretrained  # pylint: disable=import-outside-toplevel

  kwargs = {}
  for item in args.model_arg:
    key, sep, value = item.partition('=')
    if not sep:
      sys.exit(f'--model-arg {item!r}: expected KEY=VALUE')
    try:
      kwargs[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      kwargs[key] = value

  print(f'Reading {args.input} (weights_only=True)')
  try:
    state = torch.load(args.input, map_location='cpu', weights_only=True)
  except FileNotFoundError:
    sys.exit(f'Input checkpoint not found: {args.input}')
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(f'Cannot read {args.input} as a weights-only PyTorch checkpoint: {e}')
  try:
    variables, report = convert_official_state_dict(
        args.model, state, num_classes=args.num_classes, clip_length=args.clip_length,
        return_report=True, **kwargs)
  except ConversionError as e:
    sys.exit(str(e))
  print(report.summary())
  if report.skipped_unused:
    print(f'Skipped {len(report.skipped_unused)} tensors the official model owns but never uses '
          f'(e.g. {report.skipped_unused[0]}).')
  model_kwargs = dict(num_classes=args.num_classes, clip_length=args.clip_length, **kwargs)
  out = save_pretrained(args.output, args.model, model_kwargs, variables,
                        overwrite=args.overwrite)
  print(f'Wrote {out}')


if __name__ == '__main__':
  main()

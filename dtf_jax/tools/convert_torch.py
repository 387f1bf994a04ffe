"""Converts an official DTF or an ImageNet ResNet/Swin PyTorch checkpoint to a pretrained dir.

    # ImageNet ResNet-50 (torchvision) -> DTF-Net R50, 16 frames, Kinetics-400 head (new)
    python -m dtf_jax.tools.convert_torch --source imagenet_resnet --model dtf_r50 \\
        --clip-length 16 --num-classes 400 --input resnet50-19c8e357.pth --output DIR
    # ImageNet Swin-B (official or timm layout, .pth or .safetensors) -> DTF-Transformer
    python -m dtf_jax.tools.convert_torch --source imagenet_swin --model dtf_swin_b \\
        --clip-length 64 --num-classes 400 --input swin_base_patch4_window7_224_22k.pth --output DIR
    # An official DTF checkpoint (the default source)
    python -m dtf_jax.tools.convert_torch --model dtf_r50 --clip-length 16 --num-classes 400 \\
        --input dtf_r50.pth --output DIR

``DIR`` receives ``variables/`` (orbax; ``variables.next/`` when ``--overwrite`` replaced it) and
``meta.json`` (model arguments, source, the input's sha256, the inflation choices, class names,
the arrays' directory); load it with
``dtf_jax.pretrained.load_pretrained(DIR)`` or start training from it with
``--config.init_from=DIR``. ``.safetensors`` files are read without PyTorch; ``.pth``/``.pt``
files with ``torch.load(weights_only=True)`` (the ``torch`` extra), which cannot run code.
The report lists every array: loaded, left at its initialisation, or ignored, with the reason.
"""

import argparse
import ast
import sys
import time

from dtf_jax import errors, storage
from dtf_jax.convert.imagenet import SOURCES, STEM_INITS
from dtf_jax.models import list_models
from dtf_jax.tools.model_info import int_at_least


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--source', default='dtf', choices=SOURCES + ('auto',),
                      help='checkpoint kind: official DTF/C2D (default), torchvision ResNet, '
                           'ImageNet Swin (official or timm layout), or auto (from the keys).')
  parser.add_argument('--model', required=True, choices=list_models(), help='dtf_jax model name.')
  parser.add_argument('--clip-length', type=int_at_least(1), required=True,
                      help='input frames T.')
  parser.add_argument('--num-classes', type=int_at_least(1), required=True,
                      help='classifier outputs.')
  parser.add_argument('--input', required=True, help='.pth, .pt or .safetensors checkpoint.')
  parser.add_argument('--output', required=True, help='directory to write.')
  parser.add_argument('--stem-init', default='center', choices=STEM_INITS,
                      help='ImageNet: inflate the stem / patch embedding with the 2D kernel at the '
                           'middle frame (center, the released code) or spread over all frames '
                           '(average, I3D).')
  parser.add_argument('--keep-head', action='store_true',
                      help='ImageNet: keep the classifier (needs --num-classes equal to its size).')
  parser.add_argument('--drop-patch-norm', action='store_true',
                      help='ImageNet Swin: drop the patch-embedding norm (patch_norm=False, the '
                           'official architecture; the released training code lost it).')
  parser.add_argument('--class-names', default=None,
                      help="file with the classes, recorded in meta.json: a label_map.json "
                           "({name: index}) or a text file with one name per line.")
  parser.add_argument('--seed', type=int, default=0,
                      help='initialisation of the arrays the file does not provide.')
  parser.add_argument('--model-arg', action='append', default=[], metavar='KEY=VALUE',
                      help='extra create_model argument, e.g. image_size=224 (Python literal).')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing output.')
  return parser.parse_args(argv)


def read_class_names(path: str):
  """``label_map.json`` (``{name: index}``) or one name per line -> list of names by index."""
  import json  # pylint: disable=import-outside-toplevel
  text = storage.path(path).read_text()
  if path.endswith('.json'):
    mapping = json.loads(text)
    return [name for name, _ in sorted(mapping.items(), key=lambda item: item[1])]
  return [line.strip() for line in text.splitlines() if line.strip()]


def main(argv=None):
  args = parse_args(argv)
  # Heavy imports after argument parsing, so that --help is instant.
  from dtf_jax import convert  # pylint: disable=import-outside-toplevel
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
  class_names = None
  if args.class_names:
    try:
      class_names = read_class_names(args.class_names)
    except (OSError, ValueError) as e:
      sys.exit(f'--class-names {args.class_names}: {e}')
    if len(class_names) != args.num_classes:
      sys.exit(f'--class-names {args.class_names}: {len(class_names)} names for '
               f'--num-classes {args.num_classes}')

  try:
    output = storage.path(args.output)
  except ValueError as e:
    sys.exit(f'--output: {e}')
  if output.exists() and not output.is_dir():
    sys.exit(f'--output {output}: is an existing file, not a directory')
  if (output / 'meta.json').exists() and not args.overwrite:  # before the slow part
    sys.exit(f'--output {output} holds converted weights; pass --overwrite to replace them')

  from dtf_jax.models import create_model  # pylint: disable=import-outside-toplevel
  try:  # the model arguments, before reading a large file
    create_model(args.model, num_classes=args.num_classes, clip_length=args.clip_length,
                 **kwargs)
  except ValueError as e:
    sys.exit(f'--model {args.model} {" ".join("--model-arg " + a for a in args.model_arg)}: '
             f'{e}')

  start = time.time()
  print(f'Reading {args.input}')
  try:
    state, sha256 = convert.read_state_dict(args.input, return_sha256=True)
  except (FileNotFoundError, ImportError, ValueError, convert.CheckpointReadError) as e:
    sys.exit(str(e))
  try:
    variables, report = convert.convert_with_report(
        args.model, state, num_classes=args.num_classes, clip_length=args.clip_length,
        source=args.source, stem_init=args.stem_init, keep_head=args.keep_head,
        drop_patch_norm=args.drop_patch_norm, seed=args.seed, **kwargs)
  except (convert.ConversionError, ValueError) as e:
    sys.exit(str(e))
  print(report.format())
  has_patch_norm = 'patch_embed_norm' in variables['params']
  if has_patch_norm:  # inflation switched it on
    kwargs['patch_norm'] = True
  source = {'kind': report.source, 'layout': report.layout, 'file': args.input, 'sha256': sha256}
  if report.source != 'dtf':
    source.update(stem_init=args.stem_init, keep_head=args.keep_head, seed=args.seed)
  if report.source == 'imagenet_swin':
    source['patch_norm'] = 'kept' if has_patch_norm else 'dropped'
  model_kwargs = dict(num_classes=args.num_classes, clip_length=args.clip_length, **kwargs)
  out = save_pretrained(args.output, args.model, model_kwargs, variables,
                        overwrite=args.overwrite, source=source, class_names=class_names)
  print(f'Wrote {out} in {time.time() - start:.1f} s')


if __name__ == '__main__':
  sys.exit(errors.run_main(main))

"""Lists the configs of ``experiments/paper/`` with the paper's figures and ours.

    python experiments/paper_gflops.py [--size 256] [--markdown]

For each config: its table and row, the paper's Kinetics-400 top-1 and GFLOPs (``PAPER``), and
ours per view (``clip_length x size²``, batch 1), counted from the jaxpr by ``dtf_jax.flops`` in
the paper's convention and in ours, with the parameters (the official models also count DTF's
fixed correlation weights; ``dtf_jax.tools.model_info`` reports both). Nothing is compiled.
"""

import argparse
import glob
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dtf_jax import flops  # noqa: E402
from dtf_jax.train.config import build_model  # noqa: E402

PAPER_DIR = os.path.join(ROOT, 'experiments', 'paper')


def paper_configs():
  """``[(name, module)]`` of every config in ``experiments/paper/`` (files with ``PAPER``)."""
  out = []
  for path in sorted(glob.glob(os.path.join(PAPER_DIR, '*.py'))):
    name = os.path.splitext(os.path.basename(path))[0]
    module = importlib.import_module(f'experiments.paper.{name}')
    if hasattr(module, 'PAPER'):
      out.append((name, module))
  return out


def measure(config, size: int):
  """``(GFLOPs by convention, parameters)`` of the config's model per ``clip x size²`` view."""
  model = build_model(config, config.data.num_classes)
  view = jax.ShapeDtypeStruct((1, config.data.clip_length, size, size, 3), jnp.float32)
  macs, shapes = flops.count_model_macs(model, view)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))
  return {c: flops.total_macs(macs, c) / 1e9 for c in flops.CONVENTIONS}, params


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', type=int, default=256, help='view size (default 256, as the '
                      "paper's GFLOPs of DTF-Net).")
  args = parser.parse_args(argv)
  print(f'| config | table | row | temporal | stages | paper K400 top-1 | paper GFLOPs | '
        f'GFLOPs (paper convention / ours), 16x{args.size}² | params (M) |')
  print('|---|---|---|---|---|---|---|---|---|')
  for name, module in paper_configs():
    config = module.get_config()
    gflops, params = measure(config, args.size)
    p = module.PAPER
    temporal = config.model.get('temporal', 'none')
    stages = ''.join(map(str, config.model.get('dtf_stages', ()))) or '-'
    show = lambda v: '-' if v is None else v  # noqa: E731
    print(f'| `{name}` | {p["table"]} | {p["row"]} | `{temporal}` | {stages} | '
          f'{show(p["top1"])} | {show(p["gflops"])} | {gflops["paper"]:.2f} / '
          f'{gflops["ours"]:.2f} | {params / 1e6:.2f} |', flush=True)


if __name__ == '__main__':
  main()

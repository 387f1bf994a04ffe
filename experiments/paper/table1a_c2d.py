"""Table 1a, res5: 2D (C2D, no temporal module). Paper (DTF, ECCV 2022; SPEC.md §4): K400 top-1
72.0, GFLOPs 23 (the C2D-R50 of SPEC §4).

    python main.py --config=experiments/paper/table1a_c2d.py --workdir=runs/table1a_c2d
"""

from experiments.paper import common

PAPER = dict(table='1a', row='2D (C2D, no temporal module)', top1=72.0, gflops=23)


def get_config(arg=None):
  return common.paper_config('none', common.RES5, arg)

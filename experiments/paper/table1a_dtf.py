"""Table 1a, res5: DTF (also Table 1b: FA + correlation). Paper (DTF, ECCV 2022; SPEC.md §4): K400
top-1 75.7, GFLOPs not reported for this row.

    python main.py --config=experiments/paper/table1a_dtf.py --workdir=runs/table1a_dtf
"""

from experiments.paper import common

PAPER = dict(table='1a', row='DTF (also Table 1b: FA + correlation)', top1=75.7, gflops=None)


def get_config(arg=None):
  return common.paper_config('dtf', common.RES5, arg)

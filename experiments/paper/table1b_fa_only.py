"""Table 1b, res5: FA only (no correlation to the estimator). Paper (DTF, ECCV 2022; SPEC.md §4):
K400 top-1 75.4, GFLOPs not reported for this row.

    python main.py --config=experiments/paper/table1b_fa_only.py --workdir=runs/table1b_fa_only
"""

from experiments.paper import common

PAPER = dict(table='1b', row='FA only (no correlation to the estimator)', top1=75.4, gflops=None)


def get_config(arg=None):
  return common.paper_config('dtf_fa_only', common.RES5, arg)

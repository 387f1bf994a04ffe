"""Table 1b, res5: without frame-wise aggregation. Paper (DTF, ECCV 2022; SPEC.md §4): K400 top-1
74.9, GFLOPs not reported for this row.

    python main.py --config=experiments/paper/table1b_without_fa.py \\
        --workdir=runs/table1b_without_fa
"""

from experiments.paper import common

PAPER = dict(table='1b', row='without frame-wise aggregation', top1=74.9, gflops=None)


def get_config(arg=None):
  return common.paper_config('dtf_no_fa', common.RES5, arg)

"""Table 1a, res5: fixed frequency filter (DTF_F). Paper (DTF, ECCV 2022; SPEC.md §4): K400 top-1
75.0, GFLOPs not reported for this row.

    python main.py --config=experiments/paper/table1a_fixed_filter.py \\
        --workdir=runs/table1a_fixed_filter
"""

from experiments.paper import common

PAPER = dict(table='1a', row='fixed frequency filter (DTF_F)', top1=75.0, gflops=None)


def get_config(arg=None):
  return common.paper_config('dtf_fixed', common.RES5, arg)

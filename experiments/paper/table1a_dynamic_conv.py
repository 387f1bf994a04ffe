"""Table 1a, res5: dynamic 1D conv (DTF_1d+). Paper (DTF, ECCV 2022; SPEC.md §4): K400 top-1 74.2,
GFLOPs not reported for this row.

    python main.py --config=experiments/paper/table1a_dynamic_conv.py \\
        --workdir=runs/table1a_dynamic_conv
"""

from experiments.paper import common

PAPER = dict(table='1a', row='dynamic 1D conv (DTF_1d+)', top1=74.2, gflops=None)


def get_config(arg=None):
  return common.paper_config('dtf_1d_dynamic', common.RES5, arg)

"""Table 1c, all stages: temporal conv. Paper (DTF, ECCV 2022; SPEC.md §4): K400 top-1 74.6, GFLOPs
None (not in SPEC.md).

    python main.py --config=experiments/paper/table1c_temporal_conv.py \\
        --workdir=runs/table1c_temporal_conv
"""

from experiments.paper import common

PAPER = dict(table='1c', row='temporal conv', top1=74.6, gflops=None)


def get_config(arg=None):
  return common.paper_config('dtf_1d', common.ALL_STAGES, arg)

"""Table 1c, all stages: temporal difference (TDN-style). Paper (DTF, ECCV 2022; SPEC.md §4): K400
top-1 76.6, GFLOPs not reported for this row.

    python main.py --config=experiments/paper/table1c_temporal_difference.py \\
        --workdir=runs/table1c_temporal_difference
"""

from experiments.paper import common

PAPER = dict(table='1c', row='temporal difference (TDN-style)', top1=76.6, gflops=None)


def get_config(arg=None):
  return common.paper_config('temporal_difference', common.ALL_STAGES, arg)

"""Table 1c, all stages: temporal shift (TSM). Paper (DTF, ECCV 2022; SPEC.md §4): K400 top-1 74.8,
GFLOPs not reported for this row.

    python main.py --config=experiments/paper/table1c_temporal_shift.py \\
        --workdir=runs/table1c_temporal_shift
"""

from experiments.paper import common

PAPER = dict(table='1c', row='temporal shift (TSM)', top1=74.8, gflops=None)


def get_config(arg=None):
  return common.paper_config('temporal_shift', common.ALL_STAGES, arg)

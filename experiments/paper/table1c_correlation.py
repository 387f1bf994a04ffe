"""Table 1c, all stages: correlation (CorrNet-style). Paper (DTF, ECCV 2022; SPEC.md §4): K400
top-1 75.1, GFLOPs not reported for this row.

    python main.py --config=experiments/paper/table1c_correlation.py \\
        --workdir=runs/table1c_correlation
"""

from experiments.paper import common

PAPER = dict(table='1c', row='correlation (CorrNet-style)', top1=75.1, gflops=None)


def get_config(arg=None):
  return common.paper_config('correlation', common.ALL_STAGES, arg)

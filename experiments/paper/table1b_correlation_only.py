"""Table 1b, res5: correlation only (to the estimator, features not aggregated). Paper (DTF, ECCV
2022; SPEC.md §4): K400 top-1 75.2, GFLOPs not reported for this row.

    python main.py --config=experiments/paper/table1b_correlation_only.py \\
        --workdir=runs/table1b_correlation_only
"""

from experiments.paper import common

PAPER = dict(table='1b', top1=75.2, gflops=None,
             row='correlation only (to the estimator, features not aggregated)')


def get_config(arg=None):
  return common.paper_config('dtf_corr_only', common.RES5, arg)

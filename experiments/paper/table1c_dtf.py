"""Table 1c, all stages: DTF (DTF-Net R50, as configs/dtf_r50.py). Paper (DTF, ECCV 2022; SPEC.md
§4): K400 top-1 77.7, GFLOPs 25 (DTF-Net R50 16f, SPEC §4).

    python main.py --config=experiments/paper/table1c_dtf.py --workdir=runs/table1c_dtf
"""

from experiments.paper import common

PAPER = dict(table='1c', row='DTF (DTF-Net R50, as configs/dtf_r50.py)', top1=77.7, gflops=25)


def get_config(arg=None):
  return common.paper_config('dtf', common.ALL_STAGES, arg)

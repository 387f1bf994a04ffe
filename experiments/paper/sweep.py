"""The stage-and-length sweep: one temporal module in some stages, at some clip length (the axes of
the paper's Fig. 6 and of its res5 / all-stage tables; the paper's figures for the intermediate
points are not recorded in SPEC.md).

    python main.py --config=experiments/paper/sweep.py:temporal=dtf_1d,stages=34,frames=32 \\
        --workdir=runs/sweep_dtf_1d_s34_f32

``temporal``: a name of ``dtf_jax.layers.temporal`` (default dtf); ``stages``: the stages' digits
(``4`` = res5 only, ``1234`` = all, the default); ``frames``: 16 (default), 32 or 64; ``dataset``:
k400 (default), ssv2 or ssv1.
"""

from configs import base
from experiments.paper import common

PAPER = dict(table='Fig. 6', row='stage and clip-length sweep', top1=None, gflops=None)


def get_config(arg=None):
  a = base.parse_arg(arg, temporal='dtf', stages=1234, frames=16, dataset='k400')
  stages = tuple(int(d) for d in str(a['stages']))
  if not stages or any(d not in common.ALL_STAGES for d in stages):
    raise ValueError(f'config argument {arg!r}: stages must be digits of 1-4, e.g. 4 or 234')
  return common.paper_config(a['temporal'], stages, f'{a["frames"]},{a["dataset"]}')

"""What every config of ``experiments/paper/`` shares: the DTF-Net R50 Kinetics-400 recipe
(``configs/base.py``: 16 frames, 224² train crops, 10 clips x 3 crops of 256²) with one temporal
module (``dtf_jax.layers.temporal``) in the chosen stages.

Each row config sets ``PAPER`` (the paper's table, row and Kinetics-400 top-1 from SPEC.md
section 4; ``None`` where the paper's figure is not recorded there) and ``get_config`` returns
``paper_config(...)``. ``experiments/paper_gflops.py`` lists them with our GFLOPs.
"""

from configs import base

RES5, ALL_STAGES = (4,), (1, 2, 3, 4)


def paper_config(temporal: str, dtf_stages=ALL_STAGES, arg=None):
  """The recipe with ``temporal`` in ``dtf_stages`` (``'none'``: the C2D-R50 baseline).

  ``arg``: frames and dataset as the model configs take them (``'32'``, ``'16,ssv2'``)."""
  c = base.resnet_config('c2d_r50' if temporal == 'none' else 'dtf_r50', arg)
  if temporal != 'none':
    c.model.temporal = temporal
    c.model.dtf_stages = tuple(dtf_stages)
  return c

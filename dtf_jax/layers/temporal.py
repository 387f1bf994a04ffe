"""Temporal modules that the backbones can host: a name -> (module class, fixed arguments) registry.

Every temporal module maps ``B T H W C -> B T H W C`` and is called as ``module(x, train)``.
The backbones build them with :func:`make_temporal`. The names, with the row of the paper (DTF,
ECCV 2022, Table 1; ``res5`` rows with ``dtf_stages=(4,)``, the comparison of temporal modelling
with all stages) that each reproduces:

- ``none``: no temporal module, the C2D backbone ("2D").
- ``dtf``: the DTF block (``layers/dtf.py``) ("DTF").
- ``dtf_no_fa``: DTF without frame-wise aggregation or correlation input ("without FA").
- ``dtf_fa_only``: DTF whose estimator gets no correlation input ("FA only").
- ``dtf_corr_only``: DTF whose estimator gets the correlation, features not aggregated
  ("correlation only").
- ``dtf_fixed``: DTF with a learned static filter per bin and channel, FA kept ("DTF_F", "fixed
  frequency filter").
- ``dtf_1d``: a learned temporal 1D convolution, kernel 3 ("DTF_1d", "temporal conv").
- ``dtf_1d_dynamic``: a temporal 1D convolution with a kernel predicted per location ("DTF_1d+",
  "dynamic 1D conv").
- ``temporal_shift``: the temporal shift of TSM ("temporal shift").
- ``correlation``: correlation features with the next frame, after CorrNet ("correlation").
- ``temporal_difference``: adjacent-frame feature differences, after TDN ("temporal difference").

The baselines are in ``layers/baselines.py``, which says what each simplifies.
"""

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn

from dtf_jax.layers.baselines import (Correlation, DynamicTemporalConv, TemporalConv,
                                      TemporalDifference, TemporalShift)
from dtf_jax.layers.dtf import DTFBlock

TEMPORAL_MODULES = {
    'none': None,
    'dtf': (DTFBlock, {}),
    'dtf_no_fa': (DTFBlock, dict(aggregation=False, correlation=False)),
    'dtf_fa_only': (DTFBlock, dict(correlation=False)),
    'dtf_corr_only': (DTFBlock, dict(aggregation=False)),
    'dtf_fixed': (DTFBlock, dict(fixed_filter=True)),
    'dtf_1d': (TemporalConv, {}),
    'dtf_1d_dynamic': (DynamicTemporalConv, {}),
    'temporal_shift': (TemporalShift, {}),
    'correlation': (Correlation, {}),
    'temporal_difference': (TemporalDifference, {}),
}

# The names whose module has DTF's filter estimator (and so its group-factor constraint).
FILTER_ESTIMATOR_NAMES = tuple(
    name for name, entry in TEMPORAL_MODULES.items()
    if entry is not None and entry[0] is DTFBlock and not entry[1].get('fixed_filter', False))


def make_temporal(kind: str, *, dtype: Any, name: str, wrap: Optional[Callable] = None,
                  **options: Any) -> Optional[nn.Module]:
  """Builds the temporal module ``kind`` (``None`` for ``'none'``).

  ``options`` are the backbone's settings for temporal modules (e.g. ``fa_impl``); each module
  takes those that are its attributes and ignores the others. The registry's fixed arguments of
  ``kind`` are always applied. ``wrap`` (class -> class, e.g. ``nn.remat``) is applied to the
  module's class first.
  """
  if kind not in TEMPORAL_MODULES:
    raise ValueError(f'Unknown temporal module {kind!r}; known: {sorted(TEMPORAL_MODULES)}.')
  entry = TEMPORAL_MODULES[kind]
  if entry is None:
    return None
  cls, fixed = entry
  fields = {f.name for f in dataclasses.fields(cls)}
  cls = wrap(cls) if wrap is not None else cls
  kwargs = {k: v for k, v in options.items() if k in fields}
  return cls(dtype=dtype, name=name, **dict(kwargs, **fixed))

"""Temporal modules that the backbones can host: a name -> module-class registry.

Every temporal module maps ``B T H W C -> B T H W C`` and is called as ``module(x, train=...)``.
The backbones build them with :func:`make_temporal`; ``'none'`` gives the plain C2D backbone.
"""

from typing import Any, Optional

import flax.linen as nn

from dtf_jax.layers.dtf import DTFBlock

TEMPORAL_MODULES = {
    'none': None,
    'dtf': DTFBlock,
}


def make_temporal(kind: str, *, dtype: Any, name: str) -> Optional[nn.Module]:
  """Builds the temporal module ``kind`` (``None`` for ``'none'``)."""
  if kind not in TEMPORAL_MODULES:
    raise ValueError(f'Unknown temporal module {kind!r}; known: {sorted(TEMPORAL_MODULES)}.')
  cls = TEMPORAL_MODULES[kind]
  return None if cls is None else cls(dtype=dtype, name=name)

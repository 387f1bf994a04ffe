"""Temporal modules that the backbones can host: a name -> module-class registry.

Every temporal module maps ``B T H W C -> B T H W C`` and is called as ``module(x, train=...)``.
The backbones build them with :func:`make_temporal`; ``'none'`` gives the plain C2D backbone.
"""

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn

from dtf_jax.layers.dtf import DTFBlock

TEMPORAL_MODULES = {
    'none': None,
    'dtf': DTFBlock,
}


def make_temporal(kind: str, *, dtype: Any, name: str, wrap: Optional[Callable] = None,
                  **options: Any) -> Optional[nn.Module]:
  """Builds the temporal module ``kind`` (``None`` for ``'none'``).

  ``options`` are the backbone's settings for temporal modules (e.g. ``fa_impl``); each module
  takes those that are its attributes and ignores the others. ``wrap`` (class -> class, e.g.
  ``nn.remat``) is applied to the module's class first.
  """
  if kind not in TEMPORAL_MODULES:
    raise ValueError(f'Unknown temporal module {kind!r}; known: {sorted(TEMPORAL_MODULES)}.')
  cls = TEMPORAL_MODULES[kind]
  if cls is None:
    return None
  fields = {f.name for f in dataclasses.fields(cls)}
  cls = wrap(cls) if wrap is not None else cls
  return cls(dtype=dtype, name=name, **{k: v for k, v in options.items() if k in fields})

"""Layers: the DTF block, the baseline temporal modules, PyTorch-semantics batch norm, the
temporal-module registry."""

from dtf_jax.layers.dtf import DTFBlock
from dtf_jax.layers.norm import BatchNorm
from dtf_jax.layers.temporal import TEMPORAL_MODULES, make_temporal

"""dtf-jax: Dynamic Temporal Filtering (DTF-Net, DTF-Transformer) in JAX/Flax."""

__version__ = "0.1.0"

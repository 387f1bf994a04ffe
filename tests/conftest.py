"""Test-session settings, applied before any test module imports JAX."""

import os

# CPU only, also where the TPU extra (libtpu) is installed: JAX then skips its TPU backend, which
# on a host without TPU chips fails noisily and takes libtpu's lock file. The TPU compile tests
# reach libtpu through dtf_jax.tpu_target, which needs neither.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def pytest_configure(config):
  config.addinivalue_line('markers', 'tpu_compile: compiles for TPU topologies with libtpu (the '
                          '[tpu] extra); skipped without it')

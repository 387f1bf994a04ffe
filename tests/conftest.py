"""Test-session settings, applied before any test module imports JAX."""

import os

import pytest

# CPU only, also where the TPU extra (libtpu) is installed: JAX then skips its TPU backend, which
# on a host without TPU chips fails noisily and takes libtpu's lock file. The TPU compile tests
# reach libtpu through dtf_jax.tpu_target, which needs neither.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def pytest_addoption(parser):
  parser.addoption('--slow', action='store_true',
                   help='also run the tests marked slow (end-to-end trainer, multi-process and '
                        'sharding runs; about 25 more minutes on 2 cores)')


def pytest_configure(config):
  config.addinivalue_line('markers', 'tpu_compile: compiles for TPU topologies with libtpu (the '
                          '[tpu] extra); skipped without it')
  config.addinivalue_line('markers', 'slow: an end-to-end run of minutes; skipped unless '
                          '--slow (or -m slow) is given')


def pytest_collection_modifyitems(config, items):
  if config.getoption('--slow') or 'slow' in (config.getoption('-m') or ''):
    return
  skip = pytest.mark.skip(reason='slow end-to-end test: run with --slow')
  for item in items:
    if 'slow' in item.keywords:
      item.add_marker(skip)

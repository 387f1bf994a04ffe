#!/usr/bin/env bash
# Runs the test suite: creates .venv if missing, installs dtf_jax with its extras, runs pytest.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv"
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 resolves to the CPU wheel on this machine's disk; [tpu] brings libtpu, with which
# the tpu_compile tests compile for TPU topologies on this CPU host (they skip without it).
.venv/bin/python -m pip install -q -e '.[torch,dev,tpu]'
exec .venv/bin/python -m pytest tests "$@"

#!/usr/bin/env bash
# Quickstart on a fresh machine with Python 3.11: creates .venv if missing, installs dtf_jax,
# generates the synthetic dataset (unless up to date), trains configs/quickstart.py on the CPU,
# evaluates the saved checkpoint and prints its top-1.
# Usage: bash scripts/quickstart.sh [extra main.py flags, e.g. --config.model.name=c2d_r50]
# Environment: WORKDIR (default runs/quickstart), DATA (default data/synthetic).
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${WORKDIR:-runs/quickstart}
DATA=${DATA:-data/synthetic}
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv"
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
# Does nothing if $DATA is up to date; replaces data of an older generator version.
.venv/bin/python -m dtf_jax.data.synthetic --output "$DATA" --overwrite
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
.venv/bin/python main.py --config=configs/quickstart.py --workdir="$WORKDIR" --mode=train \
    --config.data.dataset="tfrecord:$DATA/tfrecords" "$@"
.venv/bin/python main.py --config=configs/quickstart.py --workdir="$WORKDIR" --mode=eval \
    --config.data.dataset="tfrecord:$DATA/tfrecords" "$@" | tail -1

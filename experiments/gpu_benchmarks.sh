#!/usr/bin/env bash
# GPU figures for the README: parity tests on the GPU and DTF vs C2D training-step speed.
# Usage (repo root, a CUDA jax installed): bash experiments/gpu_benchmarks.sh [OUT_DIR]
# Each part has its own time limit so that one slow part cannot hide the others' results.
set -uo pipefail
OUT=${1:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  | tee -a "$OUT/gpu.txt"
# Parity with the PyTorch reference on the GPU, float32 at full matmul precision.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 170 $PY -m pytest tests/test_parity.py -q -x \
  -p no:cacheprovider 2>&1 | tail -8 | tee "$OUT/parity.txt"
# Speed, bfloat16 compute: forward and forward+backward per clip, DTF / C2D ratios.
timeout 150 $PY -m dtf_jax.tools.benchmark_model --model dtf_r50 --compare c2d_r50 \
  --clip-length 16 --size 224 --batch 16 --dtype bfloat16 --repeats 10 2>&1 | tee "$OUT/r50.txt"
timeout 170 $PY -m dtf_jax.tools.benchmark_model --model dtf_swin_b --compare c2d_swin_b \
  --clip-length 64 --size 224 --batch 2 --dtype bfloat16 --repeats 5 2>&1 | tee "$OUT/swin_b.txt"

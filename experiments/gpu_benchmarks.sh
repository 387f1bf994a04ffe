#!/usr/bin/env bash
# GPU figures for the README: the parity and frame-wise-aggregation tests on the GPU (the Pallas
# kernels compiled and checked there), then DTF vs C2D speed, MFU and bytes accessed for every
# implementation of the frame-wise aggregation (fa_impl), R50 and Swin-B.
# Usage (repo root, a CUDA jax installed): bash experiments/gpu_benchmarks.sh [OUT_DIR]
# Everything is written under OUT_DIR. Each part has its own time limit so that one slow part
# cannot hide the others' results; together at most 8 minutes on one H200. Each benchmark_model
# run compiles its models in parallel threads (one per fa_impl, plus C2D), then times them
# interleaved.
set -uo pipefail
OUT=${1:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  | tee -a "$OUT/gpu.txt"
# Parity with the PyTorch reference on the GPU, float32 at full matmul precision: the default
# fa_impl everywhere, 'xla' and 'pallas' in the tiny DTF-Swin, and 'pallas' in the real DTF-R50.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 100 $PY -m pytest tests/test_parity.py -q -x \
  -p no:cacheprovider 2>&1 | tail -8 | tee "$OUT/parity.txt"
JAX_DEFAULT_MATMUL_PRECISION=highest DTF_TEST_FA_IMPL=pallas timeout 60 $PY -m pytest \
  tests/test_parity.py -q -x -p no:cacheprovider -k dtf_r50_parity 2>&1 | tail -4 \
  | tee "$OUT/parity_r50_pallas.txt"
# Every fa_impl against the float64 definition (values, gradients, bf16), the kernels compiled
# for this GPU.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 90 $PY -m pytest tests/test_aggregation.py -q \
  -p no:cacheprovider 2>&1 | tail -8 | tee "$OUT/aggregation.txt"
# Speed, MFU and bytes accessed with bfloat16 compute, per clip, each fa_impl against C2D.
timeout 80 $PY -m dtf_jax.tools.benchmark_model --model dtf_r50 --compare c2d_r50 \
  --clip-length 16 --size 224 --batch 16 --dtype bfloat16 --repeats 5 --warmup 1 \
  --fa-impl scan,xla,pallas 2>&1 | tee "$OUT/r50.txt"
timeout 150 $PY -m dtf_jax.tools.benchmark_model --model dtf_swin_b --compare c2d_swin_b \
  --clip-length 64 --size 224 --batch 2 --dtype bfloat16 --repeats 3 --warmup 1 \
  --fa-impl scan,xla,pallas 2>&1 | tee "$OUT/swin_b.txt"

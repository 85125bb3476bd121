#!/usr/bin/env bash
# The one GPU check: CUDA tests, then the kernel benchmarks; everything lands under $OUT (or benchmarks/results).
# Run from the repository root on a machine with a GPU and torch, triton, transformers installed:
#     PYTHONPATH=. bash benchmarks/gpu_check.sh
# Sized to finish in under 9 minutes on one H200.
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-.}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu_env.txt"
timeout 240 python -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels.py tests/test_cuda.py \
  2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 240 python -m benchmarks.bench_kernels --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
# Streaming on the GPU: 4 layers of LLaMA-2-7B shapes (2.2 GB bf16), peak device memory per phase.
python -c "print(' '.join(f'word{i % 101} and {i % 17} more.' for i in range(60000)))" > /tmp/amp_calib.txt
timeout 150 python -m benchmarks.bench_stream --layers 4 --device cuda --calib /tmp/amp_calib.txt \
  --cache /tmp/amp_bench_ckpt --out "$OUT" 2>&1 | tee -a "$OUT/gpu_bench.log"
stream_rc=${PIPESTATUS[0]}
bench_rc=$(( bench_rc || stream_rc ))
echo "tests rc=$tests_rc bench rc=$bench_rc" | tee -a "$OUT/gpu_env.txt"
exit $(( tests_rc || bench_rc ))

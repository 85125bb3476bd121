#!/usr/bin/env bash
# The one GPU check: CUDA tests, then the kernel, streaming and inference benchmarks.
# Run from the repository root on a machine with a GPU and torch, triton, transformers installed:
#     PYTHONPATH=. bash benchmarks/gpu_check.sh
# Results go to benchmarks/results; when $OUT is set (the device tool's output folder, which returns at most
# 8 files) everything is packed into $OUT/gpu_results.tar.gz, with the logs beside it.
# Sized to finish in under 10 minutes on one H200 (every step has its own timeout; 580 s in all).
set -uo pipefail
if [ -n "${OUT:-}" ]; then RES=$(mktemp -d); else RES=benchmarks/results; fi
LOGS="${OUT:-$RES}"
mkdir -p "$RES" "$LOGS"
export PYTHONPATH="${PYTHONPATH:-.}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$LOGS/gpu_env.txt"
# test_inference and test_per_layer (minus the tests that read ../shared/data, absent there) also check that
# accelerate_ and per-layer checkpoints work with the GPU machine's own transformers version.
timeout 200 python -m pytest -q -s -p no:cacheprovider -o addopts="" tests/test_kernels.py tests/test_cuda.py \
  tests/test_inference.py tests/test_per_layer.py tests/test_compensate.py tests/test_recover.py \
  -k "not round_trip and not amp_eval_and_info and not bad_allocation and not plain_config and not one_command" \
  2>&1 | tee "$LOGS/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 140 python -m benchmarks.bench_kernels --out "$RES" 2>&1 | tee "$LOGS/gpu_bench.log"
kernels_rc=${PIPESTATUS[0]}
# Streaming on the GPU: 4 layers of LLaMA-2-7B shapes (2.2 GB bf16), peak device memory per phase.
python -c "print(' '.join(f'word{i % 101} and {i % 17} more.' for i in range(60000)))" > /tmp/amp_calib.txt
timeout 120 python -m benchmarks.bench_stream --layers 4 --device cuda --calib /tmp/amp_calib.txt \
  --cache /tmp/amp_bench_ckpt --out "$RES" 2>&1 | tee -a "$LOGS/gpu_bench.log"
stream_rc=${PIPESTATUS[0]}
# Inference: single LLaMA-2-7B / LLaMA-3-8B layers at 0/20/30 %, stock vs accelerate_, and the kernels alone.
timeout 120 python -m benchmarks.bench_infer --device cuda --quick --out "$RES" 2>&1 | tee -a "$LOGS/gpu_bench.log"
infer_rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then tar -czf "$OUT/gpu_results.tar.gz" -C "$RES" .; fi
echo "tests rc=$tests_rc kernels rc=$kernels_rc stream rc=$stream_rc infer rc=$infer_rc" | tee -a "$LOGS/gpu_env.txt"
exit $(( tests_rc || kernels_rc || stream_rc || infer_rc ))

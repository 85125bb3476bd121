#!/usr/bin/env bash
# The one GPU check: CUDA tests (the kernels against their twins on the GPU, the compile check with the machine's
# Triton), then the kernel benchmarks (each kernel against its stock counterpart, the decode kernel at 1k/8k/32k
# cached tokens), the compiled-resources table, a streamed prune of a 7B-shaped checkpoint with the default recipe
# on the GPU (wall time per phase, peak device memory) and the inference benchmark.
# Run from the repository root on a machine with a GPU and torch, triton, transformers installed:
#     PYTHONPATH=. bash benchmarks/gpu_check.sh
# Results go to benchmarks/results; when $OUT is set (the device tool's output folder, which returns at most
# 8 files) everything is packed into $OUT/gpu_results.tar.gz, with the logs beside it.
# Sized to finish in under 10 minutes on one H200 (every step has its own timeout; 590 s in all).
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
timeout 180 python -m pytest -q -s -p no:cacheprovider -o addopts="" -m "not runtime" tests/test_kernels.py tests/test_cuda.py \
  tests/test_compiled.py tests/test_inference.py tests/test_per_layer.py tests/test_compensate.py tests/test_recover.py \
  -k "not round_trip and not amp_eval_and_info and not bad_allocation and not plain_config and not one_command" \
  2>&1 | tee "$LOGS/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 110 python -m benchmarks.bench_kernels --out "$RES" 2>&1 | tee "$LOGS/gpu_bench.log"
kernels_rc=${PIPESTATUS[0]}
# The compiled table with this machine's Triton (a subset: the full one takes minutes).
timeout 60 python -m benchmarks.bench_compiled --families LLaMA-3-8B,LLaMA-3-70B,Gemma-2-9B --dtypes bf16 \
  --out "$RES" 2>&1 | tail -12 | tee -a "$LOGS/gpu_bench.log"
compiled_rc=${PIPESTATUS[0]}
# --multiple-of: the MLP kernels at odd and rounded 7B/8B widths, compiled and timed (do_bench), cuBLAS beside them.
timeout 30 python -m benchmarks.bench_multiple_of --parts compiled --device cuda --out "$RES" 2>&1 | tail -3 \
  | tee -a "$LOGS/gpu_bench.log"
multiple_rc=${PIPESTATUS[0]}
# Streaming on the GPU with the default recipe (64 x 512 C4 tokens: the bundled sample, sequential, refit):
# 4 layers of LLaMA-2-7B shapes (2.2 GB bf16), wall time and peak device memory per phase.
timeout 120 python -m benchmarks.bench_stream --layers 4 --device cuda --calib c4 --nsamples 64 --seqlen 512 \
  --cache /tmp/amp_bench_ckpt --skip-in-memory --out "$RES" 2>&1 | tee -a "$LOGS/gpu_bench.log"
stream_rc=${PIPESTATUS[0]}
# Inference: single LLaMA-2-7B / LLaMA-3-8B layers at 0/20/30 %, stock vs accelerate_, and the kernels alone.
timeout 90 python -m benchmarks.bench_infer --device cuda --quick --out "$RES" 2>&1 | tee -a "$LOGS/gpu_bench.log"
infer_rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then tar -czf "$OUT/gpu_results.tar.gz" -C "$RES" .; fi
echo "tests rc=$tests_rc kernels rc=$kernels_rc compiled rc=$compiled_rc multiple_of rc=$multiple_rc stream rc=$stream_rc infer rc=$infer_rc" \
  | tee -a "$LOGS/gpu_env.txt"
exit $(( tests_rc || kernels_rc || compiled_rc || multiple_rc || stream_rc || infer_rc ))

"""The exports run in the real serving engines: vLLM's CPU build serves the DeciLM export and llama.cpp runs the
GGUF export of a small random LLaMA, dense, uniform and per-layer with single query heads (padded), with greedy
continuations identical to transformers' and prompt log-probabilities within 1e-3. Marked `runtime`: the engines
live in their own environments under $AMP_CACHE_DIR/runtimes, which `.ci/run` installs first
(`python -m benchmarks.serve_check --install`); SmolLM2 itself: `python -m benchmarks.serve_check`."""
import pytest

from benchmarks import serve_check


@pytest.mark.runtime
@pytest.mark.parametrize("runtime", ["vllm", "llamacpp"])
def test_exports_run_in_the_serving_engine(runtime):
    assert serve_check.venv_python(runtime).is_file(), f"{runtime} is not installed: python -m benchmarks." \
                                                       f"serve_check --install --runtimes {runtime}"
    rc = serve_check.main(["--tiny", "--runtimes", runtime, "--modes", "uniform/group,depth/query",
                           "--bench-tokens", "8", "--no-record"])
    assert rc == 0

"""The exports run in the real serving engines: vLLM's CPU build serves the `--format vllm` export (plain, DeciLM or
the amp-vllm plugin's per-layer form) and llama.cpp runs the GGUF export of small random models of every family
(LLaMA, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3, Mixtral, Qwen3-MoE), dense, uniform and per-layer with single query
heads, with greedy continuations identical to transformers' and prompt log-probabilities within 1e-3; a pair a
runtime cannot run must be listed with its reason (serve_check.KNOWN_LIMITS). Marked `runtime`: the engines live in
their own environments under $AMP_CACHE_DIR/runtimes, which `.ci/run` installs first (`python -m
benchmarks.serve_check --install`); SmolLM2 itself: `python -m benchmarks.serve_check`."""
import pytest

from benchmarks import serve_check


@pytest.mark.runtime
@pytest.mark.parametrize("runtime", ["vllm", "llamacpp"])
def test_exports_of_every_family_run_in_the_serving_engine(runtime):
    assert serve_check.venv_python(runtime).is_file(), f"{runtime} is not installed: python -m benchmarks." \
                                                       f"serve_check --install --runtimes {runtime}"
    rc = serve_check.main(["--tiny", "--runtimes", runtime, "--modes", "uniform/group,depth/query",
                           "--bench-tokens", "8", "--no-record"])
    assert rc == 0


@pytest.mark.runtime
def test_eval_on_vllm_matches_the_transformers_backend(tmp_path):
    """`amp eval --backend vllm` (lm-eval's own vLLM backend, vLLM's prompt log-probabilities for perplexity) on
    the same rows and windows as the in-process backend: per-row outcomes equal (a row may flip only where two
    choices' log-likelihoods tie within fp32 summation order: at most one per task here), perplexity within 1e-4
    relative. A per-layer result is exported with --format vllm on the way (a note says so)."""
    import json

    import amp
    from amp.cli import main
    from conftest import random_calibration
    python = serve_check.venv_python("vllm")
    assert python.is_file(), "vLLM is not installed: python -m benchmarks.serve_check --install --runtimes vllm"
    dense = tmp_path / "dense"
    tiny = serve_check.tiny_llama()
    tiny.config.max_position_embeddings = 2048   # byte-level tokens: task prompts run to several hundred
    tiny.save_pretrained(dense)
    serve_check.tiny_tokenizer_with_merges().save_pretrained(dense)
    model = amp.load_model(str(dense), "float32")[0]
    amp.prune_(model, amp.PruneConfig(ratio=0.2, allocation="depth", heads="query", calib="wikitext2", nsamples=4,
                                      seqlen=32), random_calibration(n=8), progress=False)
    pruned = tmp_path / "pruned"
    model.save_pretrained(pruned)
    serve_check.tiny_tokenizer_with_merges().save_pretrained(pruned)
    common = ["--tasks", "piqa,arc_easy", "--limit", "30", "--ppl", "wikitext2", "--seqlen", "128",
              "--max-windows", "3", "--quiet"]
    results = {}
    for backend in ("transformers", "vllm"):
        out = tmp_path / f"{backend}.json"
        extra = ["--backend", "vllm", "--vllm-python", str(python), "--vllm-dtype", "float32"] \
            if backend == "vllm" else []
        assert main(["eval", str(pruned), *common, *extra, "--json", str(out)]) == 0
        results[backend] = json.loads(out.read_text())
    hf, vl = results["transformers"], results["vllm"]
    assert vl["backend"]["name"] == "vllm" and vl["model"].endswith("vllm")  # the per-layer result's export
    for task in ("piqa", "arc_easy"):
        a, b = hf["tasks"][task]["rows"]["acc"], vl["tasks"][task]["rows"]["acc"]
        assert len(a) == len(b) == 30
        assert sum(x != y for x, y in zip(a, b)) <= 1, (task, a, b)
    (key,) = hf["perplexity"]
    assert abs(vl["perplexity"][key] / hf["perplexity"][key] - 1) < 1e-4

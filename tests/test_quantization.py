"""Widths that quantize, and quantized GGUF exports. llama.cpp quantizes each weight row in blocks of 32 (256 for the
K-quants); ffn_down's rows are a pruned layer's kept MLP width, so the default keeps MLP and expert widths at
multiples of 32 (256 where the dense width allows 16 steps of it), still exact against the masked original.
The quantized exports themselves need llama.cpp's quantizer (the `runtime` environment)."""
import copy
import dataclasses
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import amp
from amp.prune.allocate import quant_levels
from benchmarks import serve_check
from conftest import random_calibration
from test_cli import assert_clean_failure, run_cli
from test_exactness import masked_reference
from test_moe import masked_reference as moe_masked_reference
from tiny_models import save_tiny

WIDE = dict(vocab_size=258, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=1, max_position_embeddings=128)


def _llama(intermediate=768, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(intermediate_size=intermediate, **WIDE)).eval()


def _ids():
    return torch.randint(2, 258, (2, 11), generator=torch.Generator().manual_seed(1))


def test_the_quantization_levels_follow_the_dense_width():
    assert [quant_levels(w) for w in (96, 127, 128, 768, 1023, 1024, 1536, 11008)] == \
        [[1], [1], [32, 1], [32, 1], [32, 1], [256, 32, 1], [256, 32, 1], [256, 32, 1]]


@pytest.mark.parametrize("allocation", ["kl", "depth"])
def test_default_widths_are_multiples_of_32_and_exact(allocation):
    original = _llama()
    pruned = copy.deepcopy(original)
    report = amp.prune_(pruned, amp.PruneConfig(ratio=0.3, allocation=allocation, holdout=2, batch_size=3),
                        random_calibration(n=8), progress=False)
    widths = [len(layer["kept_neurons"]) for layer in report["layers"]]
    assert all(w % 32 == 0 for w in widths), widths
    assert report["allocation"]["mlp_multiple_of"] == 32
    assert abs(report["ratio_achieved"] - 0.3) < 0.005
    with torch.no_grad():
        torch.testing.assert_close(pruned(_ids()).logits, masked_reference(original, report)(_ids()).logits,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.2, 0.3])
@pytest.mark.parametrize("allocation,heads", [("depth", "query"), ("uniform", "group")])
def test_auto_keeps_the_coarsest_multiple_whose_budget_lands(allocation, heads, ratio):
    """SmolLM2's shapes (1,536 neurons: 256, 32 or 1): auto keeps 256 exactly where 256 lands the budget within
    half a percent of the parameters, else the next; the uniform allocation (the same cut in every layer, nothing
    to even it out) often cannot."""
    from test_budget import smollm2_shaped

    def prune(**extra):
        return amp.prune_(smollm2_shaped(), amp.PruneConfig(ratio=ratio, criterion="random", allocation=allocation,
                                                            heads=heads, **extra), progress=False)
    report = prune()
    multiple = report["allocation"].get("mlp_multiple_of", 1)
    assert all(len(layer["kept_neurons"]) % multiple == 0 for layer in report["layers"])
    assert abs(report["ratio_achieved"] - ratio) <= 0.005
    forced = {m: prune(mlp_multiple_of=m) for m in (256, 32)}
    lands = {m: abs(r["ratio_achieved"] - ratio) <= 0.005 for m, r in forced.items()}
    assert multiple == (256 if lands[256] else 32 if lands[32] else 1)
    if allocation == "depth":
        assert multiple == 256


def test_mlp_multiple_of_one_leaves_the_widths_the_budget_chose():
    report = amp.prune_(_llama(), amp.PruneConfig(ratio=0.3, allocation="depth", mlp_multiple_of=1),
                        random_calibration(n=8), progress=False)
    widths = [len(layer["kept_neurons"]) for layer in report["layers"]]
    assert any(w % 32 for w in widths), widths  # the rounding above is what made them multiples
    assert "mlp_multiple_of" not in report["allocation"]


def test_expert_widths_are_multiples_too():
    torch.manual_seed(0)
    config = Qwen3MoeConfig(**{**WIDE, "num_hidden_layers": 2}, intermediate_size=64, moe_intermediate_size=512,
                            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
    original = Qwen3MoeForCausalLM(config).eval()
    pruned = copy.deepcopy(original)
    # this tiny model's budget does not land within 0.5 % at 32 (auto falls back): the multiple asked for by name
    report = amp.prune_(pruned, amp.PruneConfig(ratio=0.3, allocation="depth", moe="neurons", mlp_multiple_of=32),
                        random_calibration(n=8), progress=False)
    widths = {len(n) for layer in report["layers"] for n in layer["kept_expert_neurons"]}
    assert widths and all(w % 32 == 0 for w in widths) and min(widths) < 512, widths
    assert report["allocation"]["expert_multiple_of"] == 32
    with torch.no_grad():
        torch.testing.assert_close(pruned(_ids()).logits, moe_masked_reference(original, report)(_ids()).logits,
                                   rtol=1e-4, atol=1e-5)


def test_bad_mlp_multiple_is_refused(capsys, tmp_path):
    with pytest.raises(amp.AmpError, match="--mlp-multiple-of must be auto or a positive integer"):
        amp.PruneConfig(ratio=0.2, mlp_multiple_of=0)
    code, _, err = run_cli(capsys, "prune", tmp_path, "--ratio", 0.2, "--mlp-multiple-of", "many", "--out",
                           tmp_path / "out")
    assert code == 2 and "expected auto or a positive integer" in err


def test_a_quantized_export_without_llama_cpp_fails_cleanly(tmp_path, monkeypatch, capsys):
    from amp.io import runtimes
    monkeypatch.setattr(runtimes.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("AMP_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("AMP_LLAMA_CPP_PYTHON", raising=False)
    src = save_tiny(_llama(), tmp_path / "dense")
    code, _, err = run_cli(capsys, "export", src, "--format", "gguf", "--gguf-dtype", "q4_k_m", "--out",
                           tmp_path / "q4")
    assert_clean_failure(code, err, tmp_path / "q4")
    assert "llama-cpp-python" in err


@pytest.mark.runtime
def test_quantized_exports_name_their_types_and_run_in_llama_cpp(tmp_path, data_dir):
    """Q8_0 and Q4_K_M through llama.cpp's quantizer: every weight quantized (widths multiples of 32), the size
    against the dense model quantized the same way, and llama.cpp runs the Q8_0 file with logits close to the
    f16 export's; a width that is not a multiple of 32 is named where it stayed F16."""
    python = serve_check.venv_python("llamacpp")
    assert python.is_file(), \
        "llama.cpp is not installed: python -m benchmarks.serve_check --install --runtimes llamacpp"
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**{**WIDE, "hidden_size": 256, "head_dim": 64, "intermediate_size": 1024,
                                            "vocab_size": len(serve_check.tiny_tokenizer_with_merges())}))
    src = tmp_path / "dense"
    dense.save_pretrained(src)
    serve_check.tiny_tokenizer_with_merges().save_pretrained(src)
    config = amp.PruneConfig(ratio=0.2, allocation="depth", heads="query", calib="wikitext2", nsamples=4, seqlen=32)
    amp.prune_checkpoint(str(src), config, tmp_path / "pruned", data_dir=data_dir, progress=False)
    exports = {}
    for ftype in ("f16", "q8_0", "q4_k_m"):
        exports[ftype] = amp.export_checkpoint(tmp_path / "pruned", "gguf", tmp_path / ftype, dtype=ftype,
                                               against_dense=True, llama_cpp_python=str(python), progress=False)
    q8, q4 = exports["q8_0"], exports["q4_k_m"]
    assert set(q8["gguf"]["types"]) == {"Q8_0", "F32"} and q8["gguf"]["unquantized_weights"] == []
    assert {"Q4_K", "Q6_K"} <= set(q4["gguf"]["types"]) and "F16" not in q4["gguf"]["types"]
    saved = json.loads((tmp_path / "q4_k_m" / "export_report.json").read_text())
    assert saved["gguf"]["tensors"]["blk.0.ffn_down.weight"] in ("Q4_K", "Q6_K", "Q5_0", "Q8_0")
    for report in exports.values():
        assert report["size_vs_dense"] == pytest.approx(report["gguf"]["file_bytes"] / report["dense"]["file_bytes"],
                                                         abs=1e-4)
        assert 0.6 < report["size_vs_dense"] < 0.95
    assert q4["gguf"]["file_bytes"] < q8["gguf"]["file_bytes"] < exports["f16"]["gguf"]["file_bytes"]
    # llama.cpp runs the quantized file: its last-token logits close to the f16 export's
    script = ("import json, sys, numpy as np\nfrom llama_cpp import Llama\nout = {}\n"
              "for name in sys.argv[2:]:\n"
              "    llm = Llama(model_path=name, n_ctx=64, logits_all=True, verbose=False)\n"
              "    llm.eval(json.loads(sys.argv[1]))\n"
              "    out[name] = np.array(llm.scores[llm.n_tokens - 1]).tolist()\n"
              "print(json.dumps(out))\n")
    import subprocess
    files = [str(tmp_path / t / "model.gguf") for t in ("f16", "q8_0")]
    done = subprocess.run([str(python), "-c", script, json.dumps(list(range(5, 25))), *files], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    logits = json.loads(done.stdout.strip().splitlines()[-1])
    f16, q8_logits = (torch.tensor(logits[f]) for f in files)
    assert torch.cosine_similarity(f16, q8_logits, dim=0) > 0.999
    # a width llama.cpp cannot block: named, not hidden
    amp.prune_checkpoint(str(src), dataclasses.replace(config, mlp_multiple_of=1), tmp_path / "odd",
                         data_dir=data_dir, progress=False)
    odd_config = json.loads((tmp_path / "odd" / "config.json").read_text())
    widths = [e["intermediate_size"] for e in odd_config["amp_per_layer"]]
    odd = amp.export_checkpoint(tmp_path / "odd", "gguf", tmp_path / "odd-q8", dtype="q8_0",
                                llama_cpp_python=str(python), progress=False)
    named = [f"blk.{i}.ffn_down.weight" for i, w in enumerate(widths) if w % 32]
    assert named and set(named) <= set(odd["gguf"]["unquantized_weights"])
    assert any("stayed unquantized" in note for note in odd["notes"])

"""Exports for serving engines are exact: a DeciLM export read back as the per-layer model it describes, and a GGUF
export read back tensor by tensor (q / k un-permuted), give the pruned model's logits; padding is reported; bad
input is one line and nothing written. (The real runtimes, vLLM and llama.cpp: benchmarks/serve_check.py.)"""
import copy
import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import amp
from amp.export import export_checkpoint
from amp.export.padding import layout_for
from conftest import random_calibration
from test_cli import assert_clean_failure, run_cli
from tiny_models import make_tiny, save_tiny

MODES = {"uniform": {}, "depth-group": dict(allocation="depth", heads="group"),
         "depth-query": dict(allocation="depth", heads="query"),
         "sensitivity-query": dict(allocation="sensitivity", heads="query")}


def _pruned(tmp_path, family, mode):
    model = make_tiny(family)
    amp.prune_(model, amp.PruneConfig(ratio=0.35, batch_size=3, **MODES[mode]), random_calibration(), progress=False)
    return save_tiny(model, tmp_path / f"{family}-{mode}"), model


def _ids():
    return torch.randint(2, 258, (2, 13), generator=torch.Generator().manual_seed(5))


def _as_per_layer(config: dict, entries: list[dict], arch: str, folder, tensors_from):
    """A folder holding `tensors_from`'s weights under a per-layer config of `arch`: what an export describes."""
    cfg = {k: v for k, v in config.items() if k not in ("block_configs", "auto_map", "model_type", "architectures")}
    cfg.update(architectures=[arch], model_type={"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[arch],
               amp_per_layer=entries)
    if arch == "Qwen2ForCausalLM":
        cfg.pop("qkv_bias", None)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_padding_layout_is_even_and_holds_every_head():
    lay = layout_for([0, 0, 0, 1, 2, 2], 3, heads=9)
    assert lay.heads == 9 and lay.heads % lay.kv_heads == 0 and lay.group == 3
    assert sorted(s for s in lay.slots if s >= 0) == list(range(6))
    for slot, head in enumerate(lay.slots):  # each kept head sits in a slot whose KV head is its own
        if head >= 0:
            assert lay.kv_source[slot // lay.group] == [0, 0, 0, 1, 2, 2][head]
    free = layout_for([0, 0, 0, 1], 2)  # no fixed head count (GGUF): the cheapest even map
    assert free.heads % free.kv_heads == 0 and free.zero_heads + 4 == free.heads
    assert layout_for([0, 0, 1, 1], 2).zero_heads == 0  # an even map stays as it is


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2_gqa"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_decilm_export_is_exact(family, mode, tmp_path):
    src, pruned = _pruned(tmp_path, family, mode)
    out = tmp_path / "decilm"
    report = export_checkpoint(src, "decilm", out, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert config["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    assert (out / "configuration_decilm.py").is_file() and (out / "tokenizer.json").is_file()
    blocks = config["block_configs"]
    heads = config["num_attention_heads"]
    assert len(blocks) == pruned.config.num_hidden_layers
    entries = []
    for b in blocks:
        group = b["attention"]["n_heads_in_group"]
        assert heads % group == 0
        entries.append({"num_attention_heads": heads, "num_key_value_heads": heads // group,
                        "intermediate_size": b["ffn"]["intermediate_size"],
                        "head_map": [h // group for h in range(heads)]})
    back = _as_per_layer(config, entries, type(pruned).__name__, tmp_path / "back", out)
    for f in out.glob("*.safetensors"):
        shutil.copy(f, back / f.name)
    loaded = AutoModelForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, pruned(_ids()).logits, rtol=1e-5, atol=1e-5)
    padded = sum(p.numel() for p in loaded.parameters()) - sum(p.numel() for p in pruned.parameters())
    assert report["params_added_by_padding"] == padded >= 0
    # attention FLOPs and KV cache of the export over the pruned model's, counted from the models themselves
    kept_q = sum(a.q_proj.out_features for a in (l.self_attn for l in pruned.model.layers))
    kept_kv = sum(a.k_proj.out_features for a in (l.self_attn for l in pruned.model.layers))
    written_q = sum(a.q_proj.out_features for a in (l.self_attn for l in loaded.model.layers))
    written_kv = sum(a.k_proj.out_features for a in (l.self_attn for l in loaded.model.layers))
    assert report["attention_flops_ratio"] == pytest.approx(written_q / kept_q, abs=1e-4)
    assert report["kv_cache_ratio"] == pytest.approx(written_kv / kept_kv, abs=1e-4)
    if mode == "uniform":
        assert padded == 0 and report["zero_query_heads"] == 0 and report["attention_flops_ratio"] == 1
    # the shipped configuration class reads the block configs as the loaders do (attribute access)
    import importlib.util
    spec = importlib.util.spec_from_file_location("configuration_decilm", out / "configuration_decilm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.DeciLMConfig(**{k: v for k, v in config.items() if k != "model_type"})
    assert cfg.block_configs[0].attention.n_heads_in_group == blocks[0]["attention"]["n_heads_in_group"]
    assert cfg.to_dict()["block_configs"] == blocks


def _unpermute(w: np.ndarray, heads: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(w)).float()
    return t.reshape(heads, t.shape[0] // heads // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_gguf_export_is_exact(mode, tmp_path):
    import gguf
    src, pruned = _pruned(tmp_path, "llama_gqa", mode)
    out = tmp_path / "gguf"
    report = export_checkpoint(src, "gguf", out, progress=False, dtype="f32")
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert fields["general.architecture"] == "deci"
    heads, kv, ffn = (fields[f"deci.{k}"] for k in ("attention.head_count", "attention.head_count_kv",
                                                     "feed_forward_length"))
    assert len(heads) == len(kv) == len(ffn) == pruned.config.num_hidden_layers
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == pruned.config.vocab_size  # the tiny BPE has no merges
    assert any("tokenizer.json" in note for note in report["notes"])  # a rebuilt tokenizer is said so
    tensors = {t.name: t.data for t in reader.tensors}
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    state = {hf: torch.from_numpy(np.ascontiguousarray(tensors[g])).float() for g, hf in names.items()}
    entries = []
    for i in range(len(heads)):
        h, k = int(heads[i]), int(kv[i])
        entries.append({"num_attention_heads": h, "num_key_value_heads": k, "intermediate_size": int(ffn[i]),
                        "head_map": [q // (h // k) for q in range(h)]})
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = _unpermute(tensors[f"blk.{i}.attn_q.weight"], h)
        state[p + "self_attn.k_proj.weight"] = _unpermute(tensors[f"blk.{i}.attn_k.weight"], k)
        for g, hf in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"),
                      ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"), ("attn_norm", "input_layernorm"),
                      ("ffn_norm", "post_attention_layernorm")):
            state[p + hf + ".weight"] = torch.from_numpy(np.ascontiguousarray(tensors[f"blk.{i}.{g}.weight"])).float()
    config = json.loads((src / "config.json").read_text())
    back = _as_per_layer(config, entries, "LlamaForCausalLM", tmp_path / "back", None)
    from safetensors.torch import save_file
    if not pruned.config.tie_word_embeddings:
        state["lm_head.weight"] = torch.from_numpy(np.ascontiguousarray(tensors["output.weight"])).float()
    save_file({k: v.contiguous() for k, v in state.items()}, back / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, pruned(_ids()).logits, rtol=1e-5, atol=1e-5)
    if mode in ("uniform", "depth-group"):
        assert report["params_added_by_padding"] == 0  # query heads vary per layer in deci: no padding needed


def test_bad_export_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    src, _ = _pruned(tmp_path, "llama_gqa", "uniform")
    cases = {
        "not_a_model": (tmp_path / "missing", "decilm"),
        "unsupported_family": (save_tiny(make_tiny("phi_mha"), tmp_path / "phi"), "decilm"),
        "refused_in_gguf": (save_tiny(make_tiny("phi_mha"), tmp_path / "phi2"), "gguf"),  # no phi2 writer
    }
    for name, (folder, fmt) in cases.items():
        out = tmp_path / f"out-{name}"
        code, _, err = run_cli(capsys, "export", folder, "--format", fmt, "--out", out, "--quiet")
        assert_clean_failure(code, err, out)
    taken = tmp_path / "taken"
    taken.mkdir()
    code, _, err = run_cli(capsys, "export", src, "--format", "decilm", "--out", taken, "--quiet")
    assert code == 2 and "exists" in err
    mistral = make_tiny("mistral_gqa")
    mistral.config.sliding_window = 16
    code, _, err = run_cli(capsys, "export", save_tiny(mistral, tmp_path / "mistral"), "--format", "decilm",
                           "--out", tmp_path / "out-mistral", "--quiet")
    assert_clean_failure(code, err, tmp_path / "out-mistral")
    assert "sliding window" in err


def test_prune_and_export_in_one_command(tmp_path, capsys, data_dir):
    src = save_tiny(make_tiny("llama_gqa"), tmp_path / "dense")
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(capsys, "prune", src, "--ratio", 0.3, "--allocation", "depth", "--out", out,
                                "--export", "decilm", "--calib", "wikitext2", "--nsamples", 4, "--seqlen", 32,
                                "--data-dir", data_dir, "--quiet")
    assert code == 0, err
    assert (out / "amp_report.json").is_file() and (tmp_path / "pruned-decilm" / "config.json").is_file()
    assert "vllm serve" in stdout and "--trust-remote-code" in stdout
    report = json.loads((tmp_path / "pruned-decilm" / "export_report.json").read_text())
    assert report["format"] == "decilm" and len(report["layers"]) == 2
    assert copy.deepcopy(report)["padding_share"] >= 0

"""Every family's result exports for serving, uniform and per-layer: `--format vllm` (a plain checkpoint, DeciLM, or
the amp-vllm plugin's per-layer form) and GGUF in the family's own llama.cpp architecture (padded exactly to one
shape where the result is per-layer). Each export is read back independently and gives the pruned model's logits;
the plugin registers every variant (checked without vLLM); what a format cannot hold is refused in one line with
nothing written. (The runtimes themselves: the `runtime`-marked tests and benchmarks/serve_check.py.)"""
import ast
import importlib
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import amp
from amp.arch import spec_for_class
from amp.common.vllm_plugin import PLUGIN
from amp.export import export_checkpoint
from amp.export.gguf_native import FAMILIES as GGUF_NATIVE
from benchmarks import serve_check
from conftest import random_calibration
from test_cli import assert_clean_failure, run_cli
from tiny_models import make_tiny, save_tiny

# per-layer: widths as the budget chose them (--mlp-multiple-of 1), so that layers differ and the padding of
# neurons is exercised too
MODES = {"uniform": {}, "per-layer": dict(allocation="depth", heads="query", mlp_multiple_of=1)}
FAMILIES = sorted(serve_check.FAMILIES)


def _pruned(tmp_path, family, mode, ratio=0.3):
    model = serve_check.tiny_model(family)
    extra = {"moe": serve_check.MOE[family]} if family in serve_check.MOE else {}
    amp.prune_(model, amp.PruneConfig(ratio=ratio, batch_size=3, **MODES[mode], **extra), random_calibration(n=8),
               progress=False)
    folder = tmp_path / f"{family}-{mode}"
    model.save_pretrained(folder)
    serve_check.tiny_tokenizer_with_merges().save_pretrained(folder)
    return folder, model


def _ids():
    return torch.randint(2, 250, (2, 13), generator=torch.Generator().manual_seed(5))


def _logits(model):
    with torch.no_grad():
        return model(_ids()).logits


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_export_reads_back_exactly(family, mode, tmp_path):
    src, pruned = _pruned(tmp_path, family, mode)
    out = tmp_path / "vllm"
    report = export_checkpoint(src, "vllm", out, progress=False)
    config = json.loads((out / "config.json").read_text())
    if mode == "uniform":
        assert report["vllm_form"] == "plain" and "amp_per_layer" not in config
    else:
        assert report["vllm_form"] == "plugin" and config["architectures"] == [f"Amp{type(pruned).__name__}"]
        assert report["plugin_install"].endswith(str(PLUGIN))
        # the notes name no staging folder (the export is written beside `out` and renamed into place)
        assert not any(".partial-" in note for note in report["notes"])
        for entry in config["amp_per_layer"]:   # vLLM's attention needs even groups: the export gives them
            heads, kv = entry["num_attention_heads"], entry["num_key_value_heads"]
            assert heads % kv == 0 and entry["head_map"] == [h // (heads // kv) for h in range(heads)]
    back = tmp_path / "back"
    shutil.copytree(out, back)
    config["architectures"] = [config.pop("amp_source_architecture", config["architectures"][0])]
    (back / "config.json").write_text(json.dumps(config))
    model, _, _ = amp.load_pruned(back)
    torch.testing.assert_close(_logits(model), _logits(pruned), rtol=1e-5, atol=1e-5)


def test_vllm_export_prefers_decilm_where_it_is_exact(tmp_path):
    """A per-layer LLaMA whose layers keep every query head (only KV groups and MLP widths differ... here only the
    MLP widths): DeciLM, vLLM's own per-layer model, says it without padding or plugin."""
    model = make_tiny("llama_gqa")
    amp.prune_(model, amp.PruneConfig(ratio=0.1, allocation="depth", heads="group", batch_size=3),
               random_calibration(), progress=False)
    entries = model.config.amp_per_layer
    assert all(e["num_attention_heads"] == 8 for e in entries) and len({e["intermediate_size"] for e in entries}) > 1
    report = export_checkpoint(save_tiny(model, tmp_path / "src"), "vllm", tmp_path / "out", progress=False)
    assert report["vllm_form"] == "decilm" and report["padding_share"] == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["DeciLMForCausalLM"]


def _gguf_back(path: Path, pruned, tmp_path):
    """The HF model the GGUF file describes, rebuilt from its tensors (llama.cpp's layouts undone: Gemma's 1 + w,
    the llama graph's q/k row order, experts stacked), and its metadata."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    arch = meta["general.architecture"]
    tensors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(
        [int(x) for x in reversed(t.shape)]) for t in reader.tensors}
    cls = type(pruned).__name__
    spec = spec_for_class(cls)
    config = pruned.config.to_dict()
    config.pop("amp_per_layer", None)
    config.update(num_attention_heads=meta[f"{arch}.attention.head_count"],
                  num_key_value_heads=meta[f"{arch}.attention.head_count_kv"], head_dim=meta[f"{arch}.attention.key_length"])
    if spec.moe is None:
        config["intermediate_size"] = meta[f"{arch}.feed_forward_length"]
    else:
        config[spec.moe.experts_key] = meta[f"{arch}.expert_count"]
        config[spec.moe.width_key] = tensors["blk.0.ffn_gate_exps.weight"].shape[1]
    config["architectures"] = [cls]
    folder = tmp_path / "gguf-back"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    import transformers
    hf = getattr(transformers, cls)(transformers.AutoConfig.from_pretrained(folder)).eval()
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, GGUF_NATIVE[cls].arch), config["num_hidden_layers"])
    shift = GGUF_NATIVE[cls].norm_shift
    state = {}
    for name, value in hf.state_dict().items():
        stem, suffix = (name[:-len(".gate_up_proj")], None) if name.endswith("gate_up_proj") else \
            (name, None) if name.endswith("experts.down_proj") else name.rsplit(".", 1)
        if name.endswith("gate_up_proj"):
            gate = tensors[names.get_name(stem + ".gate_proj") + ".weight"]
            up = tensors[names.get_name(stem + ".up_proj") + ".weight"]
            state[name] = torch.cat([gate, up], dim=1)
            continue
        mapped = names.get_name(stem)
        key = (mapped or "") + ("." + suffix if suffix else ".weight")
        if key not in tensors and stem == "lm_head":  # tied, or a graph that always reads the embeddings
            key = "token_embd.weight"
        t = tensors[key].reshape(value.shape)
        if GGUF_NATIVE[cls].permute and stem.endswith(("q_proj", "k_proj")):
            heads = config["num_attention_heads"] if stem.endswith("q_proj") else config["num_key_value_heads"]
            t = t.reshape(heads, t.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(t.shape)
        if shift and name.endswith("norm.weight"):
            t = t - shift
        state[name] = t
    hf.load_state_dict(state)
    return hf, meta, arch


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_gguf_export_in_the_family_architecture_reads_back_exactly(family, mode, tmp_path):
    src, pruned = _pruned(tmp_path, family, mode)
    out = tmp_path / "gguf"
    report = export_checkpoint(src, "gguf", out, progress=False, dtype="f32")
    back, meta, arch = _gguf_back(out / "model.gguf", pruned, tmp_path)
    assert arch == report["architecture_gguf"] != "deci"
    assert meta[f"{arch}.attention.key_length"] == 64  # head_dim always written (pruned heads break hidden/heads)
    if mode == "uniform":
        assert report["padding_share"] == 0
    else:
        assert report["padding_share"] > 0 and any("--format vllm" in n for n in report["notes"])
        # what was padded, every kind counted: the parameters follow from the structures
        hidden, d = pruned.config.hidden_size, 64
        experts = getattr(pruned.config, "num_local_experts", None) or getattr(pruned.config, "num_experts", None) or 1
        neurons = report["zero_neurons"] * 3 * hidden * experts  # a mixture pads every expert to one width
        heads = (report["zero_query_heads"] + report["added_kv_heads"]) * 2 * d * hidden
        assert report["params_added_by_padding"] == neurons + heads and report["zero_neurons"] > 0
    if family in ("gemma2", "gemma3"):
        types_ = pruned.config.layer_types
        assert list(meta[f"{arch}.attention.sliding_window_pattern"]) == [t == "sliding_attention" for t in types_]
    torch.testing.assert_close(_logits(back), _logits(pruned), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,message", [
    ("gemma2_gqa", "query_pre_attn_scalar"),          # llama.cpp's query scale would differ
    ("qwen3moe_moe", "norm_topk_prob"),                # llama.cpp always renormalizes the top-k weights
])
def test_gguf_refuses_what_llama_cpp_would_compute_otherwise(name, message, tmp_path, capsys):
    model = make_tiny(name)
    src = save_tiny(model, tmp_path / "src")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", src, "--format", "gguf", "--out", out)
    assert_clean_failure(code, err, out)
    assert message in err


def test_gguf_refuses_per_layer_expert_counts(tmp_path, capsys):
    model = serve_check.tiny_model("mixtral")
    amp.prune_(model, amp.PruneConfig(ratio=0.3, allocation="depth", moe="experts", batch_size=3),
               random_calibration(n=8), progress=False)
    counts = {e["num_local_experts"] for e in model.config.amp_per_layer}
    assert len(counts) > 1
    src = tmp_path / "src"
    model.save_pretrained(src)
    serve_check.tiny_tokenizer_with_merges().save_pretrained(src)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", src, "--format", "gguf", "--out", out)
    assert_clean_failure(code, err, out)
    assert "experts" in err and "--format vllm" in err


def test_vllm_refuses_a_per_layer_phi2(tmp_path, capsys):
    model = make_tiny("phi_mha")
    amp.prune_(model, amp.PruneConfig(ratio=0.3, allocation="depth", batch_size=3), random_calibration(),
               progress=False)
    src = save_tiny(model, tmp_path / "src")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", src, "--format", "vllm", "--out", out)
    assert_clean_failure(code, err, out)
    assert "Transformers backend" in err


# ---------------------------------------------------------------- the plugin, without vLLM


def _plugin_modules():
    return {p.stem: p for p in (PLUGIN / "amp_vllm").glob("*.py")}


def test_plugin_registers_every_variant_without_vllm(monkeypatch):
    registered = {}
    fake = types.ModuleType("vllm")
    fake.ModelRegistry = types.SimpleNamespace(register_model=lambda arch, target: registered.__setitem__(arch, target))
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.syspath_prepend(str(PLUGIN))
    sys.modules.pop("amp_vllm", None)
    plugin = importlib.import_module("amp_vllm")
    plugin.register()
    from amp.export.vllm import PLUGIN_FAMILIES
    assert sorted(registered) == sorted(f"Amp{f}" for f in PLUGIN_FAMILIES)
    modules = _plugin_modules()
    for arch, target in registered.items():  # every target names a class defined in the plugin's files
        module, cls = target.split(":")
        path = modules[module.split(".")[1]]
        classes = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)}
        assert cls in classes, (arch, target)
    sys.modules.pop("amp_vllm", None)


def test_plugin_is_a_package_vllm_loads_through_its_entry_point():
    import tomllib
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["vllm.general_plugins"] == {"amp_vllm": "amp_vllm:register"}
    assert project["project"]["dependencies"] == []  # vLLM only, undeclared: pip must not replace the vLLM build
    for path in _plugin_modules().values():  # it imports vLLM and itself only
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in ("vllm", "__future__", "contextlib"), (path, node.module)
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in ("vllm",) for a in node.names), path


def test_plugin_layer_view_answers_with_the_layers_own_sizes(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN))
    utils = types.ModuleType("vllm.model_executor.models.utils")
    utils.extract_layer_index = lambda prefix: int(prefix.split(".")[-1])
    for name in ("vllm", "vllm.model_executor", "vllm.model_executor.models"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.model_executor.models.utils", utils)
    sys.modules.pop("amp_vllm.common", None)
    common = importlib.import_module("amp_vllm.common")
    base = types.SimpleNamespace(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=96,
                                 amp_per_layer=[{"num_attention_heads": 6, "num_key_value_heads": 3,
                                                 "intermediate_size": 40, "head_map": [0, 0, 1, 1, 2, 2]}] * 2)
    view = common.layer_config(base, "model.layers.1")
    assert (view.num_attention_heads, view.num_key_value_heads, view.intermediate_size, view.hidden_size) == \
        (6, 3, 40, 64)
    view.rope_theta = 1.0  # a layer setting a default keeps it to itself
    assert not hasattr(base, "rope_theta")
    sys.modules.pop("amp_vllm.common", None)



def test_quiet_silences_the_libraries_bars(tmp_path, capsys):
    """`--quiet` silences the libraries' bars too: transformers' own (here: writing the shards of an in-memory
    prune) and its GGUF dequantization's, a bare tqdm that transformers' switch does not reach (called here as
    the loader calls it: a file's dequantization needs a GGUF tokenizer that transformers 5.17 cannot read back
    from a tiny vocabulary)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from amp.io.models import silenced_progress
    src = save_tiny(make_tiny("llama_gqa"), tmp_path / "dense")
    args = ["prune", src, "--ratio", 0.2, "--criterion", "magnitude", "--allocation", "uniform", "--no-stream"]
    for quiet in (False, True):
        code, _, err = run_cli(capsys, *args, "--out", tmp_path / f"out-{quiet}", *(["--quiet"] if quiet else []))
        assert code == 0, err
        assert ("Writing model shards" in err) != quiet, err[-2000:]
        with silenced_progress(quiet):
            for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
                pass
        assert ("de-quantizing" in capsys.readouterr().err) != quiet

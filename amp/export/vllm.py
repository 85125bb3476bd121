"""`--format vllm`: a folder that `vllm serve` loads, in the form vLLM already knows wherever that is exact.

- a uniform result is a plain checkpoint of its family: written as it is (vLLM serves every family natively);
- a per-layer result of a LLaMA-style family whose layers all keep every query head in even groups: DeciLM
  (vLLM's own per-layer model, nemotron_nas; decilm.py), which needs no padding then;
- any other per-layer result: the engine's vLLM plugin (amp/export/vllm_plugin, package `amp-vllm`), whose
  variant of the family builds every decoder layer from its own sizes. vLLM's attention needs even groups (query
  head i reads KV head i // group), so a layer with uneven groups gets the cheapest even layout of its own head
  count (export/padding.py: zero query heads, copied or zero KV heads); layers keep their own head counts, KV
  head counts, MLP widths, experts and expert widths (vLLM's KV-cache manager holds layers with different KV-head
  counts, as it does for DeciLM). The report gives what any padding costs.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from ..arch import REGISTRY, spec_for_class
from ..common.errors import AmpError
from ..common.vllm_plugin import install_command
from ..runtime import per_layer
from . import decilm
from .padding import layout_for, pad_attention, padding_cost
from .source import ExportSource

# families the plugin has a variant of (amp_vllm.ARCHITECTURES without the "Amp" prefix)
PLUGIN_FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                   "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM",
                   "Qwen3MoeForCausalLM")
SUPPORTED = tuple(sorted(REGISTRY))
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
          "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def check(source: ExportSource) -> None:
    if source.per_layer and source.architecture not in PLUGIN_FAMILIES:
        why = " (vLLM runs it through its Transformers backend, which builds every layer from the global config)" \
            if source.architecture == "PhiForCausalLM" else ""
        raise AmpError(f"a per-layer {source.architecture} result has no vLLM form{why}: the amp-vllm plugin has "
                       f"variants of {', '.join(PLUGIN_FAMILIES)}; prune it uniformly (a plain checkpoint) to serve it")


def form(source: ExportSource) -> str:
    """plain | decilm | plugin (see the module's docstring)."""
    if not source.per_layer:
        return "plain"
    if source.architecture in decilm.SUPPORTED and not source.config.get("sliding_window"):
        _, costs = decilm.plan(source)
        if all(c["params_added"] == 0 for c in costs):
            return "decilm"
    return "plugin"


def export(source: ExportSource, out: Path, progress) -> dict:
    kind = form(source)
    if kind == "decilm":
        decilm.check(source)
        result = decilm.export(source, out, progress)
        result["notes"] = ["every layer keeps every query head in even groups: DeciLM, vLLM's own per-layer model, "
                           "describes it exactly (no plugin needed; --trust-remote-code)"]
    elif kind == "plain":
        result = _plain(source, out, progress)
    else:
        result = _plugin(source, out, progress)
    for name in COPIED:
        if (source.folder / name).is_file() and not (out / name).exists():
            shutil.copyfile(source.folder / name, out / name)
    result["vllm_form"] = kind
    if kind == "plugin":
        result["plugin_install"] = install_command()
        result["notes"] = result.get("notes", []) + [
            f"served by the amp-vllm plugin (architecture {result['architecture']}): install it into vLLM's "
            f"environment once with `{install_command()}`, then `vllm serve` this folder"]  # (out is still staged)
    return result


def _plain(source: ExportSource, out: Path, progress) -> dict:
    """A uniform result is its family's own checkpoint: copied file by file."""
    for path in progress(sorted(source.folder.iterdir()), "exporting (vllm, plain)"):
        if path.is_file() and (path.suffix in (".safetensors", ".json") or path.name in COPIED) \
                and path.name != "amp_report.json":
            shutil.copyfile(path, out / path.name)
    return {"layers": [_entry(i, s.heads, s.kv_heads, s.intermediate, padding_cost(
                layout_for(list(s.head_map), s.kv_heads, None), s.heads, s.kv_heads, source.head_dim, source.hidden))
                       for i, s in enumerate(source.layers)],
            "architecture": source.architecture,
            "notes": [f"a uniform result: a plain {source.architecture} checkpoint, which vLLM serves natively"]}


def _plugin(source: ExportSource, out: Path, progress) -> dict:
    """Each layer read, its attention laid out in even groups where needed, written whole (io's shard sink)."""
    from ..io.sinks import ShardSink
    from ..io.sources import SafetensorsSource
    stream = SafetensorsSource(source.folder, source.checkpoint)
    spec = spec_for_class(source.architecture)
    config = stream.model.config
    entries = per_layer.entries(config)
    d = source.head_dim
    layouts = [layout_for(list(e["head_map"]), e["num_key_value_heads"], None) for e in entries]
    shapes = [{**{k: v for k, v in e.items() if k != "head_map"}, "num_attention_heads": lay.heads,
               "num_key_value_heads": lay.kv_heads, "head_map": per_layer.even_map(lay.heads, lay.kv_heads)}
              for e, lay in zip(entries, layouts)]
    base = copy.deepcopy(config)
    delattr(base, per_layer.KEY)
    target = per_layer.per_layer_config(base, shapes)
    sink = ShardSink(out, source.checkpoint, stream.storage_dtype, 5 * 10**9, stream.layout)
    costs = []
    try:
        sink.begin(target)
        for i in progress(range(len(entries)), "exporting (vllm, plugin)"):
            e, lay = entries[i], layouts[i]
            layer = stream.load_layer(i, "cpu", stream.storage_dtype)
            try:
                if lay.zero_heads or lay.added_kv_heads or list(e["head_map"]) != list(
                        per_layer.even_map(lay.heads, lay.kv_heads)):
                    pad_attention(layer, spec, e["num_attention_heads"], e["num_key_value_heads"], d, lay)
                sink.put(i, layer)
            finally:
                stream.release_layer(i)
            costs.append(padding_cost(lay, e["num_attention_heads"], e["num_key_value_heads"], d, source.hidden,
                                      source.has(f"model.layers.{i}.self_attn.q_proj.bias")))
        sink.finish(target)
    finally:
        sink.close()
    arch = f"Amp{source.architecture}"
    path = out / "config.json"
    written = per_layer.family_form(json.loads(path.read_text()))  # vLLM reads the family's model_type
    written.update(architectures=[arch], amp_source_architecture=source.architecture)
    path.write_text(json.dumps(written, indent=2) + "\n")
    return {"layers": [_entry(i, lay.heads, lay.kv_heads, e.get("intermediate_size"), c)
                       for i, (e, lay, c) in enumerate(zip(entries, layouts, costs))],
            "architecture": arch}


def _entry(i, heads, kv_heads, intermediate, cost) -> dict:
    return {"layer": i, "query_heads": heads, "kv_heads": kv_heads, "intermediate_size": intermediate, **cost}

"""DeciLM / nemotron-nas checkpoints for vLLM, SGLang and TensorRT-LLM: `architectures: ["DeciLMForCausalLM"]`,
`model_type: "nemotron-nas"`, one `block_configs` entry per layer, and `configuration_decilm.py` beside it
(`auto_map`, loaded with trust_remote_code).

What the format can say per layer, read from vLLM's loader (vllm/model_executor/models/nemotron_nas.py): the KV-head
count (`attention.n_heads_in_group`, KV heads = num_attention_heads / n_heads_in_group, even groups) and the FFN
width (`ffn.intermediate_size`); every layer has the model's `num_attention_heads` query heads. A layer with fewer
query heads, or uneven groups, is made exact by padding (export/padding.py): zero query heads (zero o_proj columns)
and duplicated or zero KV heads, never by approximation; the report gives what that costs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..io.safetensors_io import ShardWriter
from .padding import layout_for, padding_cost
from .source import ExportSource

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
WHY = ("it describes LLaMA-style layers (separate q/k/v/o, SwiGLU gate/up/down, RMSNorm, no per-head norms); "
       "--format vllm serves every family")
CONFIG_CODE = Path(__file__).resolve().parents[1] / "resources" / "configuration_decilm.py"
_DROP = ("amp_per_layer", "architectures", "model_type", "auto_map", "num_key_value_heads", "intermediate_size",
         "transformers_version", "dtype", "torch_dtype")


def check(source: ExportSource) -> None:
    """What vLLM's DeciLM layers would compute differently: a sliding window (they attend to every key)."""
    from ..common.errors import AmpError
    window = source.config.get("sliding_window")
    if window and (source.architecture == "MistralForCausalLM" or source.config.get("use_sliding_window")):
        raise AmpError(f"{source.architecture} attends within a sliding window of {window} tokens, which DeciLM "
                       "layers do not: their outputs would differ past it; export a model without one")


def _rows(tensor: torch.Tensor, sources, per: int) -> torch.Tensor:
    """Rows grouped `per` at a time, taken from `sources` (index of a source group, or -1 for zeros)."""
    out = tensor.new_zeros((len(sources) * per, *tensor.shape[1:]))
    for i, src in enumerate(sources):
        if src >= 0:
            out[i * per:(i + 1) * per] = tensor[src * per:(src + 1) * per]
    return out


def plan(source: ExportSource) -> tuple[list, list[dict]]:
    """Per layer: its attention layout with the model's fixed query-head count, and what the padding costs."""
    layouts, costs = [], []
    for i, shape in enumerate(source.layers):
        layout = layout_for(list(shape.head_map), shape.kv_heads, source.dense_heads)
        layouts.append(layout)
        costs.append(padding_cost(layout, shape.heads, shape.kv_heads, source.head_dim, source.hidden,
                                  source.has(f"model.layers.{i}.self_attn.q_proj.bias")))
    return layouts, costs


def export(source: ExportSource, out: Path, progress) -> dict:
    layouts, costs = plan(source)
    d, dtype = source.head_dim, source.storage_dtype()
    names = []  # (name, shape)
    for name, info in source.checkpoint.tensors.items():
        if not name.startswith("model.layers."):
            names.append((name, tuple(info.shape)))
    for i, (shape, layout) in enumerate(zip(source.layers, layouts)):
        p = f"model.layers.{i}."
        for suffix in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            names.append((p + suffix, (source.hidden,)))
        q_rows, kv_rows = layout.heads * d, layout.kv_heads * d
        names += [(p + "self_attn.q_proj.weight", (q_rows, source.hidden)),
                  (p + "self_attn.k_proj.weight", (kv_rows, source.hidden)),
                  (p + "self_attn.v_proj.weight", (kv_rows, source.hidden)),
                  (p + "self_attn.o_proj.weight", (source.hidden, q_rows))]
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            if source.has(p + f"self_attn.{proj}.bias"):
                names.append((p + f"self_attn.{proj}.bias", (rows,)))
        if source.has(p + "self_attn.o_proj.bias"):
            names.append((p + "self_attn.o_proj.bias", (source.hidden,)))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.append((p + f"mlp.{proj}.weight", tuple(source.checkpoint.tensors[p + f"mlp.{proj}.weight"].shape)))
            if source.has(p + f"mlp.{proj}.bias"):
                names.append((p + f"mlp.{proj}.bias", tuple(source.checkpoint.tensors[p + f"mlp.{proj}.bias"].shape)))
    writer = ShardWriter(out, [(n, s, dtype) for n, s in names], 5 * 10**9)
    try:
        for name, _ in names:
            if not name.startswith("model.layers."):
                writer.write(name, source.read(name).to(dtype))
        for i, (shape, layout) in enumerate(progress(list(zip(source.layers, layouts)), "exporting (decilm)")):
            p = f"model.layers.{i}."
            for name, tensor in _layer_tensors(source, p, layout, d):
                writer.write(name, tensor.to(dtype).contiguous())
        writer.finish()
    finally:
        writer.close()
    _write_config(source, out, layouts)
    shutil.copyfile(CONFIG_CODE, out / CONFIG_CODE.name)
    return {"layers": [{"layer": i, "query_heads": lay.heads, "kv_heads": lay.kv_heads,
                        "n_heads_in_group": lay.group, "intermediate_size": s.intermediate, **c}
                       for i, (lay, s, c) in enumerate(zip(layouts, source.layers, costs))]}


def _layer_tensors(source: ExportSource, p: str, layout, d: int):
    """The layer's tensors, attention rearranged into the layout (zero heads, copied or zero KV heads)."""
    for suffix in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        yield p + suffix, source.read(p + suffix)
    q = source.read(p + "self_attn.q_proj.weight")
    yield p + "self_attn.q_proj.weight", _rows(q, layout.slots, d)
    for proj in ("k_proj", "v_proj"):
        yield p + f"self_attn.{proj}.weight", _rows(source.read(p + f"self_attn.{proj}.weight"), layout.kv_source, d)
    o = source.read(p + "self_attn.o_proj.weight")
    yield p + "self_attn.o_proj.weight", _rows(o.T.contiguous(), layout.slots, d).T
    for proj, sources in (("q_proj", layout.slots), ("k_proj", layout.kv_source), ("v_proj", layout.kv_source)):
        if source.has(p + f"self_attn.{proj}.bias"):
            yield p + f"self_attn.{proj}.bias", _rows(source.read(p + f"self_attn.{proj}.bias"), sources, d)
    if source.has(p + "self_attn.o_proj.bias"):
        yield p + "self_attn.o_proj.bias", source.read(p + "self_attn.o_proj.bias")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        yield p + f"mlp.{proj}.weight", source.read(p + f"mlp.{proj}.weight")
        if source.has(p + f"mlp.{proj}.bias"):
            yield p + f"mlp.{proj}.bias", source.read(p + f"mlp.{proj}.bias")


def _write_config(source: ExportSource, out: Path, layouts) -> None:
    config = {k: v for k, v in source.config.items() if k not in _DROP}
    if source.architecture == "Qwen2ForCausalLM":  # q/k/v biases without an o_proj bias: vLLM's qkv_bias switch
        config["qkv_bias"] = True
    config.update(architectures=["DeciLMForCausalLM"], model_type="nemotron-nas",
                  auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig"},
                  num_attention_heads=source.dense_heads, head_dim=source.head_dim,
                  num_key_value_heads=min(lay.kv_heads for lay in layouts),
                  intermediate_size=max(s.intermediate for s in source.layers),
                  dtype=str(source.storage_dtype()).replace("torch.", ""),
                  block_configs=[{"attention": {"n_heads_in_group": lay.group, "no_op": False,
                                                "replace_with_linear": False},
                                  "ffn": {"intermediate_size": s.intermediate, "no_op": False,
                                          "replace_with_linear": False}}
                                 for lay, s in zip(layouts, source.layers)])
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

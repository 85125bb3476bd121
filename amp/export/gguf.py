"""GGUF for llama.cpp. LLaMA and Mistral: `general.architecture = "deci"`, whose graph reads per-layer arrays `head_count`,
`head_count_kv` and `feed_forward_length` (llama.cpp's `llama` graph reads only global values). Query heads vary
per layer here, so only uneven groups need padding (to the cheapest even map of that layer, export/padding.py).

Tensors are f32, f16 or bf16 (norms stay f32), streamed one at a time through gguf's GGUFWriter (tensor infos
first, then each tensor's data). q and k rows are permuted from the Hugging Face rotary layout to llama.cpp's, per
layer with that layer's head counts, as llama.cpp's own converter does. The tokenizer is carried over: copied from
the GGUF file the model was dequantized from when there is one (the bundled SmolLM2), else built from
tokenizer.json for byte-level BPE tokenizers. Every other family goes to its own architecture (gguf_native.py).
The quantized types (q8_0, q4_k_m, ...) are this export requantized by llama.cpp's own quantizer
(gguf_quantize.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..common.errors import AmpError
from . import gguf_native  # every other family, in its own llama.cpp architecture
from . import gguf_quantize
from .gguf_common import _add_tokenizer, _array, _info, _permute
from .padding import layout_for, padding_cost
from .source import ExportSource

DECI = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED = DECI + tuple(gguf_native.FAMILIES)
WHY = "llama.cpp runs Phi-1.5 / Phi-2 (phi2) with a graph this export does not write yet; use --format vllm"
DTYPES = ("f32", "f16", "bf16", *gguf_quantize.FTYPES)
FILE = "model.gguf"


def check(source: ExportSource) -> None:
    if source.architecture not in DECI:
        gguf_native.check(source)
        return
    biased = [n for n in source.checkpoint.tensors if n.endswith(".bias")]
    if biased:
        raise AmpError(f"{source.folder} has projection biases ({biased[0]}, ...), which this GGUF export does not "
                       "write (the deci graph's biases are not checked here); export with --format decilm")
    window = source.config.get("sliding_window")
    if window and source.architecture == "MistralForCausalLM":
        raise AmpError(f"MistralForCausalLM attends within a sliding window of {window} tokens, which the deci graph "
                       "does not; export a model without one")


def _rows(tensor: torch.Tensor, sources, per: int) -> torch.Tensor:
    out = tensor.new_zeros((len(sources) * per, *tensor.shape[1:]))
    for i, src in enumerate(sources):
        if src >= 0:
            out[i * per:(i + 1) * per] = tensor[src * per:(src + 1) * per]
    return out


def _rope_factors(config: dict, head_dim: int) -> torch.Tensor | None:
    """LLaMA-3's rope scaling as llama.cpp reads it: per-frequency factors (the base frequencies over the scaled
    ones transformers computes), or None without llama3 scaling."""
    scaling = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if (scaling.get("rope_type") or scaling.get("type")) != "llama3":
        return None
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    skip = ("architectures", "amp_per_layer", "model_type", "auto_map")  # not LlamaConfig's, or another family's
    cfg = LlamaConfig(**{k: v for k, v in config.items() if k not in skip})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = scaling.get("rope_theta", config.get("rope_theta", 10000.0))
    plain = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return (plain / scaled.float()).float()


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def export(source: ExportSource, out: Path, progress, dtype: str = "f16", llama_cpp_python: str | None = None) -> dict:
    if dtype not in DTYPES:
        raise AmpError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype in gguf_quantize.FTYPES:
        return _quantized(source, out, progress, dtype, gguf_quantize.find_python(llama_cpp_python))
    result = _write(source, out, progress, dtype)
    result["gguf"] = gguf_quantize.tensor_types(out / FILE, quantized=False)
    return result


def _quantized(source: ExportSource, out: Path, progress, ftype: str, python: str) -> dict:
    """Written at 16 bits (bf16 for a bf16 checkpoint), then quantized by llama.cpp; the 16-bit file is removed."""
    wide = "bf16" if source.storage_dtype() == torch.bfloat16 else "f16"
    result = _write(source, out, progress, wide)
    staged = out / f"model-{wide}.gguf"
    (out / FILE).rename(staged)
    gguf_quantize.quantize(staged, out / FILE, ftype, python)
    staged.unlink()
    held = gguf_quantize.tensor_types(out / FILE)
    left = held["unquantized_weights"]
    if left:
        result.setdefault("notes", []).append(
            f"{len(left)} weight tensors stayed unquantized ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''}): "
            "their rows are not a multiple of 32")
    return {**result, "dtype": ftype, "quantized_from": wide, "gguf": held}


def _write(source: ExportSource, out: Path, progress, dtype: str) -> dict:
    import gguf
    if source.architecture not in DECI:
        return gguf_native.export(source, out, progress, dtype)
    d, c = source.head_dim, source.config
    layouts = [layout_for(list(s.head_map), s.kv_heads, None) for s in source.layers]
    costs = [padding_cost(lay, s.heads, s.kv_heads, d, source.hidden) for lay, s in zip(layouts, source.layers)]
    writer = gguf.GGUFWriter(str(out / FILE), "deci")
    writer.add_name(Path(source.folder).name)
    writer.add_block_count(source.layers_count)
    writer.add_context_length(c.get("max_position_embeddings", 4096))
    writer.add_embedding_length(source.hidden)
    writer.add_head_count([lay.heads for lay in layouts])
    writer.add_head_count_kv([lay.kv_heads for lay in layouts])
    writer.add_feed_forward_length([s.intermediate for s in source.layers])
    writer.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-5))
    writer.add_key_length(d)
    writer.add_value_length(d)
    writer.add_rope_dimension_count(d)
    writer.add_rope_freq_base(_rope_theta(c))
    writer.add_vocab_size(c["vocab_size"])
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    tokenizer_note = _add_tokenizer(writer, source)
    factors = _rope_factors(c, d)
    plan = _tensor_plan(source, layouts, factors)
    for name, _, produce in plan:  # infos first: the file's header holds every tensor's shape and type
        shape = produce(meta=True)
        np_dtype, nbytes, raw = _info(shape, dtype)
        writer.add_tensor_info(name, shape, np_dtype, nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    layer_names = {i: [p for p in plan if p[1] == i] for i in range(source.layers_count)}
    for name, layer, produce in [p for p in plan if p[1] is None]:
        writer.write_tensor_data(_array(produce(), dtype)[0])
    for i in progress(range(source.layers_count), "exporting (gguf)"):
        for name, layer, produce in layer_names[i]:
            writer.write_tensor_data(_array(produce(), dtype)[0])
    writer.close()
    notes = [tokenizer_note] if tokenizer_note else []
    return {"layers": [{"layer": i, "query_heads": lay.heads, "kv_heads": lay.kv_heads,
                        "intermediate_size": s.intermediate, **cost}
                       for i, (lay, s, cost) in enumerate(zip(layouts, source.layers, costs))],
            "file": FILE, "dtype": dtype, "notes": notes}


def _tensor_plan(source: ExportSource, layouts, factors):
    """(GGUF name, layer or None, producer) in file order: globals first, then each layer's. A producer called
    with meta=True gives the tensor's shape without reading the checkpoint."""
    d = source.head_dim
    plan = []

    def stored(name, transform=None, shape=None):
        def produce(meta=False):
            if meta:
                return tuple(shape or source.checkpoint.tensors[name].shape)
            t = source.read(name)
            return transform(t) if transform else t
        return produce
    plan.append(("token_embd.weight", None, stored("model.embed_tokens.weight")))
    plan.append(("output_norm.weight", None, stored("model.norm.weight")))
    if source.has("lm_head.weight") and not source.tied:
        plan.append(("output.weight", None, stored("lm_head.weight")))
    if factors is not None:
        plan.append(("rope_freqs.weight", None, lambda meta=False: tuple(factors.shape) if meta else factors))
    for i, lay in enumerate(layouts):
        p = f"model.layers.{i}."
        h = source.hidden
        plan += [
            (f"blk.{i}.attn_norm.weight", i, stored(p + "input_layernorm.weight")),
            (f"blk.{i}.attn_q.weight", i, stored(p + "self_attn.q_proj.weight",
                                                 lambda t, lay=lay: _permute(_rows(t, lay.slots, d), lay.heads),
                                                 (lay.heads * d, h))),
            (f"blk.{i}.attn_k.weight", i, stored(p + "self_attn.k_proj.weight",
                                                 lambda t, lay=lay: _permute(_rows(t, lay.kv_source, d),
                                                                             lay.kv_heads), (lay.kv_heads * d, h))),
            (f"blk.{i}.attn_v.weight", i, stored(p + "self_attn.v_proj.weight",
                                                 lambda t, lay=lay: _rows(t, lay.kv_source, d),
                                                 (lay.kv_heads * d, h))),
            (f"blk.{i}.attn_output.weight", i, stored(p + "self_attn.o_proj.weight",
                                                      lambda t, lay=lay: _rows(t.T.contiguous(), lay.slots, d).T,
                                                      (h, lay.heads * d))),
            (f"blk.{i}.ffn_norm.weight", i, stored(p + "post_attention_layernorm.weight")),
            (f"blk.{i}.ffn_gate.weight", i, stored(p + "mlp.gate_proj.weight")),
            (f"blk.{i}.ffn_up.weight", i, stored(p + "mlp.up_proj.weight")),
            (f"blk.{i}.ffn_down.weight", i, stored(p + "mlp.down_proj.weight")),
        ]
    return plan

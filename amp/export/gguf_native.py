"""GGUF in a family's own llama.cpp architecture (qwen2, qwen3, qwen3moe, gemma2, gemma3, phi3; Mixtral as `llama`
with experts), as llama.cpp's converter (convert_hf_to_gguf.py) writes it: the same architecture keys, tensor names
(gguf's own TensorNameMap), Gemma's norms stored as 1 + w, LLaMA-architecture q/k rows permuted to llama.cpp's
rotary order, experts stacked into 3-D tensors. Beyond the converter, key_length / value_length are always written
(llama.cpp would otherwise derive head_dim as hidden / heads, which pruning heads breaks) and Gemma's sliding-window
pattern is written per layer from `layer_types`.

These graphs read one shape for every layer (layer 0's); qwen2's and phi3's moreover size q and o as hidden x hidden,
so their layers keep hidden / head_dim query heads (pruned ones come back as zero heads). A uniform result is written as it is. A per-layer result
is padded exactly to the cheapest common shape (export/padding.py): zero query heads with zero o_proj columns,
copied or zero KV heads, zero neurons, zero expert neurons; the report gives the cost, and `--format vllm` serves
the same result without padding. Different expert counts per layer cannot be padded exactly (a zero expert's router
logit is 0, not -inf, so it would be chosen): refused. Layers stream one at a time, as in gguf.py."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from ..arch import spec_for_class
from ..common.errors import AmpError
from ..runtime import per_layer
from .gguf_common import _add_tokenizer, _array, _info, _permute
from .padding import common_attention, pad_attention, pad_experts, pad_mlp

FILE = "model.gguf"


@dataclass(frozen=True)
class Family:
    arch: str                 # gguf.MODEL_ARCH member name
    norm_shift: float = 0.0   # Gemma's RMSNorm multiplies by (1 + w): llama.cpp stores 1 + w
    permute: bool = False     # the `llama` graph rotates interleaved pairs: q / k rows permuted
    full_heads: bool = False  # the graph sizes q and o as hidden x hidden: every layer keeps hidden / head_dim heads


FAMILIES = {"Qwen2ForCausalLM": Family("QWEN2", full_heads=True), "Qwen3ForCausalLM": Family("QWEN3"),
            "Qwen3MoeForCausalLM": Family("QWEN3MOE"), "Gemma2ForCausalLM": Family("GEMMA2", 1.0),
            "Gemma3ForCausalLM": Family("GEMMA3", 1.0), "Phi3ForCausalLM": Family("PHI3", full_heads=True),
            "MixtralForCausalLM": Family("LLAMA", permute=True)}
GEMMA_LARGE = {"Gemma2ForCausalLM": 46, "Gemma3ForCausalLM": 62}  # layer counts llama.cpp scales by hidden / heads


def _rope(c: dict) -> dict:
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    return params.get("full_attention", params) if isinstance(params.get("full_attention"), dict) else params


def check(source) -> None:
    """What llama.cpp's graph for the family would compute otherwise: refused with the reason."""
    c, arch = source.config, source.architecture
    rope = _rope(c)
    kind = rope.get("rope_type") or rope.get("type")
    if kind not in (None, "default", "linear", "yarn"):
        raise AmpError(f"{arch} with {kind} rope scaling: this GGUF export writes default, linear and yarn rope "
                       "(llama.cpp's converter writes the rest)")
    if arch in GEMMA_LARGE:
        scalar = c.get("query_pre_attn_scalar", source.head_dim)
        layers = c["num_hidden_layers"]
        want = c["hidden_size"] / source.heads if layers == GEMMA_LARGE[arch] else source.head_dim
        if abs(scalar - want) > 1e-6 or (layers == GEMMA_LARGE[arch] and source.per_layer):
            raise AmpError(f"{arch}: llama.cpp scales queries by 1/sqrt({'hidden / heads' if layers == GEMMA_LARGE[arch] else 'head_dim'}) "
                           f"= 1/sqrt({want:g}), this model by 1/sqrt(query_pre_attn_scalar = {scalar:g}); use "
                           "--format vllm")
    if arch == "Gemma2ForCausalLM" and not source.tied:
        raise AmpError("Gemma2ForCausalLM with an lm_head of its own: llama.cpp's gemma2 graph reads the output "
                       "weights from the token embeddings; use --format vllm")
    if arch == "Qwen3MoeForCausalLM":
        if not c.get("norm_topk_prob", True):
            raise AmpError("Qwen3MoeForCausalLM with norm_topk_prob false: llama.cpp's qwen3moe graph always "
                           "renormalizes the top-k routing weights; use --format vllm")
        if c.get("mlp_only_layers") or c.get("decoder_sparse_step", 1) != 1:
            raise AmpError("Qwen3MoeForCausalLM with dense layers (mlp_only_layers / decoder_sparse_step): llama.cpp's "
                           "qwen3moe graph has experts in every layer; use --format vllm")
    if arch == "MixtralForCausalLM" and c.get("sliding_window"):
        raise AmpError("MixtralForCausalLM with a sliding window: llama.cpp's llama graph attends to every key; "
                       "export a model without one")
    if source.config.get("moe_intermediate_size") is None and arch in ("Qwen3MoeForCausalLM",):
        raise AmpError(f"{arch}: moe_intermediate_size missing from config.json")


def _targets(source, stream) -> tuple:
    """(query heads, KV heads, per-layer attention layouts, MLP width, experts, expert width) every layer gets,
    and each layer's own sizes."""
    spec = spec_for_class(source.architecture)
    entries = per_layer.entries(stream.model.config)
    c = stream.model.config
    if entries is None:
        entries = [{"num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
                    "head_map": per_layer.even_map(c.num_attention_heads, c.num_key_value_heads),
                    **({} if spec.moe else {"intermediate_size": c.intermediate_size}),
                    **({spec.moe.experts_key: getattr(c, spec.moe.experts_key),
                        spec.moe.width_key: getattr(c, spec.moe.width_key)} if spec.moe else {})}] * len(stream.layers)
    fixed = source.hidden // source.head_dim if FAMILIES[source.architecture].full_heads else None
    heads, kv, layouts = common_attention([(list(e["head_map"]), e["num_key_value_heads"]) for e in entries],
                                          source.head_dim, source.hidden, max(source.dense_heads, fixed or 0), fixed)
    width = experts = expert_width = None
    if spec.moe is None:
        width = max(e["intermediate_size"] for e in entries)
    else:
        counts = {e[spec.moe.experts_key] for e in entries}
        if len(counts) > 1:
            raise AmpError(f"layers keep {sorted(counts)} experts: one GGUF shape for every layer would need zero "
                           "experts, which a router can still choose (not exact); prune with --moe neurons, or "
                           "serve it with --format vllm")
        experts = counts.pop()
        expert_width = max(e[spec.moe.width_key] for e in entries)
    return heads, kv, layouts, width, experts, expert_width, entries


def export(source, out: Path, progress, dtype: str) -> dict:
    import gguf

    from ..io.sources import SafetensorsSource
    family = FAMILIES[source.architecture]
    spec = spec_for_class(source.architecture)
    stream = SafetensorsSource(source.folder, source.checkpoint)
    heads, kv, layouts, width, experts, expert_width, entries = _targets(source, stream)
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    names = gguf.get_tensor_name_map(arch, len(stream.layers))
    writer = gguf.GGUFWriter(str(out / FILE), gguf.MODEL_ARCH_NAMES[arch])
    notes = _metadata(writer, source, heads, kv, width, experts, expert_width, dtype)
    tokenizer_note = _add_tokenizer(writer, source)
    d = source.head_dim

    def layer_tensors(i, layer) -> list[tuple[str, torch.Tensor]]:
        e, lay = entries[i], layouts[i]
        pad_attention(layer, spec, e["num_attention_heads"], e["num_key_value_heads"], d, lay)
        if spec.moe is None:
            pad_mlp(layer, spec, width)
        elif not getattr(spec.moe, "is_sparse")(stream.model.config, i):
            raise AmpError(f"{source.architecture} layer {i} is dense among experts: no llama.cpp graph holds that")
        else:
            pad_experts(layer, spec.moe, expert_width)
        out = []
        for name, t in layer.state_dict().items():
            full = f"model.layers.{i}.{name}"
            if name.endswith("experts.gate_up_proj"):
                base = full[:-len(".gate_up_proj")]
                gate, up = t.chunk(2, dim=1)
                out += [(_gguf(names, base + ".gate_proj", ".weight"), gate), (_gguf(names, base + ".up_proj", ".weight"), up)]
                continue
            if name.endswith("experts.down_proj"):
                out.append((_gguf(names, full, ".weight"), t))
                continue
            stem, suffix = full.rsplit(".", 1)
            if family.permute and stem.endswith(("q_proj", "k_proj")):
                t = _permute(t, heads if stem.endswith("q_proj") else kv)
            if family.norm_shift and name.endswith("norm.weight"):
                t = t + family.norm_shift
            out.append((_gguf(names, stem, "." + suffix), t))
        return out

    globals_ = [(_gguf(names, "model.embed_tokens", ".weight"), "model.embed_tokens.weight")]
    norm = "model.norm.weight"
    globals_.append((_gguf(names, "model.norm", ".weight"), norm))
    if not source.tied and source.has("lm_head.weight") and source.architecture != "Gemma2ForCausalLM":
        globals_.append((_gguf(names, "lm_head", ".weight"), "lm_head.weight"))

    def read_global(name):
        t = source.read(name)
        return t + family.norm_shift if family.norm_shift and name.endswith("norm.weight") else t
    infos = []
    for gname, name in globals_:
        infos.append((gname, tuple(source.checkpoint.tensors[name].shape)))
    for i in range(len(stream.layers)):  # shapes from the meta skeleton: the checkpoint is read once, below
        for gname, t in layer_tensors(i, copy.deepcopy(stream.layers[i])):
            infos.append((gname, tuple(t.shape)))
    for gname, shape in infos:
        np_dtype, nbytes, raw = _info(shape, dtype)
        writer.add_tensor_info(gname, shape, np_dtype, nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, name in globals_:
        writer.write_tensor_data(_array(read_global(name), dtype)[0])
    for i in progress(range(len(stream.layers)), f"exporting (gguf {gguf.MODEL_ARCH_NAMES[arch]})"):
        layer = stream.load_layer(i, "cpu", torch.float32)
        try:
            for _, t in layer_tensors(i, layer):
                writer.write_tensor_data(_array(t, dtype)[0])
        finally:
            stream.release_layer(i)
    writer.close()
    layers = []
    for i, (e, lay) in enumerate(zip(entries, layouts)):
        zero = heads - e["num_attention_heads"]
        added = kv - e["num_key_value_heads"]
        mlp = (width - e["intermediate_size"]) * 3 * source.hidden if width else \
            experts * (expert_width - e[spec.moe.width_key]) * 3 * source.hidden
        layers.append({"layer": i, "query_heads": heads, "kv_heads": kv, "zero_query_heads": zero,
                       "added_kv_heads": added, "padded_neurons": (width or expert_width) - e.get(
                           "intermediate_size", e.get(spec.moe.width_key if spec.moe else "", 0)),
                       "params_added": (zero + added) * 2 * d * source.hidden + mlp})
    if any(entry["params_added"] for entry in layers):
        notes.append("a per-layer result padded to one shape for every layer (llama.cpp's "
                     f"{gguf.MODEL_ARCH_NAMES[arch]} graph reads layer 0's sizes); --format vllm serves it unpadded")
    if tokenizer_note:
        notes.append(tokenizer_note)
    return {"layers": layers, "file": FILE, "dtype": dtype, "architecture_gguf": gguf.MODEL_ARCH_NAMES[arch],
            "notes": notes}


def _gguf(names, hf_name: str, suffix: str) -> str:
    mapped = names.get_name(hf_name)
    if mapped is None:
        raise AmpError(f"no GGUF name for {hf_name}")
    return mapped + suffix


def _metadata(writer, source, heads, kv, width, experts, expert_width, dtype) -> list[str]:
    """The architecture keys llama.cpp reads for the family (convert_hf_to_gguf.py's, plus head_dim always)."""
    import gguf
    c, arch, d = source.config, source.architecture, source.head_dim
    notes = []
    rope = _rope(c)
    writer.add_name(Path(source.folder).name)
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(c.get("max_position_embeddings", 4096))
    writer.add_embedding_length(source.hidden)
    # the llama graph sizes its experts from feed_forward_length; qwen3moe from expert_feed_forward_length
    writer.add_feed_forward_length(width if width is not None else expert_width if arch == "MixtralForCausalLM"
                                   else c.get("intermediate_size", expert_width))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    writer.add_key_length(d)
    writer.add_value_length(d)
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    kind = rope.get("rope_type") or rope.get("type")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if experts is not None:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(c["num_experts_per_tok"])
        if arch == "Qwen3MoeForCausalLM":
            writer.add_expert_feed_forward_length(expert_width)
    if arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        types = c.get("layer_types") or []
        window = c.get("sliding_window")
        if window:
            writer.add_sliding_window(window)
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        if arch == "Gemma2ForCausalLM":
            writer.add_attn_logit_softcapping(c.get("attn_logit_softcapping") or 0.0)
            writer.add_final_logit_softcapping(c.get("final_logit_softcapping") or 0.0)
        else:
            if c.get("final_logit_softcapping"):
                writer.add_final_logit_softcapping(c["final_logit_softcapping"])
            params = c.get("rope_parameters") or {}
            local = (params.get("sliding_attention") or {}).get("rope_theta", c.get("rope_local_base_freq"))
            if local:
                writer.add_rope_freq_base_swa(float(local))
    if arch == "Phi3ForCausalLM":
        factor = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
        writer.add_rope_dimension_count(int(factor * d))
        writer.add_sliding_window(c.get("sliding_window") or 0)
        if rope.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if c.get("sliding_window") and c["sliding_window"] < c.get("max_position_embeddings", 0):
            notes.append(f"llama.cpp disables Phi-3's sliding window ({c['sliding_window']} tokens): outputs match "
                         "transformers within the window and differ past it")
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    return notes

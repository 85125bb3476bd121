"""GGUF for llama.cpp. LLaMA and Mistral: `general.architecture = "deci"`, whose graph reads per-layer arrays `head_count`,
`head_count_kv` and `feed_forward_length` (llama.cpp's `llama` graph reads only global values). Query heads vary
per layer here, so only uneven groups need padding (to the cheapest even map of that layer, export/padding.py).

Tensors are f32, f16 or bf16 (norms stay f32), streamed one at a time through gguf's GGUFWriter (tensor infos
first, then each tensor's data). q and k rows are permuted from the Hugging Face rotary layout to llama.cpp's, per
layer with that layer's head counts, as llama.cpp's own converter does. The tokenizer is carried over: copied from
the GGUF file the model was dequantized from when there is one (the bundled SmolLM2), else built from
tokenizer.json for byte-level BPE tokenizers. Every other family goes to its own architecture (gguf_native.py).
Quantize afterwards with llama.cpp's own tool:
`llama-quantize model.gguf model-q4_k_m.gguf Q4_K_M`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..common.errors import AmpError
from ..io.models import gguf_origin
from . import gguf_native  # every other family, in its own llama.cpp architecture
from .padding import layout_for, padding_cost
from .source import ExportSource

DECI = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED = DECI + tuple(gguf_native.FAMILIES)
WHY = "llama.cpp runs Phi-1.5 / Phi-2 (phi2) with a graph this export does not write yet; use --format vllm"
DTYPES = ("f32", "f16", "bf16")
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


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from Hugging Face's rotate-half order to llama.cpp's interleaved order."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rows(tensor: torch.Tensor, sources, per: int) -> torch.Tensor:
    out = tensor.new_zeros((len(sources) * per, *tensor.shape[1:]))
    for i, src in enumerate(sources):
        if src >= 0:
            out[i * per:(i + 1) * per] = tensor[src * per:(src + 1) * per]
    return out


def _array(t: torch.Tensor, dtype: str):
    """(numpy array, raw GGML type or None) of a tensor in the export dtype (1-D tensors: f32)."""
    import gguf
    t = t.detach().cpu()
    if t.dim() == 1 or dtype == "f32":
        return t.float().numpy(), None
    if dtype == "f16":
        return t.half().numpy(), None
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16


def _info(shape: tuple, dtype: str):
    """(numpy dtype, bytes, raw GGML type or None) of a tensor of `shape` as _array would write it."""
    import gguf
    n = 1
    for x in shape:
        n *= x
    if len(shape) == 1 or dtype == "f32":
        return np.float32, 4 * n, None
    if dtype == "f16":
        return np.float16, 2 * n, None
    return np.uint16, 2 * n, gguf.GGMLQuantizationType.BF16


def _rope_factors(config: dict, head_dim: int) -> torch.Tensor | None:
    """LLaMA-3's rope scaling as llama.cpp reads it: per-frequency factors (the base frequencies over the scaled
    ones transformers computes), or None without llama3 scaling."""
    scaling = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if (scaling.get("rope_type") or scaling.get("type")) != "llama3":
        return None
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "amp_per_layer")})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = scaling.get("rope_theta", config.get("rope_theta", 10000.0))
    plain = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return (plain / scaled.float()).float()


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def export(source: ExportSource, out: Path, progress, dtype: str = "f16") -> dict:
    import gguf
    if dtype not in DTYPES:
        raise AmpError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
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


def _add_tokenizer(writer, source: ExportSource) -> str | None:
    """Copies the tokenizer metadata of the GGUF the model came from, else builds it from tokenizer.json; returns
    a note when the pre-tokenizer had to be guessed."""
    import gguf
    origin = gguf_origin(source.folder)
    if origin is not None:
        reader = gguf.GGUFReader(str(origin))
        for key, field in reader.fields.items():
            if not key.startswith("tokenizer."):
                continue
            value = field.contents()
            if field.types[0] == gguf.GGUFValueType.ARRAY:
                writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=field.types[-1])
            else:
                writer.add_key_value(key, value, field.types[0])
        return None
    path = source.folder / "tokenizer.json"
    if not path.is_file():
        raise AmpError(f"{source.folder} has no tokenizer.json (and did not come from a GGUF file): the GGUF export "
                       "needs the tokenizer to carry over")
    spec = json.loads(path.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise AmpError(f"{path}: a {model.get('type')} tokenizer; this GGUF export carries byte-level BPE tokenizers "
                       "(and any tokenizer of a model dequantized from GGUF); convert it with llama.cpp's "
                       "convert_hf_to_gguf.py instead")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    size = max(source.config["vocab_size"], max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        t = added.get(text)
        types[i] = (gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED) if t else \
            gguf.TokenType.NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(source.folder, load_merges=True, n_vocab=size)
    special.add_to_gguf(writer, quiet=True)
    if not special.merges:  # a byte-level vocabulary without merges: llama.cpp still wants the (empty) list
        writer.add_token_merges([])
    return ("the tokenizer was rebuilt from tokenizer.json with llama.cpp's default BPE pre-tokenizer; check that "
            "llama.cpp splits text as transformers does (llama.cpp's convert_hf_to_gguf.py names the exact one)")

"""Models whose decoder layers differ in shape, for plain transformers: the file an amp per-layer model folder
carries beside its weights (copied there as modeling_amp.py and named by config.json's `auto_map`), and the code
the engine itself builds such models with. It imports torch and transformers only, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads the folder where the engine is not installed (lm-eval's `hf` backend, peft, TRL, pipeline()).

The form: config.json keeps the family's global sizes and adds `amp_per_layer`, one entry per decoder layer with
its `num_attention_heads`, `num_key_value_heads` and `head_map` (query head -> KV head, uneven groups allowed) and
its MLP sizes under the family's own keys (`intermediate_size`; for a mixture-of-experts layer the expert count
and width: Mixtral `num_local_experts` / `intermediate_size`, Qwen3-MoE `num_experts` / `moe_intermediate_size`).
A key a layer does not use is read from the global config. Its `model_type` is the family's with an `amp_` prefix
(`amp_llama`): a type transformers does not know, so that a load without trust_remote_code stops at transformers'
own "contains custom code" message instead of a size-mismatch report. `architectures` keeps the family's class
name, and the classes here keep the family's names too (subclasses: isinstance checks, peft's and lm-eval's
lookups by class name, and a save_pretrained round trip all see the family).

How layers get their own shapes: the family's decoder-layer class is built from a view of the config (its own
entry over the global config), and the base model switches to the index-based attention ("amp_indexed": each
query head's KV head gathered, then SDPA) when some layer's groups are uneven, which stock SDPA cannot do. Both
are patches of the family classes that act only on a config carrying `amp_per_layer`; every other model is
untouched. transformers' own per-layer form (`per_layer_config`, 5.x) does not fit these families: LlamaConfig
reads per-layer attributes globally while it is built, every layer is validated for hidden_size %
num_attention_heads == 0 (which single-head pruning breaks), and no modelling code is built from it.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

KEY = "amp_per_layer"
PREFIX = "amp_"                  # model_type of a per-layer folder: PREFIX + the family's model_type
ATTN_INDEXED = "amp_indexed"     # uneven head maps on stock kernels (index + SDPA)
# The same quantity under two names: transformers 5 reads a MoE config's expert count as num_local_experts through
# attribute_map, Qwen3-MoE's modelling code (and transformers 4.57) asks for num_experts.
ALIASES = {"num_experts": "num_local_experts", "num_local_experts": "num_experts"}
# The family's model_type -> (transformers module, config class, causal-LM class, decoder-layer class, base model).
FAMILIES = {
    "llama": ("llama", "LlamaConfig", "LlamaForCausalLM", "LlamaDecoderLayer", "LlamaModel"),
    "mistral": ("mistral", "MistralConfig", "MistralForCausalLM", "MistralDecoderLayer", "MistralModel"),
    "qwen2": ("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "Qwen2DecoderLayer", "Qwen2Model"),
    "phi": ("phi", "PhiConfig", "PhiForCausalLM", "PhiDecoderLayer", "PhiModel"),
    "phi3": ("phi3", "Phi3Config", "Phi3ForCausalLM", "Phi3DecoderLayer", "Phi3Model"),
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "Qwen3DecoderLayer", "Qwen3Model"),
    "gemma2": ("gemma2", "Gemma2Config", "Gemma2ForCausalLM", "Gemma2DecoderLayer", "Gemma2Model"),
    "gemma3_text": ("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", "Gemma3DecoderLayer", "Gemma3TextModel"),
    "mixtral": ("mixtral", "MixtralConfig", "MixtralForCausalLM", "MixtralDecoderLayer", "MixtralModel"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "Qwen3MoeDecoderLayer", "Qwen3MoeModel"),
}


# ---------------------------------------------------------------- the config form
class LayerConfig:
    """One layer's view of the global config: its own sizes and head map, everything else (the attention
    implementation included, so that switching it on the model reaches every layer) read from the global one."""

    def __init__(self, base, entry: dict):
        self.__dict__["_base"] = base
        own = {k: v for k, v in entry.items() if k != "head_map"}
        self.__dict__["_own"] = {**own, "amp_head_map": list(entry["head_map"])}

    def __getattr__(self, name):
        own, base = self.__dict__.get("_own"), self.__dict__.get("_base")
        if own is None or base is None:  # mid-copy (copy / pickle build the object before its state)
            raise AttributeError(name)
        if name in own:
            return own[name]
        if ALIASES.get(name) in own:
            return own[ALIASES[name]]
        return getattr(base, name)

    def __setattr__(self, name, value):
        self.__dict__["_own"][name] = value


def entries(config) -> list[dict] | None:
    return getattr(config, KEY, None) or None


def even_map(heads: int, kv_heads: int) -> list[int]:
    return [h // (heads // kv_heads) for h in range(heads)] if heads % kv_heads == 0 else []


def is_uneven(entry: dict) -> bool:
    return list(entry["head_map"]) != even_map(entry["num_attention_heads"], entry["num_key_value_heads"])


def check(config) -> None:
    """Per-layer entries the modelling code can build (ValueError otherwise): one per layer, sizes positive, maps
    in range and covering every KV head."""
    layers = entries(config)
    if layers is None:
        return
    if len(layers) != config.num_hidden_layers:
        raise ValueError(f"{KEY} has {len(layers)} entries for {config.num_hidden_layers} layers")
    for i, e in enumerate(layers):
        missing = [k for k in ("num_attention_heads", "num_key_value_heads", "head_map") if k not in e]
        if missing:
            raise ValueError(f"{KEY}[{i}] lacks {', '.join(missing)}")
        heads, kv, head_map = e["num_attention_heads"], e["num_key_value_heads"], list(e["head_map"])
        sizes = {k: v for k, v in e.items() if k != "head_map"}
        if any(not isinstance(v, int) or v < 1 for v in sizes.values()) or len(head_map) != heads or \
                sorted(set(head_map)) != list(range(kv)):
            raise ValueError(f"{KEY}[{i}] is inconsistent: {heads} heads, {kv} KV heads, head map {head_map}, "
                             f"sizes {sizes}")


# ---------------------------------------------------------------- attention with any head map
def head_map_tensor(module, device) -> torch.Tensor | None:
    """The attention module's head map on `device` (cached), or None for even grouping."""
    head_map = getattr(module, "amp_head_map", None)
    if head_map is None:
        return None
    cache = module.__dict__.setdefault("_amp_head_map_cache", {})
    if device not in cache:
        cache[device] = torch.as_tensor(head_map, dtype=torch.long, device=device)
    return cache[device]


def head_map_of(module, num_heads: int, num_kv_heads: int, device) -> tuple[torch.Tensor, int]:
    """(the module's head map, the group size when the map is the even grouping, else 0). A per-layer checkpoint
    gives the module its own map (uneven groups allowed); otherwise the grouping is even."""
    head_map = head_map_tensor(module, device)
    even = num_heads // num_kv_heads if num_heads % num_kv_heads == 0 else 0
    if head_map is None:
        if not even:
            raise ValueError(f"{num_heads} query heads on {num_kv_heads} KV heads need a head map (amp_head_map)")
        return torch.arange(num_heads, device=device) // even, even
    cache = module.__dict__["_amp_head_map_cache"]  # filled by head_map_tensor; evenness checked once, not per call
    if "even" not in cache:
        cache["even"] = even if even and list(module.amp_head_map) == [h // even for h in range(num_heads)] else 0
    return head_map, cache["even"]


def _softcapped(query, k, v, attention_mask, scaling, causal, softcap: float):
    """Gemma 2's attention: scores soft-capped (softcap * tanh(scores / softcap)) before the mask and the softmax,
    which SDPA cannot do; computed as transformers' eager path does (softmax in float32)."""
    t, s = query.shape[2], k.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., :s]
    elif causal and t > 1:
        qpos = torch.arange(t, device=query.device)[:, None] + (s - t)
        scores = scores.masked_fill(torch.arange(s, device=query.device)[None, :] > qpos, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, v)


def indexed_attention(query, key, value, head_map, attention_mask=None, scaling=None, causal=True, dropout=0.0,
                      group: int = 0, softcap: float | None = None):
    """Every query head gets its own KV head gathered, then SDPA (any mask). Causal masking aligns the last query
    with the last key. `group`: the group size when the map is the even grouping; a decode step then packs each
    group's queries onto its KV head instead of copying the cache (as transformers' own SDPA path does).
    `softcap` (Gemma 2): the eager soft-capped path."""
    b, h, t, d = query.shape
    s = key.shape[2]
    if softcap:
        k = key if group == 1 else key.index_select(1, head_map)
        v = value if group == 1 else value.index_select(1, head_map)
        return _softcapped(query, k, v, attention_mask, scaling, causal, softcap)
    if group > 1 and t == 1 and attention_mask is None and dropout == 0.0:
        packed = query.reshape(b, h // group, group, d)  # heads of a group are contiguous
        out = F.scaled_dot_product_attention(packed, key, value, scale=scaling)
        return out.reshape(b, h, 1, d)
    if group == 1:  # one query head per KV head, in order: nothing to gather
        k, v = key, value
    else:
        k = key.index_select(1, head_map)
        v = value.index_select(1, head_map)
    is_causal = False
    if attention_mask is None and causal and t > 1:
        if t == s:
            is_causal = True
        else:  # chunked prefill against a cache: bottom-right aligned causal mask
            qpos = torch.arange(t, device=query.device)[:, None] + (s - t)
            attention_mask = torch.arange(s, device=query.device)[None, :] <= qpos
    return F.scaled_dot_product_attention(query, k, v, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                          is_causal=is_causal)


def indexed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                              is_causal=None, **kwargs):
    """transformers' attention-function contract: q (B,H,T,d), k/v (B,KV,S,d) after the cache update;
    returns ((B,T,H,d), None). A sliding window arrives as a mask."""
    if kwargs.get("output_attentions"):
        raise ValueError("the amp attention does not return attention weights")
    head_map, group = head_map_of(module, query.shape[1], key.shape[1], query.device)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = indexed_attention(query, key, value, head_map, attention_mask, scaling, causal, dropout, group,
                            kwargs.get("softcap"))
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """"amp_indexed" in transformers' attention registry, with `sdpa_mask` as its mask function (so a pure causal
    batch hands over no mask at all)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTN_INDEXED, indexed_attention_forward)
    AttentionMaskInterface.register(ATTN_INDEXED, sdpa_mask)


# ---------------------------------------------------------------- building layers of their own shapes
def _patch_layer(cls) -> None:
    original = cls.__init__

    def __init__(self, config, layer_idx, *args, **kwargs):
        layers = entries(config)
        if layers is None:
            return original(self, config, layer_idx, *args, **kwargs)
        view = LayerConfig(config, layers[layer_idx])
        original(self, view, layer_idx, *args, **kwargs)
        if is_uneven(layers[layer_idx]):  # the attention applies the map by index; groups mean nothing here
            self.self_attn.amp_head_map = view.amp_head_map
            self.self_attn.num_key_value_groups = 1
    __init__.amp_patched = True
    cls.__init__ = __init__


def _patch_model(cls) -> None:
    original = cls.__init__

    def __init__(self, config, *args, **kwargs):
        check(config)
        original(self, config, *args, **kwargs)
        layers = entries(config)
        if layers and any(is_uneven(e) for e in layers):
            register_attention()
            config._attn_implementation_internal = ATTN_INDEXED
    __init__.amp_patched = True
    cls.__init__ = __init__


def _modules(model_type: str):
    module = FAMILIES[model_type][0]
    return (importlib.import_module(f"transformers.models.{module}.configuration_{module}"),
            importlib.import_module(f"transformers.models.{module}.modeling_{module}"))


def install() -> None:
    """Patches every family's decoder-layer and base-model classes (once per process: the engine and a folder's
    copy of this file share the mark, so whichever comes first patches)."""
    for model_type, (_, _, _, layer_cls, model_cls) in FAMILIES.items():
        try:
            _, modeling = _modules(model_type)
        except ImportError:  # a family this transformers does not have
            continue
        for cls, patch in ((getattr(modeling, layer_cls), _patch_layer), (getattr(modeling, model_cls), _patch_model)):
            if not getattr(cls.__init__, "amp_patched", False):
                patch(cls)


def _define(model_type: str) -> None:
    """The family's config and causal-LM classes under their own names, with model_type PREFIX + the family's;
    transformers >= 5 converts hub tensor names (a MoE's per-expert tensors into fused ones) per model_type, and
    applies no conversion to remote code unless one is registered for its type: the family's is registered."""
    configuration, modeling = _modules(model_type)
    _, config_name, model_name, _, _ = FAMILIES[model_type]
    config_cls = type(config_name, (getattr(configuration, config_name),),
                      {"model_type": PREFIX + model_type, "__module__": __name__})
    model_cls = type(model_name, (getattr(modeling, model_name),), {"config_class": config_cls, "__module__": __name__})
    globals()[config_name], globals()[model_name] = config_cls, model_cls
    try:
        from transformers import conversion_mapping
    except ImportError:  # transformers 4: tensors load under their hub names
        return
    mapping = conversion_mapping.get_checkpoint_conversion_mapping(model_type)
    if mapping is not None:
        conversion_mapping.register_checkpoint_conversion_mapping(PREFIX + model_type, mapping, overwrite=True)


def classes(model_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) of a family's per-layer form (model_type with or without the prefix)."""
    _, config_name, model_name, _, _ = FAMILIES[model_type.removeprefix(PREFIX)]
    return globals()[config_name], globals()[model_name]


for _type in FAMILIES:
    try:
        _define(_type)
    except (ImportError, AttributeError):  # a family this transformers does not have
        pass
install()

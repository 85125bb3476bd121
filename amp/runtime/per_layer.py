"""Models whose decoder layers differ in shape (per-layer budgets, single query heads): the config form, and the
patch that makes transformers build them (checking a checkpoint's tensors against the form is io/loading.py's).

config.json keeps the dense model's global sizes and adds `amp_per_layer`: one entry per decoder layer with its
`num_attention_heads`, `num_key_value_heads` and `head_map` (query head -> KV head, uneven groups allowed), and the
sizes of its MLP under the family's own config keys: `intermediate_size` for a dense MLP; for a mixture-of-experts
layer the expert count and width (Mixtral: `num_local_experts`, `intermediate_size`; Qwen3-MoE: `num_experts`,
`moe_intermediate_size`). A key a layer does not use is left out and read from the global config. transformers 5.x has a per-layer form of its own (`per_layer_config`, HeterogeneousConfigMixin);
checked in 5.24 and not usable for these families: LlamaConfig reads per-layer attributes globally while it is
built (AmbiguousGlobalPerLayerAttributeError), every layer's config is validated for hidden_size %
num_attention_heads == 0 (which single-head pruning breaks), and no modelling code is built from it.

`import amp` patches the decoder-layer classes of the supported families so that layer i is built from its own
entry (a view over the global config), and the base-model classes so that a model with uneven head maps runs the
index-based attention ("amp_indexed": each query head's KV head gathered, then SDPA), since stock SDPA cannot
group unevenly. A model without `amp_per_layer` is untouched: a uniform prune stays a plain config.
"""
from __future__ import annotations

import importlib

from ..arch import SPECS
from ..common.errors import AmpError
from .attention import ATTN_INDEXED, register

KEY = "amp_per_layer"
MIN_TRANSFORMERS = (4, 57)
FIELDS = ("num_attention_heads", "num_key_value_heads")     # every entry has these (and head_map)
# The same quantity under two names: transformers 5 reads a MoE config's expert count as num_local_experts through
# attribute_map, Qwen3-MoE's modelling code (and transformers 4.57) asks for num_experts.
ALIASES = {"num_experts": "num_local_experts", "num_local_experts": "num_experts"}


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


def check_version() -> None:
    import transformers
    have = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if have < MIN_TRANSFORMERS:
        need = ".".join(map(str, MIN_TRANSFORMERS))
        raise AmpError(f"this checkpoint has per-layer shapes ({KEY}); building it needs transformers >= {need} "
                       f"with `import amp`, found {transformers.__version__}")


def validate(config) -> None:
    """Per-layer entries that the modelling code can build: one per layer, sizes positive, maps in range and
    covering every KV head."""
    layers = entries(config)
    if layers is None:
        return
    check_version()
    if len(layers) != config.num_hidden_layers:
        raise AmpError(f"{KEY} has {len(layers)} entries for {config.num_hidden_layers} layers")
    for i, e in enumerate(layers):
        missing = [k for k in (*FIELDS, "head_map") if k not in e]
        if missing:
            raise AmpError(f"{KEY}[{i}] lacks {', '.join(missing)}")
        heads, kv, head_map = e["num_attention_heads"], e["num_key_value_heads"], list(e["head_map"])
        sizes = {k: v for k, v in e.items() if k != "head_map"}
        if any(not isinstance(v, int) or v < 1 for v in sizes.values()) or len(head_map) != heads or \
                sorted(set(head_map)) != list(range(kv)):
            raise AmpError(f"{KEY}[{i}] is inconsistent: {heads} heads, {kv} KV heads, head map {head_map}, "
                           f"sizes {sizes}")


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
        validate(config)
        original(self, config, *args, **kwargs)
        layers = entries(config)
        if layers and any(is_uneven(e) for e in layers):
            register()
            config._attn_implementation_internal = ATTN_INDEXED
    __init__.amp_patched = True
    cls.__init__ = __init__


def install() -> None:
    """Patches the supported families' decoder-layer and base-model classes (once)."""
    for spec in SPECS:
        for module, layer_cls, model_cls in spec.hf:
            mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
            for cls, patch in ((getattr(mod, layer_cls), _patch_layer), (getattr(mod, model_cls), _patch_model)):
                if not getattr(cls.__init__, "amp_patched", False):
                    patch(cls)


def meta_model(config, dtype=None):
    """A model of shapes only (the meta device, no weights allocated; buffers such as rotary tables are small
    and stay real), per-layer configs included; a tied lm_head is tied again (from_config under
    init_empty_weights leaves it untied)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    install()
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    model.tie_weights()
    return model.eval()


def adopt(model) -> None:
    """A model pruned in memory into per-layer shapes: each layer's modules read their own sizes from a view of
    the config (as a freshly loaded one would), and uneven head maps switch attention to the index-based path."""
    layers = entries(model.config)
    if layers is None:
        return
    for layer, entry in zip(model.model.layers, layers):
        view = LayerConfig(model.config, entry)
        for module in (layer, layer.self_attn, layer.mlp):
            if "config" in module.__dict__ or hasattr(module, "config"):
                module.config = view
    if any(is_uneven(e) for e in layers):
        register()
        model.set_attn_implementation(ATTN_INDEXED)


def per_layer_config(config, shapes: list[dict]):
    """The config of a model with per-layer `shapes` (dicts of sizes under config keys, and head_map): plain if
    every key has one value over the layers that use it and every map is even (then no `import amp` is needed to
    load it), else with `amp_per_layer`."""
    import copy
    target = copy.deepcopy(config)
    values: dict[str, set] = {}
    for shape in shapes:
        for k, v in shape.items():
            if k != "head_map":
                values.setdefault(k, set()).add(int(v))
    if all(len(v) == 1 for v in values.values()) and not any(is_uneven(s) for s in shapes):
        for k, v in values.items():
            setattr(target, k, next(iter(v)))
        return target
    setattr(target, KEY, [{**{k: int(v) for k, v in s.items() if k != "head_map"},
                           "head_map": [int(h) for h in s["head_map"]]} for s in shapes])
    return target

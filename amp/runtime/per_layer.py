"""Models whose decoder layers differ in shape (per-layer budgets, single query heads), on the engine's side: the
config form and the patches live in modeling_amp.py (the file every per-layer folder carries, so that plain
transformers loads it with trust_remote_code); here the engine installs them, checks a config with its own errors,
builds configs and meta models, and writes or strips the folder's self-contained form (checking a checkpoint's
tensors against the form is io/loading.py's).

A model without `amp_per_layer` is untouched: a uniform prune stays a plain checkpoint of its family.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..common.errors import AmpError
from . import modeling_amp
from .modeling_amp import KEY, LayerConfig, entries, even_map, is_uneven  # noqa: F401  (the engine's names)
from .attention import ATTN_INDEXED, register

MIN_TRANSFORMERS = (4, 57)
MODELING_FILE = "modeling_amp.py"


def check_version() -> None:
    import transformers
    have = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if have < MIN_TRANSFORMERS:
        need = ".".join(map(str, MIN_TRANSFORMERS))
        raise AmpError(f"this checkpoint has per-layer shapes ({KEY}); building it needs transformers >= {need} "
                       f"with `import amp`, found {transformers.__version__}")


def validate(config) -> None:
    """Per-layer entries that the modelling code can build (AmpError otherwise)."""
    if entries(config) is None:
        return
    check_version()
    try:
        modeling_amp.check(config)
    except ValueError as e:
        raise AmpError(str(e)) from None


def install() -> None:
    """Patches the supported families' classes (once), and registers their per-layer forms with the Auto classes, so
    that the engine loads a per-layer folder without trust_remote_code; models built from them save their folder
    whole (save_pretrained copies modeling_amp.py and writes auto_map)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    modeling_amp.install()
    for model_type in modeling_amp.FAMILIES:
        try:
            config_cls, model_cls = modeling_amp.classes(model_type)
        except KeyError:  # a family this transformers does not have
            continue
        if config_cls.model_type not in _REGISTERED:
            AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
            AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
            config_cls.register_for_auto_class()
            model_cls.register_for_auto_class("AutoModelForCausalLM")
            _REGISTERED.add(config_cls.model_type)


_REGISTERED: set[str] = set()


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
    the config (as a freshly loaded one would), uneven head maps switch attention to the index-based path, and the
    model and its config become their family's per-layer form (modeling_amp's subclasses), so that its own
    save_pretrained writes a folder plain transformers loads (model_type amp_*, auto_map, modeling_amp.py)."""
    layers = entries(model.config)
    if layers is None:
        return
    model_type = model.config.model_type.removeprefix(modeling_amp.PREFIX)
    if model_type in modeling_amp.FAMILIES:
        config_cls, model_cls = modeling_amp.classes(model_type)
        if issubclass(model_cls, type(model)):
            model.__class__, model.config.__class__ = model_cls, config_cls
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


def write_standalone(folder) -> bool:
    """A per-layer folder made loadable by plain transformers (trust_remote_code=True, no engine installed): its
    model_type becomes the family's with the `amp_` prefix, config.json names modeling_amp.py's classes in
    `auto_map`, and the file is copied beside the weights. A folder without per-layer shapes is left as it is (a
    plain checkpoint of its family). True when the folder has per-layer shapes."""
    folder = Path(folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if not config.get(KEY):
        return False
    model_type = config["model_type"].removeprefix(modeling_amp.PREFIX)
    if model_type not in modeling_amp.FAMILIES:
        raise AmpError(f"{folder}: no per-layer modelling code for model_type {model_type}")
    _, config_name, model_name, _, _ = modeling_amp.FAMILIES[model_type]
    config["model_type"] = modeling_amp.PREFIX + model_type
    config["auto_map"] = {"AutoConfig": f"{MODELING_FILE[:-3]}.{config_name}",
                          "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{model_name}"}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(modeling_amp.__file__, folder / MODELING_FILE)
    return True


def family_form(config: dict) -> dict:
    """config.json's dict as its family writes it (for runtimes that read the family's model_type: the vLLM
    plugin's form, GGUF): the `amp_` prefix and auto_map removed."""
    out = {k: v for k, v in config.items() if k != "auto_map"}
    if "model_type" in out:
        out["model_type"] = out["model_type"].removeprefix(modeling_amp.PREFIX)
    return out

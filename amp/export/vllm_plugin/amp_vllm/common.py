"""What every variant shares: a read-only view of a config with one layer's sizes, and a scoped swap of the name
a vLLM model module builds its layers (or its inner model) from, so that the family's own classes do the rest."""
from __future__ import annotations

from contextlib import contextmanager

KEY = "amp_per_layer"  # the checkpoint's per-layer sizes: one dict of config keys per decoder layer


class View:
    """`base` with some attributes answered otherwise; everything else is read from `base` (never written)."""

    def __init__(self, base, **overrides):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name):
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name, value):  # a family's layer may set a default on its config: keep it local
        object.__getattribute__(self, "_overrides")[name] = value

    def get_text_config(self, *args, **kwargs):
        return self


def layer_index(prefix: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index
    return extract_layer_index(prefix)


def layer_config(config, prefix: str):
    """The model's config as layer `prefix` must see it: its own head counts, MLP width, experts."""
    entries = getattr(config, KEY, None)
    if not entries:
        return config
    entry = {k: v for k, v in entries[layer_index(prefix)].items() if k != "head_map"}
    return View(config, **entry)


def vllm_config_for(vllm_config, prefix: str):
    """A VllmConfig whose model config answers with layer `prefix`'s sizes (for families whose layers read their
    config from the VllmConfig itself)."""
    model_config = vllm_config.model_config
    layer = layer_config(model_config.hf_text_config, prefix)
    return View(vllm_config, model_config=View(model_config, hf_config=layer, hf_text_config=layer))


@contextmanager
def swapped(module, **names):
    """`module.<name>` replaced while the context is open (model construction is single-threaded)."""
    saved = {name: getattr(module, name) for name in names}
    for name, value in names.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def per_layer(layer_cls):
    """A subclass of a decoder layer built from a config as its first argument, that gives it the layer's view."""
    class Layer(layer_cls):
        def __init__(self, config, *args, prefix: str = "", **kwargs):
            super().__init__(layer_config(config, prefix), *args, prefix=prefix, **kwargs)
    Layer.__name__ = Layer.__qualname__ = f"Amp{layer_cls.__name__}"
    return Layer

"""The decoder layers' inputs over the calibration set, captured once: the embeddings run (on the device, in the
stored dtype), and a stand-in for every decoder layer records the arguments the model's own forward hands it. Layer
0's hidden states go into the activation store; the other arguments (masks, rotary tables) are kept per batch and
per layer, since families with sliding-window and global layers (Gemma 2/3, Qwen3 with `layer_types`) give each
kind of layer its own mask and, for Gemma 3, its own rotary tables. Layers that receive the same objects share one
copy, so a model with two kinds of layer keeps two sets per batch."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..io.activations import ActivationStore

_CACHE_KEYS = ("cache", "past_key_values", "past_key_value")


class _StopForward(Exception):
    pass


class _WrongReturn(Exception):
    """The model's loop did not get back the hidden states it expects (some families return a tuple)."""


class _LayerCatcher(nn.Module):
    """Stands in for decoder layer `index`: records its arguments and hands the hidden states back unchanged (as
    the tensor or the 1-tuple the model's loop expects); the last one stops the forward pass."""

    def __init__(self, layer: nn.Module, index: int, last: bool, on_input, as_tuple: bool):
        super().__init__()
        self.layer, self.index, self.last, self.on_input, self.as_tuple = layer, index, last, on_input, as_tuple

    def __getattr__(self, name):
        # The model's forward may read layer attributes (e.g. attention_type); answer for the real layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        self.on_input(self.index, hidden_states, args, kwargs)
        if self.last:
            raise _StopForward
        return (hidden_states,) if self.as_tuple else hidden_states


def _to(obj, device):
    """Tensors inside nested tuples / lists / dicts moved to `device` (the layer kwargs: masks, rotary tables)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _in_dtype(obj, dtype):
    """Floating tensors inside nested containers cast to `dtype` (float masks, rotary tables)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_in_dtype(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _in_dtype(v, dtype) for k, v in obj.items()}
    return obj


def _same(a, b) -> bool:
    """The same objects, value by value (a mask or rotary table the model built once for one kind of layer)."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (not isinstance(a, torch.Tensor) and type(a) is type(b) and a == b)


class LayerInputs:
    """Per calibration batch: the distinct (args, kwargs) sets the layers receive, and which set each layer gets."""

    def __init__(self):
        self.variants: list[list] = []    # batch -> [(args, kwargs), ...]
        self.of_layer: list[list[int]] = []  # batch -> layer -> variant

    def __len__(self) -> int:
        return len(self.variants)

    def get(self, batch: int, layer: int):
        return self.variants[batch][self.of_layer[batch][layer]]


@torch.no_grad()
def capture_layer_inputs(source, batches, device: torch.device, dtype: torch.dtype, store: ActivationStore,
                         keep_kwargs_on) -> LayerInputs:
    """Runs the embeddings (on `device`, in the stored dtype: a float32 copy of a large vocabulary's embedding
    would cost more than a layer) and puts what the first decoder layer receives into `store`, in `dtype`;
    returns every layer's other arguments per batch, in `dtype` on `keep_kwargs_on`. Rotary tables are computed
    in `dtype` (the rotary modules see their input cast to it), not rounded from the stored dtype."""
    layers, n = source.layers, len(source.layers)
    out = LayerInputs()
    seen: list = []   # this batch's raw (args, kwargs) per layer, before the cast and move
    expected = {}

    def on_input(index, hidden, args, kwargs):
        if index == 0:
            expected["shape"] = hidden.shape
            store.put(len(out), hidden.to(dtype))  # the embeddings ran in the stored dtype; the cast up is exact
        elif not isinstance(hidden, torch.Tensor) or hidden.shape != expected["shape"]:
            raise _WrongReturn
        kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KEYS}
        kwargs["use_cache"] = False
        seen.append((args, kwargs))

    def cast_rotary_input(_module, args):
        return (args[0].to(dtype), *args[1:])

    rotaries = [m for name, m in source.model.model.named_children() if "rotary" in name]
    hooks = [m.register_forward_pre_hook(cast_rotary_input) for m in rotaries]
    originals = list(layers)
    as_tuple = False
    try:
        with source.embeddings(device):
            for ids, mask in batches:
                for attempt in (0, 1):
                    seen.clear()
                    for i, layer in enumerate(originals):
                        layers[i] = _LayerCatcher(layer, i, i == n - 1, on_input, as_tuple)
                    try:
                        source.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                    except _StopForward:
                        break
                    except _WrongReturn:
                        if attempt:
                            raise
                        as_tuple = not as_tuple  # the loop indexes the layer's output: hand back a 1-tuple
                variants, of_layer = [], []
                for args, kwargs in seen:
                    match = next((v for v, raw in enumerate(variants) if _same(raw, (args, kwargs))), None)
                    if match is None:
                        variants.append((args, kwargs))
                        match = len(variants) - 1
                    of_layer.append(match)
                out.variants.append([_to(_in_dtype(v, dtype), keep_kwargs_on) for v in variants])
                out.of_layer.append(of_layer)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        for h in hooks:
            h.remove()
    return out

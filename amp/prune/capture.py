"""The first decoder layer's inputs over the calibration set: the embeddings run (on the device, in the stored
dtype), a stand-in for layer 0 records what it receives and stops the forward pass, and the hidden states go
into the activation store; the other layer arguments (masks, rotary tables) are kept per batch."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..io.activations import ActivationStore


class _StopForward(Exception):
    pass


class _InputCatcher(nn.Module):
    """Stands in for the first decoder layer: records its inputs, then stops the forward pass."""

    def __init__(self, layer: nn.Module, on_input):
        super().__init__()
        self.layer = layer
        self.on_input = on_input

    def __getattr__(self, name):
        # The model's forward may read layer attributes (e.g. attention_type); answer for the real layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        self.on_input(hidden_states, args, kwargs)
        raise _StopForward


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


@torch.no_grad()
def capture_layer_inputs(source, batches, device: torch.device, dtype: torch.dtype, store: ActivationStore,
                         keep_kwargs_on) -> list:
    """Runs the embeddings (on `device`, in the stored dtype: a float32 copy of a large vocabulary's embedding
    would cost more than a layer) and puts what the first decoder layer receives into `store`, in `dtype`;
    returns each batch's other layer arguments (masks, rotary tables), kept on `keep_kwargs_on`."""
    layers = source.layers
    extras: list = []

    rotary = getattr(source.model.model, "rotary_emb", None)

    def on_input(hidden, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        hidden = hidden.to(dtype)  # the embeddings ran in the stored dtype; the cast up is exact
        if rotary is not None and "position_embeddings" in kwargs and kwargs.get("position_ids") is not None:
            # The rotary tables come out in the embeddings' dtype: recompute them in the compute dtype.
            kwargs["position_embeddings"] = rotary(hidden, kwargs["position_ids"])
        store.put(len(extras), hidden)
        extras.append(_to(_in_dtype((args, kwargs), dtype), keep_kwargs_on))

    first = layers[0]
    layers[0] = _InputCatcher(first, on_input)
    try:
        with source.embeddings(device):
            for ids, mask in batches:
                try:
                    source.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        layers[0] = first
    return extras

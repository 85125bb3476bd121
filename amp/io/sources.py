"""Where decoder layers come from: the prune's one layer loop reads them from a source.

`ModelSource`: a model the caller holds in memory (a layer moves to the device in the compute dtype and back).
`SafetensorsSource`: a checkpoint folder streamed layer by layer; the model skeleton lives on the meta device (no
weights allocated), each layer's tensors are read lazily from the shards onto the device, and dropped back to meta
once the sink has them. Where the finished layers go is io/sinks.py.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch.nn as nn

from ..arch import spec_for
from ..common.errors import AmpError
from ..runtime.per_layer import meta_model
from .layouts import Layout
from .safetensors_io import Checkpoint

LAYER_PREFIX = "model.layers."


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=True))


def _non_persistent_buffers(module: nn.Module):
    """(owner, name) of buffers a checkpoint does not hold (Gemma's embedding scale, rotary tables): they stay
    real on the meta skeleton and follow the module to the device and back."""
    for sub in module.modules():
        for name in getattr(sub, "_non_persistent_buffers_set", ()):
            if sub._buffers.get(name) is not None:
                yield sub, name


def _move_buffers(module: nn.Module, device) -> None:
    for sub, name in _non_persistent_buffers(module):
        sub._buffers[name] = sub._buffers[name].to(device)


def _to_meta(module: nn.Module) -> None:
    """Weights back to the meta device (freed); buffers the checkpoint does not hold back to the host."""
    from accelerate.utils import set_module_tensor_to_device
    for name in module.state_dict(keep_vars=True):
        set_module_tensor_to_device(module, name, "meta")
    _move_buffers(module, "cpu")


class ModelSource:
    """A model the caller holds on the host: layers move to the device in the compute dtype and back."""
    streamed = False

    def __init__(self, model):
        self.model = model
        self.layers = model.model.layers
        first = next(model.parameters())
        self.host, self.storage_dtype = first.device, first.dtype
        self.bytes_read = 0
        self.size_bytes = None

    def load_layer(self, index: int, device, dtype) -> nn.Module:
        if self.host.type == "meta":  # a model of shapes only (budget planning): sliced where it is
            return self.layers[index]
        return self.layers[index].to(device=device, dtype=dtype)

    def release_layer(self, index: int) -> None:
        if self.host.type != "meta":
            self.layers[index].to(device=self.host, dtype=self.storage_dtype)

    @contextmanager
    def embeddings(self, device, head: bool = False):
        """Everything outside the decoder layers, on the device in its stored dtype, for capturing the first
        layer's inputs; `head`: the lm_head too (what turns the last hidden states into logits)."""
        others = [m for name, m in self.model.model.named_children() if name != "layers"]
        if head:
            others.append(self.model.lm_head)
        try:
            for m in others:
                m.to(device)
            yield
        finally:
            for m in others:
                m.to(self.host)


class SafetensorsSource:
    """A checkpoint folder streamed layer by layer: the model skeleton lives on the meta device (no weights
    allocated); a layer's tensors are read from the shards when it is needed and freed after."""
    streamed = True

    def __init__(self, folder, checkpoint: Checkpoint | None = None, storage_dtype=None):
        from transformers import AutoConfig
        self.folder = Path(folder)
        self.checkpoint = checkpoint or Checkpoint(folder)
        self.storage_dtype = storage_dtype or self.checkpoint.storage_dtype()
        config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        config.dtype = self.storage_dtype
        self.model = meta_model(config, self.storage_dtype)
        self.layers = self.model.model.layers
        self.layout = Layout(spec_for(self.model), self.checkpoint.tensors)
        shapes = self.model.state_dict()
        self.checkpoint.require([disk for name in required_tensors(self.model)
                                 for disk, _ in self.layout.disk(name, tuple(shapes[name].shape))])

    @property
    def bytes_read(self) -> int:
        return self.checkpoint.bytes_read

    @property
    def size_bytes(self) -> int:
        return self.checkpoint.size_bytes

    def _materialize(self, module: nn.Module, prefix: str, device, dtype) -> None:
        from accelerate.utils import set_module_tensor_to_device
        for name, meta in module.state_dict(keep_vars=True).items():
            full = prefix + name
            for disk, shape in self.layout.disk(full, tuple(meta.shape)):
                info = self.checkpoint.tensors[disk]
                if tuple(info.shape) != shape:
                    raise AmpError(f"{disk} in {info.file.name} has shape {tuple(info.shape)}; the config asks for "
                                   f"{shape}")
            value = self.layout.assemble(full, tuple(meta.shape), self.checkpoint.read)
            set_module_tensor_to_device(module, name, device, value=value, dtype=dtype)
            del value
        _move_buffers(module, device)

    def load_layer(self, index: int, device, dtype) -> nn.Module:
        layer = self.layers[index]
        self._materialize(layer, f"{LAYER_PREFIX}{index}.", device, dtype)
        return layer

    def release_layer(self, index: int) -> None:
        _to_meta(self.layers[index])

    @contextmanager
    def embeddings(self, device, head: bool = False):
        others = [(f"model.{name}.", m) for name, m in self.model.model.named_children() if name != "layers"]
        tied = tied_embeddings(self.model.config)
        if head and not tied:
            others.append(("lm_head.", self.model.lm_head))
        try:
            for prefix, m in others:
                if _has_params(m):
                    self._materialize(m, prefix, device, self.storage_dtype)
                else:
                    m.to(device)
            if head and tied:
                self.model.tie_weights()  # the lm_head reads the embedding just read
            yield
        finally:
            for _, m in others:
                _to_meta(m) if _has_params(m) else m.to("cpu")
            self.model.tie_weights()  # the embedding was replaced: a tied lm_head follows it again


def tied_embeddings(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def required_tensors(model) -> list[str]:
    """State-dict names a checkpoint must hold for this model (a tied lm_head is not stored)."""
    names = list(model.state_dict().keys())
    if tied_embeddings(model.config):
        names = [n for n in names if n != "lm_head.weight"]
    return names

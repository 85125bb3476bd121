"""Where finished decoder layers go: `ModelSink` (the layer stays in the model, whose config takes the new sizes
at the end) and `ShardSink` (each layer's tensors go straight into output shards, laid out up front from the
target config)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from ..arch import spec_for_class
from ..runtime import per_layer
from ..runtime.per_layer import meta_model
from .layouts import Layout, add_legacy_keys
from .safetensors_io import Checkpoint, ShardWriter
from .sources import LAYER_PREFIX, required_tensors


class ModelSink:
    """The pruned layer stays where it is; the model's config takes the new sizes at the end."""

    def __init__(self, model):
        self.model = model
        self.bytes_written = 0

    def begin(self, target_config) -> None:
        pass

    def put(self, index: int, layer: nn.Module) -> None:
        pass

    def finish(self, target_config) -> int:
        moe = spec_for_class(type(self.model).__name__).moe
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim",
                    "attention_bias", "mlp_bias", per_layer.KEY, *((moe.experts_key, moe.width_key) if moe else ())):
            if hasattr(target_config, key):
                setattr(self.model.config, key, getattr(target_config, key))
        per_layer.adopt(self.model)
        return sum(p.numel() for p in self.model.parameters())


class ShardSink:
    """Each pruned layer's tensors go straight into output shards in `folder` (layout fixed up front from the
    target config); embeddings, final norm and an untied lm_head are copied through from the checkpoint."""

    def __init__(self, folder, checkpoint: Checkpoint, storage_dtype: torch.dtype, max_shard_bytes: int,
                 layout: Layout | None = None):
        self.folder = Path(folder)
        self.checkpoint = checkpoint
        self.layout = layout  # the input's tensor names (experts one by one on disk, fused in memory)
        self.storage_dtype = storage_dtype
        self.max_shard_bytes = max_shard_bytes
        self.writer: ShardWriter | None = None
        self.params_after = 0

    @property
    def bytes_written(self) -> int:
        return self.writer.bytes_written if self.writer else 0

    def begin(self, target_config) -> None:
        target = meta_model(target_config, self.storage_dtype)
        if self.layout is None:
            self.layout = Layout(spec_for_class(type(target).__name__), self.checkpoint.tensors)
        names = required_tensors(target)
        shapes = target.state_dict()
        self.params_after = sum(p.numel() for p in target.parameters())
        self.writer = ShardWriter(self.folder, [(disk, shape, self.storage_dtype) for n in names
                                                for disk, shape in self.layout.disk(n, tuple(shapes[n].shape))],
                                  self.max_shard_bytes)
        for name in names:
            if not name.startswith(LAYER_PREFIX):
                self.writer.write(name, self.checkpoint.read(name).to(self.storage_dtype))

    def put(self, index: int, layer: nn.Module) -> None:
        for name, tensor in layer.state_dict().items():
            for disk, piece in self.layout.split(f"{LAYER_PREFIX}{index}.{name}", tensor):
                self.writer.write(disk, piece.to(device="cpu", dtype=self.storage_dtype))

    def finish(self, target_config) -> int:
        self.writer.finish()
        config = copy.deepcopy(target_config)
        config.dtype = self.storage_dtype
        config.save_pretrained(self.folder)
        add_legacy_keys(self.folder, self.layout.spec)
        generation = self.checkpoint.folder / "generation_config.json"
        if generation.is_file():
            (self.folder / generation.name).write_bytes(generation.read_bytes())
        return self.params_after

    def close(self) -> None:
        if self.writer:
            self.writer.close()

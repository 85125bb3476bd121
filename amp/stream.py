"""Where decoder layers come from and where they go: the pipeline's one layer loop reads from a source and
hands each finished layer to a sink.

Sources: `ModelSource` (a model the caller holds in memory: a layer moves to the device and back) and
`SafetensorsSource` (a skeleton on the meta device; each layer's tensors are read lazily from the checkpoint onto
the device, and dropped back to meta once the sink has them). Sinks: `ModelSink` (the layer stays in the model,
whose config is updated at the end) and `ShardSink` (each layer's tensors go straight into output shards).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from .errors import AmpError
from .safetensors_io import Checkpoint, ShardWriter

LAYER_PREFIX = "model.layers."
HALF = (torch.bfloat16, torch.float16)
COMPUTABLE = (torch.float32, torch.bfloat16, torch.float16)


def resolve_compute_dtype(storage: torch.dtype, device: torch.device, requested: torch.dtype | None):
    """(dtype the resident layer computes in, why). A bf16 checkpoint computes in bf16 where the hardware has
    bf16 arithmetic (CUDA; CPUs with AVX512-BF16 or AMX); a CPU without it (AVX2 only) computes one resident
    layer in float32 instead, which is slower but bounded by that layer."""
    if storage not in COMPUTABLE:
        raise AmpError(f"the checkpoint's dtype {storage} cannot be computed on {device.type}; "
                       "supported: float32, bfloat16, float16")
    dtype = requested or storage
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise AmpError(f"{torch.cuda.get_device_name(device)} cannot compute bfloat16; pass --compute-dtype "
                       "float16 or float32")
    if requested is not None:
        return dtype, "asked for with --compute-dtype"
    name = str(storage).replace("torch.", "")
    if device.type == "cpu" and storage in HALF:
        flag = cpu_bf16_flag()
        if storage == torch.bfloat16 and flag:
            return storage, f"the checkpoint's own dtype; this CPU has bfloat16 arithmetic ({flag})"
        return torch.float32, f"the checkpoint is {name} and this CPU has no fast {name} arithmetic: each resident " \
                              "layer computes in float32"
    return dtype, "the checkpoint's own dtype"


def cpu_bf16_flag() -> str | None:
    """The CPU feature that gives bfloat16 matrix arithmetic (amx_bf16, avx512_bf16), if this CPU has one."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=True))


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
    def embeddings(self, device):
        """Everything outside the decoder layers, on the device in its stored dtype, for capturing the first
        layer's inputs."""
        others = [m for name, m in self.model.model.named_children() if name != "layers"]
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

    def __init__(self, folder, checkpoint: Checkpoint | None = None, storage_dtype: torch.dtype | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
        self.folder = Path(folder)
        self.checkpoint = checkpoint or Checkpoint(folder)
        self.storage_dtype = storage_dtype or self.checkpoint.storage_dtype()
        config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        config.dtype = self.storage_dtype
        with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are small and computed
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.storage_dtype).eval()
        self.model.tie_weights()  # from_config under init_empty_weights leaves a tied lm_head untied
        self.layers = self.model.model.layers
        self.checkpoint.require(required_tensors(self.model))

    @property
    def bytes_read(self) -> int:
        return self.checkpoint.bytes_read

    @property
    def size_bytes(self) -> int:
        return self.checkpoint.size_bytes

    def _materialize(self, module: nn.Module, prefix: str, device, dtype) -> None:
        from accelerate.utils import set_module_tensor_to_device
        for name, meta in module.state_dict(keep_vars=True).items():
            value = self.checkpoint.read(prefix + name)
            if tuple(value.shape) != tuple(meta.shape):
                raise AmpError(f"{prefix + name} in {self.checkpoint.tensors[prefix + name].file.name} has shape "
                               f"{tuple(value.shape)}; the config asks for {tuple(meta.shape)}")
            set_module_tensor_to_device(module, name, device, value=value, dtype=dtype)
            del value

    def load_layer(self, index: int, device, dtype) -> nn.Module:
        layer = self.layers[index]
        self._materialize(layer, f"{LAYER_PREFIX}{index}.", device, dtype)
        return layer

    def release_layer(self, index: int) -> None:
        self.layers[index].to("meta")

    @contextmanager
    def embeddings(self, device):
        others = [(name, m) for name, m in self.model.model.named_children() if name != "layers"]
        try:
            for name, m in others:
                if _has_params(m):
                    self._materialize(m, f"model.{name}.", device, self.storage_dtype)
                else:
                    m.to(device)
            yield
        finally:
            for _, m in others:
                m.to("meta") if _has_params(m) else m.to("cpu")
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
        from . import heterogeneous
        for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim",
                    "attention_bias", "mlp_bias", heterogeneous.KEY):
            if hasattr(target_config, key):
                setattr(self.model.config, key, getattr(target_config, key))
        heterogeneous.adopt(self.model)
        return sum(p.numel() for p in self.model.parameters())


class ShardSink:
    """Each pruned layer's tensors go straight into output shards in `folder` (layout fixed up front from the
    target config); embeddings, final norm and an untied lm_head are copied through from the checkpoint."""

    def __init__(self, folder, checkpoint: Checkpoint, storage_dtype: torch.dtype, max_shard_bytes: int):
        self.folder = Path(folder)
        self.checkpoint = checkpoint
        self.storage_dtype = storage_dtype
        self.max_shard_bytes = max_shard_bytes
        self.writer: ShardWriter | None = None
        self.params_after = 0

    @property
    def bytes_written(self) -> int:
        return self.writer.bytes_written if self.writer else 0

    def begin(self, target_config) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM
        with init_empty_weights(include_buffers=False):
            target = AutoModelForCausalLM.from_config(target_config, dtype=self.storage_dtype)
        target.tie_weights()
        names = required_tensors(target)
        shapes = target.state_dict()
        self.params_after = sum(p.numel() for p in target.parameters())
        self.writer = ShardWriter(self.folder, [(n, tuple(shapes[n].shape), self.storage_dtype) for n in names],
                                  self.max_shard_bytes)
        for name in names:
            if not name.startswith(LAYER_PREFIX):
                self.writer.write(name, self.checkpoint.read(name).to(self.storage_dtype))

    def put(self, index: int, layer: nn.Module) -> None:
        for name, tensor in layer.state_dict().items():
            self.writer.write(f"{LAYER_PREFIX}{index}.{name}", tensor.to(device="cpu", dtype=self.storage_dtype))

    def finish(self, target_config) -> int:
        self.writer.finish()
        config = copy.deepcopy(target_config)
        config.dtype = self.storage_dtype
        config.save_pretrained(self.folder)
        generation = self.checkpoint.folder / "generation_config.json"
        if generation.is_file():
            (self.folder / generation.name).write_bytes(generation.read_bytes())
        return self.params_after

    def close(self) -> None:
        if self.writer:
            self.writer.close()

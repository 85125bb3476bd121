"""Loading a finished model folder (pruned, per-layer, recovered or plain) for evaluation, generation, recovery
and export: its per-layer entries are checked against its tensors first, so a mismatch names the layer and the
tensor instead of failing deep inside transformers."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..arch import spec_for
from ..common.dtypes import TORCH_DTYPES
from ..common.errors import AmpError
from ..runtime import per_layer
from .folders import read_report
from .layouts import Layout
from .safetensors_io import Checkpoint


def check_tensors(folder, config) -> None:
    """A per-layer checkpoint's entries against its tensors (names the layer and the tensor on a mismatch)."""
    if per_layer.entries(config) is None:
        return
    per_layer.validate(config)
    stored = Checkpoint(folder).tensors
    model = per_layer.meta_model(config)
    layout = Layout(spec_for(model), stored)
    for name, tensor in model.state_dict().items():
        for disk, shape in layout.disk(name, tuple(tensor.shape)):
            info = stored.get(disk)
            if info is not None and tuple(info.shape) != shape:
                layer = name.split(".")[2] if name.startswith("model.layers.") else "-"
                raise AmpError(f"{folder}: layer {layer}: {disk} is {tuple(info.shape)} in the checkpoint, but "
                               f"config.json's {per_layer.KEY} describes {shape}")


def _dtype(dtype):
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype == "float64":
        return torch.float64
    return TORCH_DTYPES[dtype]


def _model(folder: Path, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM
    if not (folder / "config.json").is_file():
        raise AmpError(f"{folder} is not a model folder (no config.json)")
    try:
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError) as e:
        raise AmpError(f"{folder}/config.json is unreadable: {e}") from None
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise AmpError(f"{folder} is not a causal LM (architectures: {archs or 'none'})")
    check_tensors(folder, AutoConfig.from_pretrained(folder, local_files_only=True))
    per_layer.install()
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=_dtype(dtype), local_files_only=True)
    except (OSError, ValueError) as e:
        raise AmpError(f"could not load {folder}: {str(e).splitlines()[0]}") from None


def load_causal_lm(folder, dtype=torch.float32, device: str = "cpu"):
    """(model in eval mode on `device`, tokenizer) of any causal-LM folder; the tokenizer is required."""
    from transformers import AutoTokenizer
    folder = Path(folder)
    model = _model(folder, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise AmpError(f"could not load the tokenizer of {folder}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), tokenizer


def load_pruned(folder, dtype: str = "float32", device: str | None = "cpu"):
    """(model, tokenizer or None, report or None) of a folder that `amp prune` wrote; plain transformers loads a
    uniform result too, and a per-layer one after `import amp`. `device` None: where transformers put it (the meta
    device on the ranks that FSDP loading leaves empty)."""
    from transformers import AutoTokenizer
    folder = Path(folder)
    model = _model(folder, dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True) \
        if (folder / "tokenizer_config.json").is_file() else None
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer, read_report(folder)

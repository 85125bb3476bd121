"""Dtype names as the command line spells them, and the rule for what a resident layer computes in."""
from __future__ import annotations

import torch

from ..common.errors import AmpError

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF = (torch.bfloat16, torch.float16)
COMPUTABLE = (torch.float32, torch.bfloat16, torch.float16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
    name = dtype_name(storage)
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

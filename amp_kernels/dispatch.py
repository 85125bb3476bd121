"""Chooses the Triton kernel or its pure-torch twin for a call.

Triton runs when the tensor lives on CUDA, or anywhere when TRITON_INTERPRET=1 (its CPU interpreter, used by
the kernel tests). Everywhere else, and wherever Triton does not install, the twin runs.
"""
from __future__ import annotations

import contextvars
import importlib.util
import os
from contextlib import contextmanager

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    if not TRITON_AVAILABLE:
        return False
    return t.is_cuda or interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 inputs would otherwise run as TF32 on NVIDIA GPUs (about 1e-3 relative
    error); the kernels promise fp32 results that match their twins, so fp32 dots are exact ("ieee")."""
    return "ieee" if dtype == torch.float32 else "tf32"


_TARGET_ARCH = contextvars.ContextVar("amp_target_arch", default=None)
DEFAULT_ARCH = 90  # what the launch configurations assume off a GPU (the interpreter): an H100


@contextmanager
def target_arch(arch: int):
    """Launch configurations inside the context are chosen for this GPU architecture (80: A100, 90: H100), as
    amp_kernels.compiled needs to compile for GPUs that are not here."""
    token = _TARGET_ARCH.set(arch)
    try:
        yield
    finally:
        _TARGET_ARCH.reset(token)


def arch_of(t: torch.Tensor) -> int:
    """The compute capability (major * 10 + minor) the launch configuration is chosen for."""
    forced = _TARGET_ARCH.get()
    if forced is not None:
        return forced
    if t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return major * 10 + minor
    return DEFAULT_ARCH

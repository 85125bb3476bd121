"""Chooses the Triton kernel or its pure-torch twin for a call.

Triton runs when the tensor lives on CUDA, or anywhere when TRITON_INTERPRET=1 (its CPU interpreter, used by
the kernel tests). Everywhere else, and wherever Triton does not install, the twin runs.
"""
from __future__ import annotations

import importlib.util
import os

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

"""`accelerate_`: the compact fused attention and MLP swapped into a transformers model in place, and back.

Attention switches to "amp_gqa" (runtime/attention.py). The MLP runs through the fused activation kernels
(`swiglu`, `geglu`, `gelu_mlp_act`) where Triton runs, and through the stock expression in the model's dtype on a CPU;
`swiglu_matmul` stays unused until a GPU measurement shows that it beats cuBLAS plus the activation. Shapes are
read from the modules found, so dense, uniform and per-layer models (uneven head maps included) all work. A
mixture-of-experts block keeps transformers' own expert loop (only its attention is swapped), and an activation
the kernels do not compute keeps the stock MLP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import amp_kernels
from amp_kernels.dispatch import use_triton

from ..arch import ArchSpec, spec_for
from ..common.dtypes import dtype_name
from ..common.errors import AmpError
from .attention import ATTN_NAME, register

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def fused_activation(gated: bool, act: str | None):
    """The kernel that computes this MLP's activation (and its neuron statistics), or None: SwiGLU and GeGLU
    for gated MLPs, the tanh gelu for plain ones. Calibration and accelerate_ use the same rule."""
    if gated:
        return amp_kernels.swiglu if act in ("silu", "swish") else amp_kernels.geglu if act in _TANH_GELUS else None
    return amp_kernels.gelu_mlp_act if act in _TANH_GELUS else None


def _stock(kernel):
    """The same activation in torch, in the model's dtype: a CPU has no fused kernel, and the twin's float32 round
    trip only costs memory traffic there (0.66x stock at 2,048 bf16 tokens of a LLaMA-3-8B layer, measured)."""
    if kernel is amp_kernels.swiglu:
        return lambda gate, up: F.silu(gate) * up
    if kernel is amp_kernels.geglu:
        return lambda gate, up: F.gelu(gate, approximate="tanh") * up
    return lambda h: F.gelu(h, approximate="tanh")


def mlp_inputs(layer, spec: ArchSpec):
    """A function x -> (gate, up) or (fc1(x),) for the layer's MLP input projections (calibration uses it too)."""
    if spec.gate_up:
        fused = spec.get(layer, spec.gate_up)
        return lambda x: fused(x).chunk(2, dim=-1)
    mods = [spec.get(layer, p) for p in spec.mlp_in]
    return lambda x: tuple(m(x) for m in mods)


def _fused_mlp(layer, spec: ArchSpec, kernel):
    """The MLP's forward through the fused activation kernel (the projections stay nn.Linear)."""
    inputs, down, stock = mlp_inputs(layer, spec), spec.get(layer, spec.down), _stock(kernel)

    def forward(x):
        parts = [p.contiguous() for p in inputs(x)]
        return down(kernel(*parts) if use_triton(parts[0]) else stock(*parts))
    return forward


def _check_dtype(model) -> None:
    param = next(model.parameters())
    name = dtype_name(param.dtype)
    if param.dtype not in KERNEL_DTYPES:
        raise AmpError(f"the fused kernels do not support {name} on {param.device.type}; "
                       "supported: float32, bfloat16, float16")
    if param.is_cuda and param.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise AmpError(f"{torch.cuda.get_device_name(param.device)} has no bfloat16 support for the fused kernels; "
                       "load the model in float16 or float32")


def accelerate_(model, enable: bool = True):
    """Swaps the compact fused attention and MLP into `model` in place (dense, uniform, or with per-layer shapes
    and uneven head maps); `enable=False` restores the stock path exactly. Returns the model."""
    spec = spec_for(model)  # an unsupported class is a one-line error naming the supported ones
    layers = model.model.layers
    if not enable:
        stock = getattr(model, "_amp_stock_attn", None)
        if stock is not None:
            model.set_attn_implementation(stock)
            del model._amp_stock_attn
        for layer in layers:
            mlp = layer.get_submodule(spec.mlp)
            if "forward" in mlp.__dict__:
                del mlp.forward  # back to the class's forward
        return model
    _check_dtype(model)
    register()
    if getattr(model, "_amp_stock_attn", None) is None:
        model._amp_stock_attn = model.config._attn_implementation
        model.set_attn_implementation(ATTN_NAME)
    kernel = fused_activation(spec.gated, getattr(model.config, spec.act_key, None))
    if kernel is not None:
        for index, layer in enumerate(layers):
            if spec.moe is not None and spec.moe.is_sparse(model.config, index):
                continue  # a mixture-of-experts block keeps transformers' own expert loop
            mlp = layer.get_submodule(spec.mlp)
            mlp.forward = _fused_mlp(layer, spec, kernel)
    return model


def is_accelerated(model) -> bool:
    return getattr(model, "_amp_stock_attn", None) is not None

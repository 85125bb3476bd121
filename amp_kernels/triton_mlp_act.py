"""Fused MLP activations with neuron statistics: a = silu(gate) * up (SwiGLU), a = gelu_tanh(gate) * up (GeGLU,
Gemma) or a = gelu_tanh(h) (Phi), and in the same pass each neuron's sum over tokens of |a|, so calibration never
re-reads the activation."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import arch_of

_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _mlp_act_kernel(
    g_ptr,        # (N, I) gate (SwiGLU) or fc1 output (GELU), row stride stride_n
    u_ptr,        # (N, I) up projection (SwiGLU only; ignored otherwise)
    a_ptr,        # (N, I) output activation, same dtype as the input
    stats_ptr,    # (I,) fp32 accumulator of sum |a| (only touched when STATS)
    N, I, stride_n,
    GATED: tl.constexpr, GELU: tl.constexpr, STATS: tl.constexpr,  # GELU: the tanh gelu, else silu (gated only)
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (offs_n[:, None] < N) & (offs_i[None, :] < I)
    ptrs = offs_n[:, None] * stride_n + offs_i[None, :]
    g = tl.load(g_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        # gelu, tanh approximation; tanh(y) = 2 * sigmoid(2y) - 1 keeps to ops every backend has.
        y = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * y) - 1.0))
    else:
        a = g * tl.sigmoid(g)
    if GATED:
        u = tl.load(u_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
        a = a * u
    tl.store(a_ptr + ptrs, a.to(a_ptr.dtype.element_ty), mask=mask)
    if STATS:
        col = tl.sum(tl.where(mask, tl.abs(a), 0.0), axis=0)
        tl.atomic_add(stats_ptr + offs_i, col, mask=offs_i < I)


def mlp_act_config(n: int, i: int, dtype: torch.dtype, arch: int) -> dict:
    """The one launch configuration (the launcher and amp_kernels.compiled both call this)."""
    return dict(BLOCK_N=32, BLOCK_I=min(128, max(16, triton.next_power_of_2(i))), num_warps=4, num_stages=3)


def _launch(g: torch.Tensor, u: torch.Tensor | None, stats: torch.Tensor | None, gelu: bool,
            config: dict | None = None) -> torch.Tensor:
    shape = g.shape
    g2 = g.reshape(-1, shape[-1]).contiguous()
    u2 = u.reshape(-1, shape[-1]).contiguous() if u is not None else g2
    n, i = g2.shape
    out = torch.empty_like(g2)
    if n and i:
        cfg = config or mlp_act_config(n, i, g.dtype, arch_of(g))
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(i, cfg["BLOCK_I"]))
        _mlp_act_kernel[grid](g2, u2, out, stats if stats is not None else out, n, i, g2.stride(0),
                              GATED=u is not None, GELU=gelu, STATS=stats is not None, BLOCK_N=cfg["BLOCK_N"],
                              BLOCK_I=cfg["BLOCK_I"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out.view(shape)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor, neuron_stats: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    return _launch(gate, up, neuron_stats, gelu=False, config=config)


def geglu_triton(gate: torch.Tensor, up: torch.Tensor, neuron_stats: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    return _launch(gate, up, neuron_stats, gelu=True, config=config)


def gelu_triton(h: torch.Tensor, neuron_stats: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    return _launch(h, None, neuron_stats, gelu=True, config=config)

"""Gate and up projections fused with the SwiGLU activation (and the neuron statistics): each program computes
one (tokens x neurons) tile of x @ W_gate^T and x @ W_up^T side by side, then silu(gate) * up in the epilogue,
so neither projection is written to memory. Kept beside the unfused path (cuBLAS matmuls + `swiglu`) so that
benchmarks/bench_kernels.py can measure which wins on a GPU."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import SWIGLU_MATMUL, lookup
from .dispatch import arch_of, dot_precision, interpreting


@triton.jit
def _swiglu_matmul_kernel(
    x_ptr,      # (N, K) activations, row stride stride_xn
    wg_ptr,     # (I, K) gate weight, row stride stride_w
    wu_ptr,     # (I, K) up weight, row stride stride_w
    a_ptr,      # (N, I) output, contiguous
    stats_ptr,  # (I,) fp32 sum of |a| (only when STATS)
    N, I, K, stride_xn, stride_w,
    STATS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    gate = tl.zeros((BLOCK_N, BLOCK_I), dtype=tl.float32)
    up = tl.zeros((BLOCK_N, BLOCK_I), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_n[:, None] * stride_xn + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)        # (BLOCK_N, BLOCK_K)
        w_mask = (offs_i[None, :] < I) & (offs_k[:, None] < K)
        wg = tl.load(wg_ptr + offs_i[None, :] * stride_w + offs_k[:, None], mask=w_mask, other=0.0)
        wu = tl.load(wu_ptr + offs_i[None, :] * stride_w + offs_k[:, None], mask=w_mask, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            wg = wg.to(tl.float32)
            wu = wu.to(tl.float32)
        gate = tl.dot(x, wg, gate, input_precision=PRECISION)
        up = tl.dot(x, wu, up, input_precision=PRECISION)
    a = gate * tl.sigmoid(gate) * up
    mask = (offs_n[:, None] < N) & (offs_i[None, :] < I)
    tl.store(a_ptr + offs_n[:, None] * I + offs_i[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)
    if STATS:
        tl.atomic_add(stats_ptr + offs_i, tl.sum(tl.where(mask, tl.abs(a), 0.0), axis=0), mask=offs_i < I)


def swiglu_matmul_config(n: int, i: int, k: int, dtype: torch.dtype, arch: int) -> dict:
    """The one launch configuration (the launcher and amp_kernels.compiled both call this), from the compiled table
    (configs.SWIGLU_MATMUL, swept at LLaMA-3-8B's 4096 x 14336), shrunk for small inputs."""
    cfg = lookup(SWIGLU_MATMUL, dtype, 128, arch)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(n)))
    cfg["BLOCK_I"] = min(cfg["BLOCK_I"], max(16, triton.next_power_of_2(i)))
    return cfg


def swiglu_matmul_triton(x, w_gate, w_up, neuron_stats=None, config: dict | None = None):
    x = x.contiguous()
    w_gate, w_up = w_gate.contiguous(), w_up.contiguous()
    n, k = x.shape
    i = w_gate.shape[0]
    out = torch.empty((n, i), dtype=x.dtype, device=x.device)
    if n == 0 or i == 0:
        return out
    cfg = config or swiglu_matmul_config(n, i, k, x.dtype, arch_of(x))
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(i, cfg["BLOCK_I"]))
    _swiglu_matmul_kernel[grid](x, w_gate, w_up, out, neuron_stats if neuron_stats is not None else out,
                                n, i, k, x.stride(0), w_gate.stride(0), STATS=neuron_stats is not None,
                                UPCAST=interpreting() and x.dtype == torch.bfloat16, PRECISION=dot_precision(x.dtype),
                                BLOCK_N=cfg["BLOCK_N"], BLOCK_I=cfg["BLOCK_I"], BLOCK_K=cfg["BLOCK_K"],
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out

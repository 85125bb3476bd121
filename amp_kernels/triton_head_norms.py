"""Fused per-head projection norms: for each head h, sum over tokens of || x_h @ W_o[:, h]^T ||_p.

Each program takes one tile of tokens for one head, computes the projection tile by tile over the hidden
dimension with tl.dot (fp32 accumulation) and reduces |.| (p=1) or squares (p=2) in the epilogue; only one
float per (tile, head) leaves the program (an atomic add into out[h]), never the tokens x heads x hidden tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import HEAD_NORMS, lookup
from .dispatch import arch_of, dot_precision, interpreting


@triton.jit
def _head_norms_kernel(
    x_ptr,        # (T, H*D) input of the output projection, row stride stride_xt
    w_ptr,        # (O, H*D) output-projection weight, row stride stride_wo
    out_ptr,      # (H,) fp32 accumulator
    T, O, stride_xt, stride_wo,
    D: tl.constexpr, P: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: bf16 tl.dot is wrong there, so tiles go to fp32 first
    PRECISION: tl.constexpr,  # tl.dot input_precision ("ieee" for fp32 inputs)
):
    pid_t = tl.program_id(0)
    head = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    sumsq = tl.zeros((BLOCK_T,), dtype=tl.float32)   # p=2: per-token sum of squares over all of O
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)   # p=1: per-token sum of |.| over all of O
    for o_start in range(0, O, BLOCK_O):
        offs_o = o_start + tl.arange(0, BLOCK_O)
        o_mask = offs_o < O
        acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
        for k_start in range(0, D, BLOCK_K):
            offs_k = k_start + tl.arange(0, BLOCK_K)
            k_mask = offs_k < D
            col = head * D + offs_k
            x = tl.load(x_ptr + offs_t[:, None] * stride_xt + col[None, :],
                        mask=t_mask[:, None] & k_mask[None, :], other=0.0)           # (BLOCK_T, BLOCK_K)
            w = tl.load(w_ptr + offs_o[None, :] * stride_wo + col[:, None],
                        mask=o_mask[None, :] & k_mask[:, None], other=0.0)           # (BLOCK_K, BLOCK_O)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if P == 1:
            total += tl.sum(tl.abs(acc), axis=1)
        else:
            sumsq += tl.sum(acc * acc, axis=1)
    if P == 2:
        total = tl.sqrt(sumsq)
    tl.atomic_add(out_ptr + head, tl.sum(tl.where(t_mask, total, 0.0), axis=0))


def _block_k(d: int) -> int:
    for b in (64, 32, 16):
        if d % b == 0:
            return b
    return 16


def head_norms_config(tokens: int, hidden: int, d: int, dtype: torch.dtype, arch: int) -> dict:
    """The one launch configuration (the launcher and amp_kernels.compiled both call this): tiles of tokens x
    output features x head_dim, warps, stages, from the compiled table (configs.HEAD_NORMS: spill-free, wgmma on
    sm_90a), shrunk for small inputs."""
    cfg = lookup(HEAD_NORMS, dtype, d, arch)
    cfg["BLOCK_T"] = min(cfg["BLOCK_T"], max(16, triton.next_power_of_2(tokens)))
    cfg["BLOCK_O"] = min(cfg["BLOCK_O"], max(16, triton.next_power_of_2(hidden)))
    if d % cfg["BLOCK_K"]:
        cfg["BLOCK_K"] = _block_k(d)
    return cfg


def head_norms_triton(x: torch.Tensor, w_o: torch.Tensor, num_heads: int, p: int = 1,
                      out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """Launcher (shapes already checked by amp_kernels.head_norms); `config` overrides head_norms_config."""
    x = x.contiguous()
    w_o = w_o.contiguous()
    if w_o.dtype != x.dtype:
        w_o = w_o.to(x.dtype)
    tokens, width = x.shape
    d = width // num_heads
    hidden = w_o.shape[0]
    result = out if out is not None else torch.zeros(num_heads, dtype=torch.float32, device=x.device)
    if tokens == 0:
        return result
    cfg = config or head_norms_config(tokens, hidden, d, x.dtype, arch_of(x))
    grid = (triton.cdiv(tokens, cfg["BLOCK_T"]), num_heads)
    _head_norms_kernel[grid](
        x, w_o, result, tokens, hidden, x.stride(0), w_o.stride(0),
        D=d, P=p, BLOCK_T=cfg["BLOCK_T"], BLOCK_O=cfg["BLOCK_O"], BLOCK_K=cfg["BLOCK_K"],
        UPCAST=interpreting() and x.dtype == torch.bfloat16, PRECISION=dot_precision(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return result

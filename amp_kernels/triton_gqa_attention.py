"""Flash-style attention (online softmax) with an arbitrary query-head -> KV-head map.

After single query heads are pruned, KV groups keep different numbers of query heads, which stock attention
(uniform repeat of K/V) cannot express; here each query head simply reads head_map[h]. Causal masking aligns
the last query with the last key, so T == S is prefill and T == 1 < S is decode against a cache.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .configs import PREFILL, lookup
from .dispatch import arch_of, dot_precision, interpreting


@triton.jit
def _gqa_attention_kernel(
    q_ptr,    # (B, Hq, T, D) strides sqb, sqh, sqt (last dim contiguous)
    k_ptr,    # (B, Hkv, S, D) strides skb, skh, sks
    v_ptr,    # (B, Hkv, S, D) strides svb, svh, svs
    o_ptr,    # (B, Hq, T, D) contiguous
    map_ptr,  # (Hq,) int32: KV head of each query head
    Hq, T, S, scale,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    kvh = tl.load(map_ptr + h)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=(offs_m[:, None] < T) & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    q_pos = offs_m + (S - T)            # absolute key position each query may see up to
    end = S
    if CAUSAL:
        end = tl.minimum(S, (pid_m + 1) * BLOCK_M + (S - T))
    for n_start in range(0, end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < S
        k = tl.load(k_ptr + b * skb + kvh * skh + offs_n[None, :] * sks + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)              # (BLOCK_D, BLOCK_N)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * scale                                                     # (BLOCK_M, BLOCK_N)
        valid = n_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows that have seen nothing yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + b * svb + kvh * svh + offs_n[:, None] * svs + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)              # (BLOCK_N, BLOCK_D)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_offs = ((b * Hq + h) * T + offs_m[:, None]) * D + offs_d[None, :]
    tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < T) & d_mask[None, :])


def gqa_attention_config(t: int, s: int, d: int, dtype: torch.dtype, arch: int) -> dict:
    """The one launch configuration (the launcher and amp_kernels.compiled both call this), from the compiled table
    (configs.PREFILL), shrunk for short sequences."""
    cfg = lookup(PREFILL, dtype, d, arch)
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], max(16, triton.next_power_of_2(t)))
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(s)))
    return cfg


def gqa_attention_triton(q, k, v, head_map, causal: bool = True, scale: float | None = None,
                         config: dict | None = None) -> torch.Tensor:
    """Launcher (shapes already checked by amp_kernels.gqa_attention); `config` overrides gqa_attention_config."""
    bsz, hq, t, d = q.shape
    s = k.shape[2]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty((bsz, hq, t, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    hmap = head_map.to(device=q.device, dtype=torch.int32).contiguous()
    cfg = config or gqa_attention_config(t, s, d, q.dtype, arch_of(q))
    grid = (triton.cdiv(t, cfg["BLOCK_M"]), bsz * hq)
    _gqa_attention_kernel[grid](
        q, k, v, out, hmap, hq, t, s, scale if scale is not None else 1.0 / math.sqrt(d),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        CAUSAL=causal, UPCAST=interpreting() and q.dtype == torch.bfloat16,
        PRECISION=dot_precision(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out

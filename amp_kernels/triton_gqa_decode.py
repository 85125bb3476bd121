"""Decode attention that reads each KV head's cache once: one program serves every query head mapped to a KV head
(uneven groups included), for one slice of the cache (flash-decoding); a second kernel combines the slices.

The query-head -> KV-head map is data: `amp_kernels.decode_groups` turns it, once per layer, into a (KV heads, G) table of the
query heads each KV head serves (-1 pads shorter groups). For T new tokens (T = 1 for a decode step, a few for
speculative or chunked steps) a program's rows are (query head, token) pairs, G x T of them, causal against the
cache's tail (the last query sees every key), as the twin `reference.gqa_attention` specifies.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .configs import DECODE, lookup
from .dispatch import arch_of, dot_precision, interpreting

SM_COUNT = {80: 108, 90: 132}     # A100, H100: programs to fill the GPU with cache slices
MAX_ROWS = 64                     # rows (query heads x tokens) one program holds; more go to the prefill kernel


def decode_config(bsz: int, kv_heads: int, group: int, t: int, s: int, d: int, dtype: torch.dtype, arch: int) -> dict:
    """The one launch configuration (the launcher and amp_kernels.compiled both call this): rows per program (query
    heads x tokens, padded to a power of two >= 16, which tl.dot needs), the cache block, how many slices the cache
    is cut into so that the GPU is full, warps, stages."""
    rows = max(16, triton.next_power_of_2(group * t))
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs every dimension >= 16
    table = lookup(DECODE, dtype, d, arch)  # the compiled table: spill-free tiles, warps, stages
    block_n = min(table["BLOCK_N"], max(16, triton.next_power_of_2(s)))
    blocks = triton.cdiv(s, block_n)
    target = 2 * SM_COUNT.get(arch, 132)
    splits = max(1, min(blocks, triton.cdiv(target, max(bsz * kv_heads, 1))))
    per_split = triton.cdiv(blocks, splits) * block_n
    splits = triton.cdiv(s, per_split)
    return dict(ROWS=rows, BLOCK_D=block_d, BLOCK_N=block_n, SPLIT=per_split, splits=splits,
                num_warps=table["num_warps"], num_stages=table["num_stages"])


@triton.jit
def _gqa_decode_kernel(
    q_ptr,      # (B, Hq, T, D) strides sqb, sqh, sqt (last dim contiguous)
    k_ptr,      # (B, Hkv, S, D) strides skb, skh, sks
    v_ptr,      # (B, Hkv, S, D) strides svb, svh, svs
    groups_ptr,  # (Hkv, G) int32 query heads of each KV head, -1 padded
    m_ptr,      # (B, Hq, T, NSPLIT) fp32 running max of each slice
    l_ptr,      # (B, Hq, T, NSPLIT) fp32 softmax denominators
    acc_ptr,    # (B, Hq, T, NSPLIT, D) fp32 unnormalized outputs
    Hq, Hkv, G, T, S, NSPLIT, scale,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
    D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    r = tl.arange(0, ROWS)
    g = r // T
    t = r % T
    row_ok = g < G
    head = tl.load(groups_ptr + kvh * G + g, mask=row_ok, other=-1)
    row_ok = row_ok & (head >= 0)
    head = tl.where(row_ok, head, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(q_ptr + b * sqb + head[:, None] * sqh + t[:, None] * sqt + offs_d[None, :],
                mask=row_ok[:, None] & d_mask[None, :], other=0.0)                 # (ROWS, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = t + (S - T)
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    start = split * SPLIT
    for n_start in range(start, start + SPLIT, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < S
        k = tl.load(k_ptr + b * skb + kvh * skh + offs_n[None, :] * sks + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)              # (BLOCK_D, BLOCK_N)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * scale                            # (ROWS, BLOCK_N)
        valid = n_mask[None, :] & row_ok[:, None]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + b * svb + kvh * svh + offs_n[:, None] * svs + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)              # (BLOCK_N, BLOCK_D)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    base = ((b * Hq + head) * T + t) * NSPLIT + split                                   # (ROWS,)
    tl.store(m_ptr + base, m_i, mask=row_ok)
    tl.store(l_ptr + base, l_i, mask=row_ok)
    tl.store(acc_ptr + base[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None] & d_mask[None, :])


@triton.jit
def _decode_combine_kernel(
    m_ptr, l_ptr, acc_ptr,   # the slices' partials, as _gqa_decode_kernel writes them
    o_ptr,                   # (B, Hq, T, D) output, contiguous
    NSPLIT, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)                   # (b, head, t) flattened
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NSPLIT
    m = tl.load(m_ptr + row * NSPLIT + offs_s, mask=s_mask, other=float("-inf"))
    l = tl.load(l_ptr + row * NSPLIT + offs_s, mask=s_mask, other=0.0)
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.where(s_mask, tl.exp(m - m_all), 0.0)
    denom = tl.sum(l * w, axis=0)
    acc = tl.load(acc_ptr + (row * NSPLIT + offs_s[:, None]) * D + offs_d[None, :],
                  mask=s_mask[:, None] & (offs_d[None, :] < D), other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(o_ptr + row * D + offs_d, out.to(o_ptr.dtype.element_ty), mask=offs_d < D)


def gqa_decode_triton(q, k, v, groups: torch.Tensor, causal: bool = True, scale: float | None = None,
                      config: dict | None = None) -> torch.Tensor:
    """Launcher (shapes checked by amp_kernels.gqa_attention): q (B, Hq, T, D) with few T, k / v (B, Hkv, S, D),
    `groups` from amp_kernels.decode_groups."""
    bsz, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty((bsz, hq, t, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    groups = groups.to(device=q.device, dtype=torch.int32).contiguous()
    cfg = config or decode_config(bsz, hkv, groups.shape[1], t, s, d, q.dtype, arch_of(q))
    n = cfg["splits"]
    m = torch.empty((bsz, hq, t, n), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty((bsz, hq, t, n, d), dtype=torch.float32, device=q.device)
    _gqa_decode_kernel[(hkv, bsz, n)](
        q, k, v, groups, m, l, acc, hq, hkv, groups.shape[1], t, s, n,
        scale if scale is not None else 1.0 / math.sqrt(d),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        D=d, BLOCK_D=cfg["BLOCK_D"], ROWS=cfg["ROWS"], BLOCK_N=cfg["BLOCK_N"], SPLIT=cfg["SPLIT"], CAUSAL=causal,
        UPCAST=interpreting() and q.dtype == torch.bfloat16, PRECISION=dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _decode_combine_kernel[(bsz * hq * t,)](m, l, acc, out, n, D=d, BLOCK_D=cfg["BLOCK_D"],
                                           BLOCK_S=max(2, triton.next_power_of_2(n)), num_warps=4)
    return out


def decode_bytes(bsz: int, hq: int, hkv: int, t: int, s: int, d: int, elt: int) -> dict:
    """Bytes a decode step reads from the KV cache: this kernel (each KV head once) against the per-query-head
    kernel (each query head reads its KV head's cache), and the minimum (the cache once)."""
    cache = 2 * bsz * hkv * s * d * elt
    return {"minimum": cache, "grouped": cache, "per_query_head": 2 * bsz * hq * s * d * elt}

"""Attention with an arbitrary query-head -> KV-head map, registered with transformers' `AttentionInterface`.

Two names: "amp_gqa" (the fused path that `accelerate_` switches on: the Triton `gqa_attention` kernel on CUDA or
under TRITON_INTERPRET=1, else the index-based path) and "amp_indexed" (what a model with uneven head maps loads
with: index-based everywhere). Both register `sdpa_mask` as their mask function, so a pure causal batch hands
over no mask at all. Each attention module may carry `amp_head_map` (query head -> KV head, uneven groups
allowed); without one the map is the even grouping of its config. On a CPU, and wherever a padding or
sliding-window mask must be applied, the index-based path gathers each query head's KV head and hands it to SDPA
(the pure-torch twin of the kernel materializes every score, 7.4x slower than SDPA at 2,048 tokens on this CPU: it
stays the specification, not the CPU runtime).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import amp_kernels
from amp_kernels.dispatch import use_triton

from ..common.errors import AmpError

ATTN_NAME = "amp_gqa"          # the fused path
ATTN_INDEXED = "amp_indexed"   # uneven head maps on stock kernels (index + SDPA): what a per-layer model loads with


def head_map_tensor(module, device) -> torch.Tensor | None:
    """The attention module's head map on `device` (cached), or None for even grouping."""
    head_map = getattr(module, "amp_head_map", None)
    if head_map is None:
        return None
    cache = module.__dict__.setdefault("_amp_head_map_cache", {})
    if device not in cache:
        cache[device] = torch.as_tensor(head_map, dtype=torch.long, device=device)
    return cache[device]


def head_map_of(module, num_heads: int, num_kv_heads: int, device) -> tuple[torch.Tensor, int]:
    """(the module's head map, the group size when the map is the even grouping, else 0). A per-layer checkpoint
    gives the module its own map (uneven groups allowed); otherwise the grouping is even."""
    head_map = head_map_tensor(module, device)
    even = num_heads // num_kv_heads if num_heads % num_kv_heads == 0 else 0
    if head_map is None:
        if not even:
            raise AmpError(f"{num_heads} query heads on {num_kv_heads} KV heads need a head map (amp_head_map)")
        return torch.arange(num_heads, device=device) // even, even
    cache = module.__dict__["_amp_head_map_cache"]  # filled by head_map_tensor; evenness checked once, not per call
    if "even" not in cache:
        cache["even"] = even if even and list(module.amp_head_map) == [h // even for h in range(num_heads)] else 0
    return head_map, cache["even"]


def _softcapped(query, k, v, attention_mask, scaling, causal, softcap: float):
    """Gemma 2's attention: scores soft-capped (softcap * tanh(scores / softcap)) before the mask and the softmax,
    which SDPA cannot do; computed as transformers' eager path does (softmax in float32)."""
    t, s = query.shape[2], k.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., :s]
    elif causal and t > 1:
        qpos = torch.arange(t, device=query.device)[:, None] + (s - t)
        scores = scores.masked_fill(torch.arange(s, device=query.device)[None, :] > qpos, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, v)


def decode_groups_of(module, head_map: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The decode kernel's table of query heads per KV head, built once per module and device (not per step)."""
    cache = module.__dict__.setdefault("_amp_decode_groups", {})
    key = (head_map.device, num_kv_heads, len(head_map))
    if key not in cache:
        cache[key] = amp_kernels.decode_groups(head_map, num_kv_heads).to(head_map.device)
    return cache[key]


def indexed_attention(query, key, value, head_map, attention_mask=None, scaling=None, causal=True, dropout=0.0,
                      group: int = 0, softcap: float | None = None):
    """The index-based path: every query head gets its own KV head gathered, then SDPA (any mask). Causal
    masking aligns the last query with the last key, as the kernel and its twin do. `group`: the group size when
    the map is the even grouping; a decode step then packs each group's queries onto its KV head instead of
    copying the cache (as transformers' own SDPA path does). `softcap` (Gemma 2): the eager soft-capped path."""
    b, h, t, d = query.shape
    s = key.shape[2]
    if softcap:
        k = key if group == 1 else key.index_select(1, head_map)
        v = value if group == 1 else value.index_select(1, head_map)
        return _softcapped(query, k, v, attention_mask, scaling, causal, softcap)
    if group > 1 and t == 1 and attention_mask is None and dropout == 0.0:
        packed = query.reshape(b, h // group, group, d)  # heads of a group are contiguous
        out = F.scaled_dot_product_attention(packed, key, value, scale=scaling)
        return out.reshape(b, h, 1, d)
    if group == 1:  # one query head per KV head, in order: nothing to gather
        k, v = key, value
    else:
        k = key.index_select(1, head_map)
        v = value.index_select(1, head_map)
    is_causal = False
    if attention_mask is None and causal and t > 1:
        if t == s:
            is_causal = True
        else:  # chunked prefill against a cache: bottom-right aligned causal mask
            qpos = torch.arange(t, device=query.device)[:, None] + (s - t)
            attention_mask = torch.arange(s, device=query.device)[None, :] <= qpos
    return F.scaled_dot_product_attention(query, k, v, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                          is_causal=is_causal)


def _attention(module, query, key, value, attention_mask, dropout: float, scaling, is_causal, kernels: bool,
               **kwargs):
    """transformers' attention-function contract: q (B,H,T,d), k/v (B,KV,S,d) after the cache update;
    returns ((B,T,H,d), None)."""
    if kwargs.get("output_attentions"):
        raise AmpError("the amp attention does not return attention weights")
    head_map, group = head_map_of(module, query.shape[1], key.shape[1], query.device)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    softcap = kwargs.get("softcap")
    # A sliding window arrives as a mask; with no mask the window covers every key (the mask was skipped).
    if kernels and attention_mask is None and dropout == 0.0 and not softcap and use_triton(query):
        out = amp_kernels.gqa_attention(query, key, value, head_map, causal=causal, scale=scaling,
                                        groups=decode_groups_of(module, head_map, key.shape[1]))
    else:
        out = indexed_attention(query, key, value, head_map, attention_mask, scaling, causal, dropout, group,
                                softcap)
    return out.transpose(1, 2).contiguous(), None


def amp_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
    """The fused path (accelerate_): the Triton kernel where Triton runs, else the index-based path."""
    return _attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, True, **kwargs)


def indexed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                              is_causal=None, **kwargs):
    """The reference for uneven head maps on stock attention: index-based everywhere."""
    return _attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, False, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    for name, fn in ((ATTN_NAME, amp_attention_forward), (ATTN_INDEXED, indexed_attention_forward)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)

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

import amp_kernels
from amp_kernels.dispatch import use_triton

from ..common.errors import AmpError
# the index-based path is the one a per-layer folder carries (modeling_amp.py); its names are the engine's too
from .modeling_amp import ATTN_INDEXED, head_map_of, indexed_attention  # noqa: F401
from .modeling_amp import indexed_attention_forward, register_attention

ATTN_NAME = "amp_gqa"          # the fused path


def decode_groups_of(module, head_map: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The decode kernel's table of query heads per KV head, built once per module and device (not per step)."""
    cache = module.__dict__.setdefault("_amp_decode_groups", {})
    key = (head_map.device, num_kv_heads, len(head_map))
    if key not in cache:
        cache[key] = amp_kernels.decode_groups(head_map, num_kv_heads).to(head_map.device)
    return cache[key]


def amp_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
    """The fused path (accelerate_): the Triton kernel where Triton runs and no mask is needed (a sliding window
    arrives as a mask; with no mask the window covers every key), else the index-based path. transformers'
    attention-function contract: q (B,H,T,d), k/v (B,KV,S,d) after the cache update; returns ((B,T,H,d), None)."""
    if kwargs.get("output_attentions"):
        raise AmpError("the amp attention does not return attention weights")
    if attention_mask is None and dropout == 0.0 and not kwargs.get("softcap") and use_triton(query):
        head_map, _ = head_map_of(module, query.shape[1], key.shape[1], query.device)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        out = amp_kernels.gqa_attention(query, key, value, head_map, causal=causal, scale=scaling,
                                        groups=decode_groups_of(module, head_map, key.shape[1]))
        return out.transpose(1, 2).contiguous(), None
    return indexed_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                     **kwargs)


def register() -> None:
    """Both names: "amp_indexed" as a per-layer folder's own modeling_amp.py registers it, and the fused path."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    register_attention()
    AttentionInterface.register(ATTN_NAME, amp_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)

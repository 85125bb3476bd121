"""Kernels of the AMP engine: tensors in, tensors out, no knowledge of models.

Each public function dispatches (see `dispatch.py`): the Triton kernel on CUDA tensors or under
TRITON_INTERPRET=1, the pure-torch twin in `reference.py` otherwise.
"""
from __future__ import annotations

import torch

from . import reference
from .dispatch import TRITON_AVAILABLE, use_triton

__all__ = ["head_norms", "swiglu", "geglu", "swiglu_matmul", "gelu_mlp_act", "gqa_attention", "decode_groups",
           "reference", "TRITON_AVAILABLE"]

DECODE_MAX_T = 16  # new tokens up to which attention takes the decode kernel (each KV head's cache read once)


def decode_groups(head_map: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(num_kv_heads, G) int32 table of the query heads each KV head serves (-1 pads), for `gqa_attention`'s
    decode path; compute it once per layer and pass it as `groups`."""
    hm = head_map.detach().to("cpu", torch.long)
    members = [(hm == h).nonzero().flatten().tolist() for h in range(num_kv_heads)]
    table = torch.full((num_kv_heads, max(1, max(len(m) for m in members))), -1, dtype=torch.int32)
    for h, m in enumerate(members):
        table[h, :len(m)] = torch.tensor(m, dtype=torch.int32)
    return table


def _check_head_norms_args(x, w_o, num_heads, p, out):
    if x.dim() != 2 or w_o.dim() != 2:
        raise ValueError(f"head_norms: x and w_o must be 2-D, got {tuple(x.shape)} and {tuple(w_o.shape)}")
    if num_heads < 1 or x.shape[1] % num_heads:
        raise ValueError(f"head_norms: width {x.shape[1]} is not divisible by num_heads={num_heads}")
    if w_o.shape[1] != x.shape[1]:
        raise ValueError(f"head_norms: x is (tokens, {x.shape[1]}) but w_o is {tuple(w_o.shape)}")
    if p not in (1, 2):
        raise ValueError(f"head_norms: p must be 1 or 2, got {p}")
    if x.device != w_o.device:
        raise ValueError(f"head_norms: x on {x.device} but w_o on {w_o.device}")
    if out is not None and (out.shape != (num_heads,) or out.dtype != torch.float32):
        raise ValueError(f"head_norms: out must be fp32 of shape ({num_heads},), got {out.dtype} {tuple(out.shape)}")


def head_norms(x: torch.Tensor, w_o: torch.Tensor, num_heads: int, p: int = 1,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 (H,): per head, the sum over tokens of the p-norm of its contribution through w_o."""
    _check_head_norms_args(x, w_o, num_heads, p, out)
    if use_triton(x):
        from .triton_head_norms import head_norms_triton
        return head_norms_triton(x, w_o, num_heads, p=p, out=out)
    return reference.head_norms(x, w_o, num_heads, p=p, out=out)


def _check_stats(name, a, neuron_stats):
    if neuron_stats is not None and (neuron_stats.shape != (a.shape[-1],) or neuron_stats.dtype != torch.float32):
        raise ValueError(f"{name}: neuron_stats must be fp32 of shape ({a.shape[-1]},), "
                         f"got {neuron_stats.dtype} {tuple(neuron_stats.shape)}")


def swiglu(gate: torch.Tensor, up: torch.Tensor, neuron_stats: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up, optionally adding per-neuron sums of |result| into `neuron_stats`."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {gate.dtype} {tuple(gate.shape)} and up {up.dtype} {tuple(up.shape)} differ")
    _check_stats("swiglu", gate, neuron_stats)
    if use_triton(gate):
        from .triton_mlp_act import swiglu_triton
        return swiglu_triton(gate, up, neuron_stats)
    return reference.swiglu(gate, up, neuron_stats)


def geglu(gate: torch.Tensor, up: torch.Tensor, neuron_stats: torch.Tensor | None = None) -> torch.Tensor:
    """gelu_tanh(gate) * up (GeGLU), optionally adding per-neuron sums of |result| into `neuron_stats`."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"geglu: gate {gate.dtype} {tuple(gate.shape)} and up {up.dtype} {tuple(up.shape)} differ")
    _check_stats("geglu", gate, neuron_stats)
    if use_triton(gate):
        from .triton_mlp_act import geglu_triton
        return geglu_triton(gate, up, neuron_stats)
    return reference.geglu(gate, up, neuron_stats)


def swiglu_matmul(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                  neuron_stats: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x @ w_gate.T) * (x @ w_up.T) in one kernel (the gate/up matmuls fused in), with optional statistics.
    The engine uses the unfused path (matmuls, then `swiglu`) until a GPU measurement says this one wins."""
    if x.dim() != 2 or w_gate.shape != w_up.shape or w_gate.dim() != 2 or w_gate.shape[1] != x.shape[1]:
        raise ValueError(f"swiglu_matmul: x (N, K) and w_gate / w_up (I, K) expected, got {tuple(x.shape)}, "
                         f"{tuple(w_gate.shape)}, {tuple(w_up.shape)}")
    if x.dtype != w_gate.dtype or w_gate.dtype != w_up.dtype:
        raise ValueError(f"swiglu_matmul: dtypes differ: {x.dtype}, {w_gate.dtype}, {w_up.dtype}")
    _check_stats("swiglu_matmul", w_gate.T, neuron_stats)
    if use_triton(x):
        from .triton_swiglu_matmul import swiglu_matmul_triton
        return swiglu_matmul_triton(x, w_gate, w_up, neuron_stats)
    return reference.swiglu_matmul(x, w_gate, w_up, neuron_stats)


def gelu_mlp_act(h: torch.Tensor, neuron_stats: torch.Tensor | None = None) -> torch.Tensor:
    """gelu_new(h) (tanh approximation, Phi's MLP), optionally adding per-neuron sums of |result|."""
    _check_stats("gelu_mlp_act", h, neuron_stats)
    if use_triton(h):
        from .triton_mlp_act import gelu_triton
        return gelu_triton(h, neuron_stats)
    return reference.gelu_mlp_act(h, neuron_stats)


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_map: torch.Tensor,
                  causal: bool = True, scale: float | None = None, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with an arbitrary query-head -> KV-head map (uneven groups allowed). A few new tokens against a
    cache (T <= DECODE_MAX_T) take the decode kernel, which reads each KV head's cache once for all the query heads
    it serves; `groups` (decode_groups of head_map) saves rebuilding that table on every step."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"gqa_attention: q (B,Hq,T,d), k/v (B,Hkv,S,d) expected, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"gqa_attention: batch/head_dim mismatch between q {tuple(q.shape)} and k {tuple(k.shape)}")
    if head_map.dim() != 1 or head_map.numel() != q.shape[1]:
        raise ValueError(f"gqa_attention: head_map must have length Hq={q.shape[1]}, got {tuple(head_map.shape)}")
    if head_map.numel() and (int(head_map.min()) < 0 or int(head_map.max()) >= k.shape[1]):
        raise ValueError(f"gqa_attention: head_map values must lie in [0, {k.shape[1]})")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError("gqa_attention: causal attention needs T <= S")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"gqa_attention: dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if use_triton(q):
        from .triton_gqa_decode import MAX_ROWS, gqa_decode_triton
        if q.shape[2] <= DECODE_MAX_T:
            groups = groups if groups is not None else decode_groups(head_map, k.shape[1])
            if groups.shape[1] * q.shape[2] <= MAX_ROWS:
                return gqa_decode_triton(q, k, v, groups, causal=causal, scale=scale)
        from .triton_gqa_attention import gqa_attention_triton
        return gqa_attention_triton(q, k, v, head_map, causal=causal, scale=scale)
    return reference.gqa_attention(q, k, v, head_map, causal=causal, scale=scale)

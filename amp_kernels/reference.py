"""Pure-torch twins of the Triton kernels.

Each twin is the specification of its kernel: it is never edited to agree with a kernel. They are also the
CPU path of the engine, so they are written to be frugal: `head_norms` works in token chunks so that its
extra memory never grows with tokens x heads x hidden.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Elements of the per-chunk (heads, tokens, hidden) projection the twin allows itself (~64 MiB in fp32).
_HEAD_NORM_CHUNK_ELEMS = 1 << 24


def head_norms(x: torch.Tensor, w_o: torch.Tensor, num_heads: int, p: int = 1,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Per head h: sum over tokens of || x[:, h*d:(h+1)*d] @ w_o[:, h*d:(h+1)*d].T ||_p (p = 1 or 2).

    x: (tokens, H*d), w_o: (hidden, H*d). Returns fp32 (H,), added into `out` when given.
    For p=2 the per-token norm is the square root of the sum of squares (a true L2 norm).
    """
    tokens, width = x.shape
    hidden = w_o.shape[0]
    d = width // num_heads
    result = torch.zeros(num_heads, dtype=torch.float32, device=x.device)
    # (H, d, hidden): each head's slice of the output projection, transposed for a batched matmul.
    w_heads = w_o.float().view(hidden, num_heads, d).permute(1, 2, 0)
    chunk = max(1, _HEAD_NORM_CHUNK_ELEMS // max(1, num_heads * hidden))
    for start in range(0, tokens, chunk):
        xs = x[start:start + chunk].float().view(-1, num_heads, d).transpose(0, 1)  # (H, n, d)
        proj = torch.bmm(xs, w_heads)  # (H, n, hidden)
        if p == 1:
            result += proj.abs_().sum(dim=(1, 2))
        else:
            result += proj.square_().sum(dim=2).sqrt_().sum(dim=1)
    if out is not None:
        out += result
        return out
    return result


def head_norms_naive(x: torch.Tensor, w_o: torch.Tensor, num_heads: int, p: int = 1) -> torch.Tensor:
    """The paper's way: materialize every head's projected output (tokens, H, hidden), then reduce."""
    tokens, width = x.shape
    d = width // num_heads
    proj = torch.einsum("thd,ohd->tho", x.float().view(tokens, num_heads, d),
                        w_o.float().view(-1, num_heads, d))
    return proj.norm(p=p, dim=2).sum(dim=0)


def swiglu(gate: torch.Tensor, up: torch.Tensor, neuron_stats: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up; adds each neuron's sum over tokens of |a| into `neuron_stats` (fp32, (I,))."""
    a = F.silu(gate.float()) * up.float()
    if neuron_stats is not None:
        neuron_stats += a.abs().reshape(-1, a.shape[-1]).sum(dim=0)
    return a.to(gate.dtype)


def geglu(gate: torch.Tensor, up: torch.Tensor, neuron_stats: torch.Tensor | None = None) -> torch.Tensor:
    """gelu_tanh(gate) * up (Gemma's GeGLU, `gelu_pytorch_tanh`); statistics as in `swiglu`."""
    a = F.gelu(gate.float(), approximate="tanh") * up.float()
    if neuron_stats is not None:
        neuron_stats += a.abs().reshape(-1, a.shape[-1]).sum(dim=0)
    return a.to(gate.dtype)


def gelu_mlp_act(h: torch.Tensor, neuron_stats: torch.Tensor | None = None,
                 approximate: str = "tanh") -> torch.Tensor:
    """gelu(h) (Phi's `gelu_new` is the tanh approximation); statistics as in `swiglu`."""
    a = F.gelu(h.float(), approximate=approximate)
    if neuron_stats is not None:
        neuron_stats += a.abs().reshape(-1, a.shape[-1]).sum(dim=0)
    return a.to(h.dtype)


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_map: torch.Tensor,
                  causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Attention where query head i reads key/value head head_map[i]; q (B,Hq,T,d), k/v (B,Hkv,S,d).

    Causal masking aligns the last query with the last key (decode: T=1 < S sees every key).
    """
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    idx = head_map.to(device=q.device, dtype=torch.long)
    kk = k.float().index_select(1, idx)
    vv = v.float().index_select(1, idx)
    scores = torch.matmul(q.float(), kk.transpose(-1, -2)) * scale
    if causal:
        t, s = q.shape[-2], k.shape[-2]
        qpos = torch.arange(t, device=q.device)[:, None] + (s - t)
        kpos = torch.arange(s, device=q.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vv).to(q.dtype)


def swiglu_matmul(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                  neuron_stats: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x @ w_gate.T) * (x @ w_up.T): the gate/up projections and the activation in one op; x (N, hidden),
    w_gate / w_up (I, hidden). Statistics as in `swiglu`."""
    return swiglu(x @ w_gate.T, x @ w_up.T, neuron_stats)

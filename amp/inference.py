"""What a loaded model runs on: the compact fused attention and MLP swapped into a transformers model in place.

Attention goes through transformers' own registry (`AttentionInterface` under the name "amp_gqa", with
`sdpa_mask` registered as its mask function, so that a pure causal batch hands over no mask at all): each
attention module may carry `amp_head_map` (query head -> KV head, uneven groups allowed); without one the map is
the even grouping of its config. On CUDA (or under TRITON_INTERPRET=1) the Triton `gqa_attention` kernel runs;
on a CPU, and wherever a padding or sliding-window mask must be applied, the index-based path runs instead: the
KV heads are gathered per query head and handed to SDPA. (The pure-torch twin of the kernel materializes every
score, 7.4x slower than SDPA at 2,048 tokens on this CPU: it stays the specification, not the CPU runtime.)
The MLP runs through the fused activation kernels (`swiglu`, `gelu_mlp_act`) where Triton runs, and through the
stock expression in the model's dtype on a CPU; `swiglu_matmul` stays unused until a GPU measurement shows that it
beats cuBLAS plus the activation.

This module knows nothing of pruning: it reads shapes from the modules it finds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import amp_kernels
from amp_kernels.dispatch import use_triton

from .arch import ArchSpec, spec_for
from .errors import AmpError
from .heterogeneous import head_map_tensor

ATTN_NAME = "amp_gqa"          # the fused path
ATTN_INDEXED = "amp_indexed"   # uneven head maps on stock kernels (index + SDPA): what a per-layer model loads with
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Activations the fused kernels compute, per MLP kind (calibration uses the same rule).
FUSED_ACTS = {True: ("silu", "swish"), False: ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")}


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


def indexed_attention(query, key, value, head_map, attention_mask=None, scaling=None, causal=True, dropout=0.0,
                      group: int = 0):
    """The index-based path: every query head gets its own KV head gathered, then SDPA (any mask). Causal
    masking aligns the last query with the last key, as the kernel and its twin do. `group`: the group size when
    the map is the even grouping; a decode step then packs each group's queries onto its KV head instead of
    copying the cache (as transformers' own SDPA path does)."""
    b, h, t, d = query.shape
    s = key.shape[2]
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
    if kernels and attention_mask is None and dropout == 0.0 and use_triton(query):
        out = amp_kernels.gqa_attention(query, key, value, head_map, causal=causal, scale=scaling)
    else:
        out = indexed_attention(query, key, value, head_map, attention_mask, scaling, causal, dropout, group)
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


def _swiglu(gate, up):
    # A CPU has no fused kernel: the twin's float32 round trip only costs memory traffic there (0.66x stock at
    # 2,048 bf16 tokens of a LLaMA-3-8B layer, measured), so the CPU runs the stock expression in the model's dtype.
    return amp_kernels.swiglu(gate, up) if use_triton(gate) else F.silu(gate) * up


def _gelu(h):
    return amp_kernels.gelu_mlp_act(h) if use_triton(h) else F.gelu(h, approximate="tanh")


def mlp_inputs(layer, spec: ArchSpec):
    """A function x -> (gate, up) or (fc1(x),) for the layer's MLP input projections (calibration uses it too)."""
    if spec.gate_up:
        fused = spec.get(layer, spec.gate_up)
        return lambda x: fused(x).chunk(2, dim=-1)
    mods = [spec.get(layer, p) for p in spec.mlp_in]
    return lambda x: tuple(m(x) for m in mods)


def _fused_mlp(layer, spec: ArchSpec):
    """The MLP's forward through the fused activation kernel (the projections stay nn.Linear)."""
    inputs, down = mlp_inputs(layer, spec), spec.get(layer, spec.down)
    if spec.gated:
        def forward(x):
            gate, up = inputs(x)
            return down(_swiglu(gate.contiguous(), up.contiguous()))
    else:
        def forward(x):
            return down(_gelu(inputs(x)[0]))
    return forward


def _check_dtype(model) -> None:
    param = next(model.parameters())
    name = str(param.dtype).replace("torch.", "")
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
    fused = getattr(model.config, "hidden_act", None) in FUSED_ACTS[spec.gated]
    if fused:
        for layer in layers:
            mlp = layer.get_submodule(spec.mlp)
            mlp.forward = _fused_mlp(layer, spec)
    return model


def is_accelerated(model) -> bool:
    return getattr(model, "_amp_stock_attn", None) is not None

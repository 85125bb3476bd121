"""The only module that mutates models: cuts kept rows/columns out of projections and updates the config."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..arch import ArchSpec, Geometry


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep `index` along the output rows (dim 0, bias too) or input columns (dim 1) of `linear`."""
    index = index.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, index).clone()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach().index_select(0, index).clone(),
                                       requires_grad=linear.bias.requires_grad)
        linear.out_features = weight.shape[0]
    else:
        linear.in_features = weight.shape[1]


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of whole heads in a [head0 rows; head1 rows; ...] projection (also: the query heads of
    whole KV groups, with head_dim = group size)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def slice_attention(layer: nn.Module, spec: ArchSpec, geom: Geometry,
                    kept_heads: torch.Tensor, kept_kv: torch.Tensor, head_map: list[int] | None = None) -> None:
    d = geom.head_dim
    q_rows, kv_rows = head_rows(kept_heads, d), head_rows(kept_kv, d)
    if spec.qkv:
        q_width, kv_width = geom.num_heads * d, geom.num_kv_heads * d
        rows = torch.cat([q_rows, q_width + kv_rows, q_width + kv_width + kv_rows])
        slice_linear(spec.get(layer, spec.qkv), rows, dim=0)
    else:
        slice_linear(spec.get(layer, spec.q), q_rows, dim=0)
        slice_linear(spec.get(layer, spec.k), kv_rows, dim=0)
        slice_linear(spec.get(layer, spec.v), kv_rows, dim=0)
    slice_linear(spec.get(layer, spec.o), q_rows, dim=1)
    # HF attention modules cache these at construction; keep them true for the new sizes.
    attn = spec.get(layer, spec.attn)
    n_heads, n_kv = len(kept_heads), len(kept_kv)
    attn.num_key_value_groups = n_heads // n_kv
    if head_map is not None and (n_heads % n_kv or head_map != [h // (n_heads // n_kv) for h in range(n_heads)]):
        attn.amp_head_map = list(head_map)  # uneven groups: the attention applies the map by index
        attn.__dict__.pop("_amp_head_map_cache", None)
        attn.__dict__.pop("_amp_decode_groups", None)
    for name, value in (("num_heads", n_heads), ("num_key_value_heads", n_kv)):
        if hasattr(attn, name):
            setattr(attn, name, value)


def slice_mlp(layer: nn.Module, spec: ArchSpec, geom: Geometry, kept_neurons: torch.Tensor) -> None:
    if spec.gate_up:
        rows = torch.cat([kept_neurons, geom.intermediate + kept_neurons])
        slice_linear(spec.get(layer, spec.gate_up), rows, dim=0)
    for path in spec.mlp_in:
        slice_linear(spec.get(layer, path), kept_neurons, dim=0)
    slice_linear(spec.get(layer, spec.down), kept_neurons, dim=1)
    mlp = spec.get(layer, spec.mlp)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(kept_neurons)


def update_config(config, num_heads: int, num_kv_heads: int, intermediate: int, head_dim: int) -> None:
    """Uniform pruning keeps one architecture: record the new sizes so that plain transformers rebuilds it.
    head_dim is written explicitly because several families derive it as hidden_size // num_heads."""
    config.num_attention_heads = num_heads
    config.num_key_value_heads = num_kv_heads
    config.intermediate_size = intermediate
    config.head_dim = head_dim


def compensate_bias(linear: nn.Linear, removed: torch.Tensor, channel_mean: torch.Tensor) -> None:
    """FLAP's bias compensation: the removed input channels are replaced by their calibration mean, folded
    into the bias (b += W[:, removed] @ mean[removed]), so the output on the calibration mean is unchanged.
    Call before the columns are sliced away."""
    if len(removed) == 0:
        return
    removed = removed.to(linear.weight.device)
    shift = linear.weight.detach().double().index_select(1, removed) @ \
        channel_mean.to(linear.weight.device).double().index_select(0, removed)
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device), requires_grad=False)
    linear.bias.data += shift.to(linear.bias.dtype)


def add_zero_biases(layer: nn.Module, spec: ArchSpec) -> None:
    """For families whose config switches biases on per block (LlamaConfig.attention_bias / mlp_bias): give
    every projection of the layer a zero bias, so that the compensated output biases load in plain transformers
    once the config says attention_bias = mlp_bias = True (keep.target_config)."""
    paths = [p for p in (spec.q, spec.k, spec.v, spec.qkv, spec.o, spec.gate_up, *spec.mlp_in, spec.down) if p]
    for path in paths:
        linear = spec.get(layer, path)
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                   device=linear.weight.device), requires_grad=False)

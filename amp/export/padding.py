"""Making a layer's attention expressible where a format only knows even groups (and, for DeciLM in vLLM, a fixed
query-head count): zero query heads are added back (zero o_proj columns: their output is multiplied away, so the
layer computes exactly what the pruned one does) and KV heads are duplicated or zero-filled, so that every KV head
serves the same number of query slots. The layouts are arithmetic; `pad_attention`, `pad_mlp` and `pad_experts`
apply them (and zero neurons) to a resident layer, for the exporters that write whole layers."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class AttentionLayout:
    """A layer's attention as written: `slots[s]` is the kept query head (index into the pruned layer's heads)
    in query slot s, or -1 for a zero head; `kv_source[g]` is the pruned layer's KV head copied into KV head g,
    or -1 for a zero one; every KV head serves `group` consecutive slots."""
    slots: tuple[int, ...]
    kv_source: tuple[int, ...]
    group: int

    @property
    def heads(self) -> int:
        return len(self.slots)

    @property
    def kv_heads(self) -> int:
        return len(self.kv_source)

    @property
    def zero_heads(self) -> int:
        return sum(s < 0 for s in self.slots)

    @property
    def added_kv_heads(self) -> int:
        return sum(1 for i, src in enumerate(self.kv_source) if src < 0 or src in self.kv_source[:i])


def _divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


def layout_for(head_map: list[int], kv_heads: int, heads: int | None = None) -> AttentionLayout:
    """The cheapest even layout holding the pruned layer (query head i reads KV head head_map[i]).
    `heads`: the query-head count the format fixes (DeciLM in vLLM: the model's global count); None lets it be
    whatever the layout needs (GGUF `deci`: per-layer head counts). Cheapest: fewest added query and KV heads."""
    members = [[q for q, h in enumerate(head_map) if h == kv] for kv in range(kv_heads)]
    members = [m for m in members if m] or [[]]
    options = []
    totals = [heads] if heads is not None else range(len(head_map), 2 * len(head_map) + 1)
    for total in totals:
        for group in _divisors(total):
            need = sum(-(-len(m) // group) for m in members)  # KV heads that hold every group's query heads
            if need > total // group:
                continue
            options.append((total - len(head_map) + (total // group - kv_heads), total // group, total, group))
    if not options:
        raise ValueError(f"no even layout of {heads} query heads holds the head map {head_map}")
    _, n_kv, total, group = min(options)
    slots: list[int] = []
    kv_source: list[int] = []
    kv_of = [h for h in range(kv_heads) if any(head_map[q] == h for q in range(len(head_map)))]
    for kv in kv_of:
        queries = [q for q in range(len(head_map)) if head_map[q] == kv]
        for start in range(0, len(queries), group):
            chunk = queries[start:start + group]
            slots += chunk + [-1] * (group - len(chunk))
            kv_source.append(kv)
    while len(kv_source) < n_kv:  # slots left over: zero query heads on a zero KV head
        slots += [-1] * group
        kv_source.append(-1)
    return AttentionLayout(tuple(slots), tuple(kv_source), group)


def padding_cost(layout: AttentionLayout, kept_heads: int, kept_kv: int, head_dim: int, hidden: int,
                 biases: bool = False) -> dict:
    """What the layout adds over the pruned layer: parameters (q rows and o columns of zero heads, k and v rows of
    added KV heads, and their q / k / v bias entries), and the attention's per-token FLOPs and KV cache as ratios to
    the pruned layer's."""
    added_q = (layout.heads - kept_heads) * head_dim * (hidden * 2 + biases)
    added_kv = (layout.kv_heads - kept_kv) * head_dim * (hidden + biases) * 2
    return {"zero_query_heads": layout.heads - kept_heads, "added_kv_heads": layout.kv_heads - kept_kv,
            "params_added": added_q + added_kv,
            "attention_flops_ratio": round(layout.heads / max(kept_heads, 1), 4),
            "kv_cache_ratio": round(layout.kv_heads / max(kept_kv, 1), 4)}


# ---------------------------------------------------------------- the same layouts applied to a layer in memory


def rows(tensor, sources, per: int):
    """Rows grouped `per` at a time, taken from `sources` (index of a source group, or -1 for zeros)."""
    out = tensor.new_zeros((len(sources) * per, *tensor.shape[1:]))
    for i, src in enumerate(sources):
        if src >= 0:
            out[i * per:(i + 1) * per] = tensor[src * per:(src + 1) * per]
    return out


def _set(linear, weight, bias=None) -> None:
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=False)


def pad_attention(layer, spec, heads: int, kv_heads: int, head_dim: int, layout: AttentionLayout) -> None:
    """Rewrites a resident layer's attention (`heads` query heads on `kv_heads` KV heads, any map) into `layout`:
    query heads in their slots (zero where a slot is empty), KV heads copied or zero, o_proj columns following the
    query slots. The layer computes what it did (an empty slot's output meets a zero o_proj column)."""
    d = head_dim
    attn = spec.get(layer, spec.attn)
    if spec.qkv:
        qkv = spec.get(layer, spec.qkv)
        q, k, v = qkv.weight.detach().split([heads * d, kv_heads * d, kv_heads * d])
        weight = torch.cat([rows(q, layout.slots, d), rows(k, layout.kv_source, d), rows(v, layout.kv_source, d)])
        bias = None
        if qkv.bias is not None:
            bq, bk, bv = qkv.bias.detach().split([heads * d, kv_heads * d, kv_heads * d])
            bias = torch.cat([rows(bq, layout.slots, d), rows(bk, layout.kv_source, d),
                              rows(bv, layout.kv_source, d)])
        _set(qkv, weight, bias)
    else:
        for path, sources in ((spec.q, layout.slots), (spec.k, layout.kv_source), (spec.v, layout.kv_source)):
            linear = spec.get(layer, path)
            _set(linear, rows(linear.weight.detach(), sources, d),
                 rows(linear.bias.detach(), sources, d) if linear.bias is not None else None)
    o = spec.get(layer, spec.o)
    _set(o, rows(o.weight.detach().T, layout.slots, d).T)
    attn.num_key_value_groups = layout.group
    attn.__dict__.pop("amp_head_map", None)
    for name, value in (("num_heads", layout.heads), ("num_key_value_heads", layout.kv_heads)):
        if hasattr(attn, name):
            setattr(attn, name, value)


def pad_mlp(layer, spec, width: int) -> None:
    """Zero neurons appended up to `width` (gate and up rows zero: act(0) * 0 = 0; down columns zero)."""
    down = spec.get(layer, spec.down)
    have = down.in_features
    if have == width:
        return
    if spec.gate_up:
        fused = spec.get(layer, spec.gate_up)
        gate, up = fused.weight.detach().chunk(2)
        _set(fused, torch.cat([_grow(gate, width), _grow(up, width)]))
    for path in spec.mlp_in:
        linear = spec.get(layer, path)
        _set(linear, _grow(linear.weight.detach(), width),
             _grow(linear.bias.detach(), width) if linear.bias is not None else None)
    _set(down, _grow(down.weight.detach().T, width).T, down.bias.detach() if down.bias is not None else None)


def pad_experts(layer, moe, width: int) -> None:
    """Every expert's width padded with zero neurons up to `width` (fused gate_up / down tensors)."""
    experts = layer.get_submodule(moe.experts)
    gu, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    have = gu.shape[1] // 2
    if have == width:
        return
    new_gu = gu.new_zeros(gu.shape[0], 2 * width, gu.shape[2])
    new_gu[:, :have], new_gu[:, width:width + have] = gu[:, :have], gu[:, have:]
    new_down = down.new_zeros(down.shape[0], down.shape[1], width)
    new_down[:, :, :have] = down
    experts.gate_up_proj = nn.Parameter(new_gu, requires_grad=False)
    experts.down_proj = nn.Parameter(new_down, requires_grad=False)
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = width


def _grow(t, n: int):
    out = t.new_zeros((n, *t.shape[1:]))
    out[:t.shape[0]] = t
    return out



def layout_fixed(head_map: list[int], kv_heads: int, heads: int, total_kv: int) -> AttentionLayout | None:
    """The layout of exactly `heads` query heads on `total_kv` KV heads (a format with one shape for every
    layer), or None when the pruned layer does not fit in it."""
    if heads % total_kv:
        return None
    group = heads // total_kv
    slots: list[int] = []
    kv_source: list[int] = []
    for kv in range(kv_heads):
        queries = [q for q, h in enumerate(head_map) if h == kv]
        for start in range(0, len(queries), group):
            chunk = queries[start:start + group]
            slots += chunk + [-1] * (group - len(chunk))
            kv_source.append(kv)
    if len(kv_source) > total_kv:
        return None
    while len(kv_source) < total_kv:
        slots += [-1] * group
        kv_source.append(-1)
    return AttentionLayout(tuple(slots), tuple(kv_source), group)


def common_attention(maps: list[tuple[list[int], int]], head_dim: int, hidden: int, max_heads: int,
                     heads_fixed: int | None = None) -> tuple[int, int, list[AttentionLayout]]:
    """(query heads, KV heads, per-layer layouts) of the cheapest single attention shape that holds every layer
    (`maps`: each layer's head map and KV-head count) with zero query heads and copied or zero KV heads;
    `heads_fixed`: the query-head count the format demands."""
    best = None
    need = max(len(m) for m, _ in maps)
    for total_kv in range(1, max_heads + 1):
        low = heads_fixed if heads_fixed else max(need, total_kv)
        for heads in range(low, (heads_fixed or max_heads) + 1, 1):
            if heads % total_kv:
                continue
            layouts = [layout_fixed(m, kv, heads, total_kv) for m, kv in maps]
            if any(lay is None for lay in layouts):
                continue
            cost = sum((heads - len(m)) * 2 + (total_kv - kv) * 2 for m, kv in maps)
            if best is None or cost < best[0]:
                best = (cost, heads, total_kv, layouts)
            break  # more query heads for this KV count only cost more
    if best is None:
        raise ValueError("no common attention shape holds every layer")
    return best[1], best[2], best[3]

"""Making a layer's attention expressible where a format only knows even groups (and, for DeciLM in vLLM, a fixed
query-head count): zero query heads are added back (zero o_proj columns: their output is multiplied away, so the
layer computes exactly what the pruned one does) and KV heads are duplicated or zero-filled, so that every KV head
serves the same number of query slots. Pure arithmetic; the exporters move the tensors."""
from __future__ import annotations

from dataclasses import dataclass


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

"""Per-layer budgets: how many attention structures and MLP neurons each layer gives up, decided jointly.

Every layer has two blocks: attention, and its MLP (dense neurons, or a mixture of experts whose block is one
removal path of expert and expert-neuron moves, prune/experts.py). A block removes its structures in a fixed
order (lowest score first)
and knows, for k structures removed, the parameters that frees (`params(k)`, cumulative: in query-head mode a KV
head goes with the last query head of its group) and an error estimate (`error(k)`). A greedy solver then takes,
over all blocks of all layers, the step that costs the least error per parameter freed until the budget is met
(exact to one neuron where the MLP can absorb it). Methods differ only in the error estimate and the scope:
- `sensitivity`: error(k) measured on the calibration data (relative change of the layer's output when the block
  loses its k lowest-scored structures), one greedy over the whole model;
- `depth`: each layer's share of the budget rises linearly with depth (`depth_range`, as a multiple of the
  uniform share); within a layer the greedy splits it between attention and MLP by score mass: error(k) is the
  share of the block's total score carried by the k structures removed.
"""
from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, field

import torch

from ..common.errors import AmpError
from . import experts as moe_structures
from .criteria import group_scores, removal_order
from .keep import Cut

MLP_STEPS = 64  # the MLP block moves in steps of 1/64 of its neurons (the last step is exact to one neuron)


@dataclass
class Block:
    layer: int
    kind: str                        # "attention" | "mlp" | "moe"
    params: list[int]                # params(k) for k = 0..max_remove, cumulative
    error: list[float]               # error(k) for k = 0..max_remove, cumulative, nondecreasing
    step: int = 1
    removed: int = field(default=0)
    states: list | None = None       # what k stands for, where moves are not single structures: "moe": (experts,
                                     # expert neurons) removed; with --multiple-of: the structures removed


    @property
    def max_remove(self) -> int:
        return len(self.params) - 1

    def next_step(self) -> tuple[float, int] | None:
        """(error per parameter of the next step, its size), or None when the block is at its floor."""
        if self.removed >= self.max_remove:
            return None
        k = min(self.removed + self.step, self.max_remove)
        dp = self.params[k] - self.params[self.removed]
        de = self.error[k] - self.error[self.removed]
        return (de / max(dp, 1), k - self.removed)


def _coarsen(block: Block, allowed) -> Block:
    """The block restricted to the removal counts `allowed(count)` admits (--multiple-of): k then indexes them."""
    keep = [k for k in range(len(block.params)) if allowed(k)] or [0]  # none admitted within the floor: keep all
    return Block(block.layer, block.kind, [block.params[k] for k in keep], [block.error[k] for k in keep],
                 max(1, block.step * len(keep) // max(len(block.params), 1)), states=keep)


def removal_params(order_groups: list[int], query_cost: int, kv_cost: int, group_sizes: dict[int, int]) -> list[int]:
    """params(k) for query heads removed in `order` (each given by its KV group): a query head frees
    `query_cost`; the last query head of a group frees the KV head too."""
    left = dict(group_sizes)
    out, total = [0], 0
    for g in order_groups:
        left[g] -= 1
        total += query_cost + (kv_cost if left[g] == 0 else 0)
        out.append(total)
    return out


def interpolate(levels: dict[int, float], max_remove: int) -> list[float]:
    """error(k) for k = 0..max_remove from measured levels (k -> error): linear between them, extended with
    the last slope past the last one, made nondecreasing."""
    xs, ys = zip(*sorted({0: 0.0, **levels}.items()))
    out = []
    for k in range(max_remove + 1):
        j = bisect.bisect_left(xs, k)
        if j < len(xs) and xs[j] == k:
            out.append(ys[j])
        elif j == len(xs):
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
            out.append(ys[-1] + max(slope, 0.0) * (k - xs[-1]))
        else:
            out.append(ys[j - 1] + (ys[j] - ys[j - 1]) * (k - xs[j - 1]) / (xs[j] - xs[j - 1]))
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1])
    return out


def score_mass_error(scores_in_removal_order: torch.Tensor) -> list[float]:
    """error(k) = share of the block's total score carried by its first k structures in removal order."""
    s = scores_in_removal_order.double().clamp_min(0)
    total = float(s.sum()) or 1.0
    return [0.0] + (s.cumsum(0) / total).tolist()


def solve(blocks: list[Block], budget: int) -> int:
    """Greedy over all blocks until `budget` parameters are freed; returns the parameters freed.
    Raises when the blocks cannot free that many (the floor is too high)."""
    capacity = sum(b.params[-1] for b in blocks)
    if budget > capacity:
        raise AmpError(f"the budget asks for {budget:,} parameters but the per-layer floor (--min-keep) leaves "
                       f"only {capacity:,} removable; lower --min-keep or the ratio")
    heap = []
    for i, b in enumerate(blocks):
        nxt = b.next_step()
        if nxt:
            heapq.heappush(heap, (nxt[0], i))
    freed = sum(b.params[b.removed] for b in blocks)  # a coarsened block may start with forced removals
    deferred = []  # attention steps that would overshoot what is left: taken only if nothing else can free it
    while freed < budget and (heap or deferred):
        forced = not heap
        cost, i = heapq.heappop(heap if heap else deferred)
        b = blocks[i]
        _, size = b.next_step()
        before = b.params[b.removed]
        if not forced and b.kind == "attention" and b.params[b.removed + size] - before > budget - freed and \
                any(blocks[j].kind != "attention" for _, j in heap):
            # a whole head or group past the budget, where neurons could land it: the neurons go first
            heapq.heappush(deferred, (cost, i))
            continue
        if b.kind != "attention" and b.params[b.removed + size] - before > budget - freed:
            # land exactly: the fewest moves of this step that free what is left
            need = before + budget - freed
            size = max(1, bisect.bisect_left(b.params, need, b.removed + 1, b.removed + size + 1) - b.removed)
        b.removed += size
        freed += b.params[b.removed] - before
        nxt = b.next_step()
        if nxt:
            heapq.heappush(heap, (nxt[0], i))
        if forced:  # the other deferred attention steps may fit what is left now
            while deferred:
                heapq.heappush(heap, heapq.heappop(deferred))
    # An attention step can overshoot by up to a KV group: give MLP neurons back while the budget stays met. Coarse
    # moves (a whole expert, 8 neurons of every expert, --multiple-of steps): give one back while that brings the
    # total closer to the budget, even if just under it.
    for b in sorted((b for b in blocks if b.kind != "attention" and b.removed), key=lambda b: -b.removed):
        while b.removed:
            delta = b.params[b.removed] - b.params[b.removed - 1]
            coarse = b.states is not None  # experts, or --multiple-of steps: the nearest total, even just under
            if not (freed - delta >= budget or (coarse and abs(freed - delta - budget) < freed - budget)):
                break
            freed -= delta
            b.removed -= 1
    return freed


def depth_targets(layer_capacity: list[int], budget: int, depth_range: tuple[float, float]) -> list[int]:
    """Per-layer parameter targets: the uniform share times a factor rising linearly with depth from
    depth_range[0] to depth_range[1], capped by each layer's capacity, the excess spread over the others."""
    n = len(layer_capacity)
    lo, hi = depth_range
    weights = [lo + (hi - lo) * i / max(n - 1, 1) for i in range(n)]
    targets = [0.0] * n
    remaining, free = float(budget), set(range(n))
    while remaining > 0.5 and free:
        total_w = sum(weights[i] for i in free)
        spill = 0.0
        for i in sorted(free):
            add = remaining * weights[i] / total_w
            room = layer_capacity[i] - targets[i]
            targets[i] += min(add, room)
            spill += max(add - room, 0.0)
        free = {i for i in free if layer_capacity[i] - targets[i] > 0.5}
        remaining = spill
    if remaining > 0.5:
        raise AmpError(f"the budget asks for {budget:,} parameters but the per-layer floor (--min-keep) leaves "
                       f"only {sum(layer_capacity):,} removable; lower --min-keep or the ratio")
    return [round(t) for t in targets]


def _attention_block(index, obs, units, geom, query: bool, min_keep: float, errors: str) -> tuple[Block, list]:
    if query and geom.is_gqa:
        order = removal_order(obs.head_scores)
        params = removal_params((order // geom.group_size).tolist(), units.query_head, units.kv_head,
                                {g: geom.group_size for g in range(geom.num_kv_heads)})
        scores = obs.head_scores[order]
    else:
        order = removal_order(group_scores(obs.head_scores, geom))
        params = [k * units.attn_unit(geom) for k in range(len(order) + 1)]
        scores = group_scores(obs.head_scores, geom)[order]
    return _block(index, "attention", params, scores, obs.attention_error, min_keep, errors, 1), order


def _block(index, kind, params, scores, measured, min_keep, errors, step) -> Block:
    count = len(params) - 1
    max_remove = count - max(1, math.ceil(min_keep * count - 1e-9))  # keep >= ceil(min_keep * count), >= 1
    params = params[:max_remove + 1]
    error = interpolate(measured, max_remove) if errors == "measured" else \
        score_mass_error(scores)[:max_remove + 1]
    return Block(index, kind, params, error, step)


def _moe_block(index, obs, geom, min_keep: float, errors: str, mode: str, multiple_of: int = 1) -> Block:
    states, params, mass = moe_structures.removal_path(obs.expert_scores, obs.expert_neuron_scores, geom,
                                                       moe_structures.moe_units(geom), mode, min_keep, multiple_of,
                                                       obs.expert_paths)
    # measured on the layer's output (sensitivity), or the path's own errors (score mass, or the costs the
    # experts' Grams give under obs / kl)
    error = interpolate(obs.moe_error, len(params) - 1) if errors == "measured" and obs.moe_error else mass
    step = max(1, geom.expert_intermediate // MLP_STEPS)
    return Block(index, "moe", params, error, step, states=states)


def layer_blocks(index, obs, units, geom, query: bool, min_keep: float, errors: str, moe_mode: str = "auto",
                 multiple_of: int = 1, mlp_multiple_of: int = 1, expert_multiple_of: int = 1) -> list[Block]:
    """The attention and MLP blocks of one layer (errors: "measured" curves, or "mass" of scores), with only the
    removal counts that leave the attention width a multiple of `multiple_of`, the MLP's of `mlp_multiple_of` and
    each expert's of `expert_multiple_of` (an unpruned MLP keeps its dense width, whatever it is)."""
    from .allocate import width_ok
    attention, _ = _attention_block(index, obs, units, geom, query, min_keep, errors)
    if multiple_of > 1:
        heads_left = (lambda k: geom.num_heads - k) if query and geom.is_gqa else \
            (lambda k: (geom.num_kv_heads - k) * geom.group_size)
        attention = _coarsen(attention, lambda k: width_ok(heads_left(k), geom.head_dim, multiple_of))
    if obs.is_moe:
        return [attention, _moe_block(index, obs, geom, min_keep, errors, moe_mode, expert_multiple_of)]
    order = removal_order(obs.neuron_scores)
    mlp = _block(index, "mlp", [k * units.neuron for k in range(geom.intermediate + 1)], obs.neuron_scores[order],
                 obs.mlp_error, min_keep, errors, max(1, geom.intermediate // MLP_STEPS))
    if mlp_multiple_of > 1:
        mlp = _coarsen(mlp, lambda k: k == 0 or (geom.intermediate - k) % mlp_multiple_of == 0)
    return [attention, mlp]


def _count(block: Block) -> int:
    return block.states[block.removed] if block.states is not None else block.removed


def _cut(attention: Block, mlp: Block) -> Cut:
    if mlp.kind == "moe":
        experts, neurons = mlp.states[mlp.removed]
        return Cut(attention=_count(attention), experts=experts, expert_neurons=neurons)
    return Cut(attention=_count(attention), neurons=_count(mlp))


def allocate(observations, units, geom, method: str, query: bool, min_keep: float, budget: int,
             depth_range: tuple[float, float], layer_params: list[int] | None = None, moe_mode: str = "auto",
             multiple_of: int = 1, mlp_multiple_of: int = 1, expert_multiple_of: int = 1) -> tuple[list[Cut], dict]:
    """Per layer what it gives up (a Cut), freeing `budget` parameters in all, and the allocation's inputs for
    the report. `layer_params`: each layer's parameters (layers of a MoE model differ); default units.layer.
    The multiples: of the attention's width, of a dense MLP's kept width, of an expert's kept width."""
    # measured curves: the sensitivity measurement, or the Gram-based paths (kl; depth under the obs criterion,
    # whose rank scores carry no mass)
    curves = bool(observations) and (bool(observations[0].attention_error) or observations[0].expert_paths is not None)
    errors = "measured" if method in ("sensitivity", "kl") or curves else "mass"
    blocks = [layer_blocks(i, o, units, geom, query, min_keep, errors, moe_mode, multiple_of, mlp_multiple_of,
                           expert_multiple_of)
              for i, o in enumerate(observations)]
    n = len(blocks)
    layer_params = layer_params or [units.layer] * n
    inputs: dict = {"method": method, "budget_params": budget, "min_keep": min_keep}
    if method == "sensitivity":
        solve([b for pair in blocks for b in pair], budget)
        inputs["attention_error"] = [{str(k): round(v, 6) for k, v in o.attention_error.items()} for o in observations]
        inputs["mlp_error"] = [{str(k): round(v, 6) for k, v in (o.moe_error if o.is_moe else o.mlp_error).items()}
                               for o in observations]
    elif method == "kl":  # one solve over every block of every layer, in predicted nats of KL per token
        solve([b for pair in blocks for b in pair], budget)
        inputs["predicted_kl"] = [[float(f"{b.error[b.removed]:.4g}") for b in pair] for pair in blocks]
        inputs["predicted_kl_total"] = float(f"{sum(b.error[b.removed] for pair in blocks for b in pair):.4g}")
    elif method == "depth":
        targets = depth_targets([a.params[-1] + m.params[-1] for a, m in blocks], budget, depth_range)
        surplus = 0  # what earlier layers freed beyond their targets (coarse moves): later layers free less
        for pair, target in zip(blocks, targets):
            goal = min(max(target - surplus, 0), sum(b.params[-1] for b in pair))
            surplus += solve(pair, goal) - target
        inputs.update(depth_range=list(depth_range), layer_targets=targets)
    elif method == "uniform":  # the same parameter count from every layer, whole attention units first
        per_layer = budget / n
        for (attention, mlp), params in zip(blocks, layer_params):
            share = per_layer / params
            most = int(share * _structures(attention, geom, query))
            fits = [j for j in range(len(attention.params))
                    if _state(attention, j) <= most and attention.params[j] <= per_layer]
            attention.removed = max(fits, default=0)
            k = attention.removed
            rest = per_layer - attention.params[k]
            if rest > mlp.params[-1] + (mlp.params[-1] - mlp.params[-2] if mlp.max_remove else 0) / 2:
                what = "the experts" if mlp.kind == "moe" else "the MLP"
                raise AmpError(f"the budget would empty {what} past the floor (--min-keep {min_keep}"
                               + (", and num_experts_per_tok experts must stay" if mlp.kind == "moe" else "")
                               + "); choose a smaller ratio")
            # the MLP takes the rest, as close as its moves allow
            mlp.removed = min(range(len(mlp.params)), key=lambda j: (abs(mlp.params[j] - rest), j))
    else:
        raise AmpError(f"unknown allocation {method!r}")
    inputs["freed_params"] = sum(b.params[b.removed] for pair in blocks for b in pair)
    return [_cut(a, m) for a, m in blocks], inputs


def _state(block: Block, k: int) -> int:
    return block.states[k] if block.states is not None else k


def _structures(attention: Block, geom, query: bool) -> int:
    return geom.num_heads if query and geom.is_gqa else geom.num_kv_heads

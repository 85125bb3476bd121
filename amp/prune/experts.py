"""Mixture-of-experts layers: experts and expert neurons as structures beside heads and neurons.

Scores, in the AMP spirit: an expert's importance is the mean over calibration tokens of the L1 norm of what it
writes into the residual stream (its routing weight times its output; zero for tokens not routed to it); an
expert neuron's importance is the mean |a_j| over the tokens routed to that expert. They are gathered by running
the experts' own computation (transformers >= 5: router -> top-k -> `experts(hidden, top_k_index,
top_k_weights)`) with the statistics added, so the layer's output is what the stock loop computes.

Pruning removes whole experts (router rows and expert weights together; `num_experts_per_tok` must stay within
the experts left) and expert neurons (the same count in every kept expert of a layer, since transformers stores
a layer's experts as one 3-D tensor; each expert keeps its own best). Budgets see a layer's MoE block as one
removal path: a sequence of atomic moves (one expert, or one neuron from every kept expert), ordered greedily by
the score mass they remove per parameter, so that one solver decides heads, experts and expert neurons jointly.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arch import Geometry, MoESpec
from ..common.errors import AmpError
from .config import MOE as MOE_MODES
PATH_CHUNKS = 64        # neuron moves are weighed in chunks of 1/64 of an expert's width
# Kept expert widths are multiples of 8: transformers 5 runs experts through torch's grouped_mm by default, which
# needs every stride a multiple of 16 bytes (8 bf16 / fp16 values; a width of 23 fails to run at all).
WIDTH_MULTIPLE = 8
MIN_TOKENS_SHARE = 0.1  # an expert routed fewer than this share of its fair share of tokens is named in a note


@dataclass
class ExpertStats:
    """Per expert, over valid calibration tokens: sum of ||w * y||_1, tokens routed, per-neuron sum of |a|; and for
    structured OBS / the KL allocation, each expert's Gram of its routing-weighted down-projection input,
    sum w^2 a a^T (fp32: E x I^2 floats, the largest statistic of a MoE layer, e.g. 6.6 GB for a Mixtral-8x7B
    layer, 0.3 GB for Qwen3-30B-A3B)."""
    l1: torch.Tensor         # (E,) fp32
    tokens: torch.Tensor     # (E,) int64
    neuron_abs: torch.Tensor  # (E, I) fp32
    grams: torch.Tensor | None = None  # (E, I, I) fp32

    @classmethod
    def zeros(cls, experts: int, width: int, device, grams: bool = False) -> "ExpertStats":
        return cls(torch.zeros(experts, dtype=torch.float32, device=device),
                   torch.zeros(experts, dtype=torch.long, device=device),
                   torch.zeros(experts, width, dtype=torch.float32, device=device),
                   torch.zeros(experts, width, width, dtype=torch.float32, device=device) if grams else None)


def experts_module(layer, moe: MoESpec):
    return layer.get_submodule(moe.experts)


def router_module(layer, moe: MoESpec):
    return layer.get_submodule(moe.router)


def check_fused(layer, moe: MoESpec) -> None:
    experts = experts_module(layer, moe)
    if not (isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor) and experts.gate_up_proj.dim() == 3):
        import transformers
        raise AmpError("pruning mixture-of-experts layers needs transformers >= 5 (experts fused into 3-D tensors); "
                       f"found {transformers.__version__}")


def _experts_forward(experts, stats: ExpertStats | None, valid: torch.Tensor | None,
                     removed_neurons: torch.Tensor | None = None):
    """The experts' computation, as transformers' own loop does it, with the statistics added (valid tokens only)
    and optionally some neurons of every expert zeroed (`removed_neurons` (E, I) bool: a sensitivity measurement)."""
    def forward(hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        n_experts = experts.gate_up_proj.shape[0]
        for e in range(n_experts):
            top_k_pos, token_idx = torch.where((top_k_index == e).T)  # the stock loop's order
            if token_idx.numel() == 0:
                continue
            gate, up = F.linear(hidden_states[token_idx], experts.gate_up_proj[e]).chunk(2, dim=-1)
            a = experts.act_fn(gate) * up
            if removed_neurons is not None:
                a = a.masked_fill(removed_neurons[e], 0)
            y = F.linear(a, experts.down_proj[e]) * top_k_weights[token_idx, top_k_pos, None]
            if stats is not None:
                keep = valid[token_idx] if valid is not None else slice(None)
                stats.l1[e] += y[keep].float().abs().sum()
                stats.tokens[e] += int(y[keep].shape[0])
                stats.neuron_abs[e] += a[keep].float().abs().sum(dim=0)
                if stats.grams is not None:
                    rows = (a * top_k_weights[token_idx, top_k_pos, None])[keep].float()
                    stats.grams[e] += rows.T @ rows
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out
    return forward


@contextmanager
def expert_statistics(layer, moe: MoESpec, geom: Geometry, token_mask, grams: bool = False):
    """Runs the layer's experts through `_experts_forward` while the context is open; yields ExpertStats."""
    check_fused(layer, moe)
    experts = experts_module(layer, moe)
    stats = ExpertStats.zeros(experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[1] // 2,
                              experts.gate_up_proj.device, grams)

    def forward(hidden_states, top_k_index, top_k_weights):
        flat = token_mask.flat
        valid = None if flat is None else flat.to(hidden_states.device)
        return _experts_forward(experts, stats, valid)(hidden_states, top_k_index, top_k_weights)
    experts.forward = forward
    try:
        yield stats
    finally:
        del experts.forward


def scores(stats: ExpertStats, total_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert scores (E,): mean over ALL calibration tokens of ||w y||_1; neuron scores (E, I): mean |a_j| over
    the tokens routed to each expert), fp32 on the CPU."""
    expert = stats.l1.cpu() / max(total_tokens, 1)
    neuron = stats.neuron_abs.cpu() / stats.tokens.cpu().clamp_min(1)[:, None].float()
    return expert, neuron


@dataclass
class ExpertPaths:
    """Measured costs of a MoE block's moves, in the unit of the dense blocks' curves (prune/obs.py): removing
    an expert costs its whole routing-weighted output (the error if its tokens' other experts absorbed nothing),
    removing an expert's first n neurons (in its own order) costs the plain error they leave (experts are not
    refit)."""
    expert_cost: torch.Tensor   # (E,)
    neuron_cost: torch.Tensor   # (E, I + 1), cumulative, neuron_cost[:, 0] = 0


def magnitude_scores(layer, moe: MoESpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free: the L2 norm of every weight an expert (or an expert neuron) owns."""
    experts = experts_module(layer, moe)
    gu, down = experts.gate_up_proj.detach().float(), experts.down_proj.detach().float()
    width = gu.shape[1] // 2
    neuron = gu[:, :width].square().sum(-1) + gu[:, width:].square().sum(-1) + down.square().sum(1)
    return neuron.sum(-1).sqrt().cpu(), neuron.sqrt().cpu()


# ---------------------------------------------------------------- the removal path


@dataclass(frozen=True)
class MoEUnits:
    expert_row: int     # parameters of one expert per intermediate neuron: gate row + up row + down column
    router_row: int     # the router's row of one expert


def moe_units(geom: Geometry) -> MoEUnits:
    return MoEUnits(expert_row=3 * geom.hidden, router_row=geom.hidden)


def floors(geom: Geometry, min_keep: float) -> tuple[int, int]:
    """(experts that must stay, neurons each kept expert must keep)."""
    e = max(geom.top_k, math.ceil(min_keep * geom.num_experts - 1e-9), 1)
    n = max(1, math.ceil(min_keep * geom.expert_intermediate - 1e-9))
    return e, n


def removal_path(expert_scores: torch.Tensor, neuron_scores: torch.Tensor, geom: Geometry, units: MoEUnits,
                 mode: str, min_keep: float, multiple_of: int = 1, costs: ExpertPaths | None = None
                 ) -> tuple[list[tuple[int, int]], list[int], list[float]]:
    """The MoE block's removal path: states (experts removed, neurons removed from each kept expert), the
    parameters freed and the score-mass error of each (error = share of expert score mass removed, plus, for each
    kept expert, its share times the share of its neuron mass removed). `mode`: experts only, neurons only, or
    auto (the next move is whichever removes less error per parameter, weighed in chunks of neurons). `costs`:
    measured errors (structured OBS / the KL allocation) instead of score mass."""
    if mode not in MOE_MODES:
        raise AmpError(f"unknown --moe {mode!r}; choose one of {', '.join(MOE_MODES)}")
    E, width = geom.num_experts, geom.expert_intermediate
    keep_e, keep_n = floors(geom, min_keep)
    # the neurons removed per move keep the width a multiple of WIDTH_MULTIPLE (and of --multiple-of); the first
    # move rounds down to one
    step = math.lcm(WIDTH_MULTIPLE, max(multiple_of, 1))
    first = width % step or step
    most = width - max(keep_n, 1)
    most -= (most - first) % step if most >= first else most
    share = expert_scores.double().clamp_min(0)
    share = share / (float(share.sum()) or 1.0)
    expert_order = torch.argsort(share, stable=True)          # lowest first
    ns = neuron_scores.double().clamp_min(0).sort(dim=1).values   # each expert's neurons, lowest first
    mass = torch.cat([ns.new_zeros(E, 1), ns.cumsum(1) / ns.sum(1, keepdim=True).clamp_min(1e-30)], dim=1)
    state_e, state_n = 0, 0
    kept = torch.ones(E, dtype=torch.bool)
    states, params, errors = [(0, 0)], [0], [0.0]
    allow_e = mode in ("auto", "experts") and E - keep_e > 0
    allow_n = mode in ("auto", "neurons") and most > 0
    chunk = max(step, width // PATH_CHUNKS // step * step)

    def neuron_moves(n_removed: int, up_to: int) -> list[int]:
        """The states (neurons removed) of the next neuron moves, at most `up_to` neurons further."""
        out, n = [], n_removed
        while n < most:
            n += first if n == 0 else step
            if n - n_removed > up_to and out:
                break
            out.append(n)
        return out

    if costs is not None:
        expert_order = torch.argsort(expert_scores.double(), stable=True)

    def error_at(e_removed: int, n_removed: int) -> float:
        gone = expert_order[:e_removed]
        k = torch.ones(E, dtype=torch.bool)
        k[gone] = False
        if costs is not None:
            return float(costs.expert_cost[gone].sum() + costs.neuron_cost[k, n_removed].sum())
        return float(share[gone].sum() + (share[k] * mass[k, n_removed]).sum())

    while True:
        can_e = allow_e and state_e < E - keep_e
        moves = neuron_moves(state_n, chunk) if allow_n else []
        if not (can_e or moves):
            break
        options = []
        if can_e:
            dp = (width - state_n) * units.expert_row + units.router_row
            options.append(((error_at(state_e + 1, state_n) - errors[-1]) / dp, "e"))
        if moves:
            dp = (moves[-1] - state_n) * units.expert_row * int(kept.sum())
            options.append(((error_at(state_e, moves[-1]) - errors[-1]) / max(dp, 1), "n"))
        _, move = min(options)
        if move == "e":
            kept[expert_order[state_e]] = False
            state_e += 1
            states.append((state_e, state_n))
            params.append(params[-1] + (width - state_n) * units.expert_row + units.router_row)
            errors.append(error_at(state_e, state_n))
        else:
            for n in moves:  # one move per WIDTH_MULTIPLE neurons: budgets land as close as widths allow
                params.append(params[-1] + units.expert_row * (E - state_e) * (n - state_n))
                state_n = n
                states.append((state_e, state_n))
                errors.append(error_at(state_e, state_n))
    for i in range(1, len(errors)):
        errors[i] = max(errors[i], errors[i - 1])
    return states, params, errors


def keep_sets(expert_scores: torch.Tensor, neuron_scores: torch.Tensor, experts_removed: int,
              neurons_removed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(kept experts, sorted; per kept expert, its kept neurons, sorted): the lowest-scored experts go, and every
    kept expert loses its own lowest-scored `neurons_removed` neurons."""
    order = torch.argsort(expert_scores, stable=True)
    gone = set(order[:experts_removed].tolist())
    kept = torch.tensor([e for e in range(len(expert_scores)) if e not in gone], dtype=torch.long)
    width = neuron_scores.shape[1]
    neurons = []
    for e in kept.tolist():
        best = torch.argsort(-neuron_scores[e], stable=True)[:width - neurons_removed]
        neurons.append(best.sort().values)
    return kept, neurons


def slice_experts(layer, moe: MoESpec, kept: torch.Tensor, neurons: list[torch.Tensor]) -> None:
    """Cuts the router rows and the experts' fused tensors to the kept experts and neurons."""
    router, experts = router_module(layer, moe), experts_module(layer, moe)
    device = router.weight.device
    kept_d = kept.to(device)
    router.weight = nn.Parameter(router.weight.detach().index_select(0, kept_d).clone(), requires_grad=False)
    if getattr(router, "bias", None) is not None:
        router.bias = nn.Parameter(router.bias.detach().index_select(0, kept_d).clone(), requires_grad=False)
    gu, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    width, keep = gu.shape[1] // 2, len(neurons[0]) if neurons else 0
    # filled expert by expert: the layer's memory grows by the new tensors only, never by a list of pieces
    new_gu = gu.new_empty(len(kept), 2 * keep, gu.shape[2])
    new_down = down.new_empty(len(kept), down.shape[1], keep)
    for i, (e, n) in enumerate(zip(kept.tolist(), neurons)):
        n = n.to(device)
        new_gu[i, :keep] = gu[e].index_select(0, n)
        new_gu[i, keep:] = gu[e].index_select(0, width + n)
        new_down[i] = down[e].index_select(1, n)
    experts.gate_up_proj = nn.Parameter(new_gu, requires_grad=False)
    experts.down_proj = nn.Parameter(new_down, requires_grad=False)
    # transformers caches these at construction; keep them true for the new sizes
    for module, name, value in ((router, "num_experts", len(kept)), (experts, "num_experts", len(kept)),
                                (experts, "intermediate_dim", len(neurons[0]) if neurons else 0)):
        if hasattr(module, name):
            setattr(module, name, value)


# ---------------------------------------------------------------- measuring output change (sensitivity)


@contextmanager
def masked(layer, moe: MoESpec, config, removed_experts: torch.Tensor, removed_neurons: torch.Tensor):
    """The layer's MoE block as if some experts were gone (router logits -inf before the softmax and top-k, top-k
    weights renormalized as the family does) and some neurons of every expert zeroed; for measurements."""
    router, experts = router_module(layer, moe), experts_module(layer, moe)
    top_k = int(getattr(config, moe.top_k_key))
    renorm = moe.renormalize(config)
    gone = removed_experts.to(router.weight.device)

    def route(hidden_states):
        h = hidden_states.reshape(-1, router.weight.shape[1])
        logits = F.linear(h, router.weight)
        logits[:, gone] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, index = torch.topk(probs, top_k, dim=-1)
        if renorm:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), index
    router.forward = route
    experts.forward = _experts_forward(experts, None, None, removed_neurons.to(router.weight.device))
    try:
        yield
    finally:
        del router.forward
        del experts.forward


def too_few_tokens(tokens: torch.Tensor, total: int, top_k: int) -> list[int]:
    """Experts routed fewer than MIN_TOKENS_SHARE of their fair share (total x top_k / E) of calibration tokens."""
    fair = total * top_k / max(len(tokens), 1)
    return [e for e, t in enumerate(tokens.tolist()) if t < MIN_TOKENS_SHARE * fair]


def summary(geom: Geometry, layers: list[dict], params_before: int, params_after: int, total_tokens: int,
            mode: str) -> tuple[dict, list[str]]:
    """The report's `moe` entry (experts per layer before and after, and the parameters active per token, which
    is what a MoE user pays for: everything but the experts a token is not routed to) and its notes (experts that
    saw too few calibration tokens for their scores to mean much)."""
    per_expert = lambda width: 3 * geom.hidden * width  # noqa: E731 - gate row, up row, down column per neuron
    moe_layers = [entry for entry in layers if "kept_experts" in entry]
    idle_before = sum((geom.num_experts - geom.top_k) * per_expert(geom.expert_intermediate) for _ in moe_layers)
    idle_after = sum((len(e["kept_experts"]) - geom.top_k) * per_expert(len(e["kept_expert_neurons"][0]))
                     for e in moe_layers)
    out = {"mode": mode, "moe_layers": len(moe_layers), "experts_per_token": geom.top_k,
           "experts": [geom.num_experts, sorted({len(e["kept_experts"]) for e in moe_layers})],
           "expert_width": [geom.expert_intermediate, sorted({len(e["kept_expert_neurons"][0]) for e in moe_layers})],
           "active_params_per_token": [params_before - idle_before, params_after - idle_after]}
    notes = []
    thin = {e["layer"]: too_few_tokens(torch.tensor(e["expert_tokens"]), total_tokens, geom.top_k)
            for e in moe_layers}
    thin = {layer: experts for layer, experts in thin.items() if experts}
    if thin:
        shown = "; ".join(f"layer {layer}: {', '.join(map(str, experts))}" for layer, experts in list(thin.items())[:6])
        more = f" (and {len(thin) - 6} more layers)" if len(thin) > 6 else ""
        notes.append(f"experts routed fewer than {MIN_TOKENS_SHARE:.0%} of their share of the {total_tokens:,} "
                     f"calibration tokens, so their scores rest on little data: {shown}{more}; calibrate on more "
                     "tokens (--nsamples) to trust them")
    return out, notes

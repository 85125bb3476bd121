"""Importance scores (pure functions): higher means more important, the lowest go first."""
from __future__ import annotations

import torch

from ..arch import ArchSpec, Geometry
from ..common.errors import AmpError
from . import experts as moe_structures
from .statistics import LayerStats

# Criteria defined for mixture-of-experts layers (the baselines' channel statistics have no expert form here).
MOE_CRITERIA = ("amp", "reversed", "random", "magnitude", "obs")


def scores(criterion: str, layer: torch.nn.Module, spec: ArchSpec, geom: Geometry,
           stats: LayerStats | None, generator: torch.Generator, moe: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(per query head (H,), per neuron (I,)) fp32 scores on the CPU; a mixture-of-experts layer has no dense
    neurons (an empty tensor; its experts are scored by `expert_scores`)."""
    if moe:
        if criterion not in MOE_CRITERIA:
            raise AmpError(f"criterion {criterion!r} has no form for mixture-of-experts layers; use one of "
                           f"{', '.join(MOE_CRITERIA)}")
        if criterion == "magnitude":
            return magnitude_head_scores(layer, spec, geom), torch.zeros(0)
        if criterion == "random":
            return torch.rand(geom.num_heads, generator=generator), torch.zeros(0)
        head = stats.head_l1.cpu() / max(stats.tokens, 1)
        return (head if criterion == "amp" else -head), torch.zeros(0)
    if criterion in ("amp", "reversed"):
        if stats is None or stats.tokens == 0:
            raise ValueError(f"criterion {criterion!r} needs calibration statistics")
        head = stats.head_l1.cpu() / stats.tokens
        neuron = stats.neuron_abs.cpu() / stats.tokens
        # reversed: the paper's ablation that keeps the LEAST important structures.
        return (head, neuron) if criterion == "amp" else (-head, -neuron)
    if criterion == "random":
        return (torch.rand(geom.num_heads, generator=generator),
                torch.rand(geom.intermediate, generator=generator))
    if criterion == "magnitude":
        return magnitude_scores(layer, spec, geom)
    if criterion in ("wanda-sp", "flap"):
        if stats is None or stats.o_moments is None or stats.o_moments.count == 0:
            raise ValueError(f"criterion {criterion!r} needs calibration channel statistics")
        fn = wanda_sp_scores if criterion == "wanda-sp" else flap_scores
        return fn(layer, spec, geom, stats)
    raise ValueError(f"unknown criterion {criterion!r}")


def expert_scores(criterion: str, layer, spec: ArchSpec, stats: LayerStats | None,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(per expert (E,), per expert neuron (E, I)) fp32 scores on the CPU, for a mixture-of-experts layer."""
    experts = moe_structures.experts_module(layer, spec.moe)
    n, width = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[1] // 2
    if criterion == "random":
        return torch.rand(n, generator=generator), torch.rand(n, width, generator=generator)
    if criterion == "magnitude":
        return moe_structures.magnitude_scores(layer, spec.moe)
    expert, neuron = moe_structures.scores(stats.experts, stats.tokens)
    return (expert, neuron) if criterion == "amp" else (-expert, -neuron)


def magnitude_head_scores(layer, spec: ArchSpec, geom: Geometry) -> torch.Tensor:
    """Data-free: L2 norm of every weight a head owns (its q rows and o columns)."""
    d, h = geom.head_dim, geom.num_heads
    q_rows = _q_weight(layer, spec, geom).float().view(h, d, -1).square().sum(dim=(1, 2))
    o_cols = spec.get(layer, spec.o).weight.float().view(-1, h, d).square().sum(dim=(0, 2))
    return (q_rows + o_cols).sqrt().cpu()


def magnitude_scores(layer, spec: ArchSpec, geom: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free: L2 norm of every weight a structure owns (a head's q rows and o columns; a neuron's
    input-projection rows and down-projection column)."""
    head = magnitude_head_scores(layer, spec, geom)
    neuron = spec.get(layer, spec.down).weight.float().square().sum(dim=0)
    for w in _mlp_in_weights(layer, spec, geom):
        neuron = neuron + w.float().square().sum(dim=1)
    return head, neuron.sqrt().cpu()


def _q_weight(layer, spec: ArchSpec, geom: Geometry) -> torch.Tensor:
    if spec.qkv:
        return spec.get(layer, spec.qkv).weight[: geom.num_heads * geom.head_dim]
    return spec.get(layer, spec.q).weight


def _mlp_in_weights(layer, spec: ArchSpec, geom: Geometry) -> list[torch.Tensor]:
    if spec.gate_up:
        w = spec.get(layer, spec.gate_up).weight
        return [w[: geom.intermediate], w[geom.intermediate:]]
    return [spec.get(layer, p).weight for p in spec.mlp_in]


def group_scores(head_scores: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """A KV group's score is the sum of its query heads' scores (heads of a group are contiguous in HF)."""
    return head_scores.view(geom.num_kv_heads, geom.group_size).sum(dim=1)


def removal_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices in the order they go: the reverse of keep_top's order (lowest score first)."""
    return torch.argsort(-scores, stable=True).flip(0)


def keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Sorted indices of the n_keep highest scores; ties go to the lower index, so results are stable."""
    order = torch.argsort(-scores, stable=True)
    return torch.sort(order[:n_keep]).values


def wanda_sp_scores(layer, spec: ArchSpec, geom: Geometry, stats: LayerStats):
    """Wanda-sp (structured Wanda, as in the FLAP paper's baseline): per input channel j of the output / down
    projection, mean over output rows i of |W_ij| * ||x_j||_2; a head sums its channels."""
    w_o = spec.get(layer, spec.o).weight.detach().double().abs()
    w_down = spec.get(layer, spec.down).weight.detach().double().abs()
    channel_o = (w_o * stats.o_moments.l2.to(w_o.device)[None, :]).mean(dim=0)
    neuron = (w_down * stats.down_moments.l2.to(w_down.device)[None, :]).mean(dim=0)
    head = channel_o.view(geom.num_heads, geom.head_dim).sum(dim=1)
    return head.float().cpu(), neuron.float().cpu()


def flap_scores(layer, spec: ArchSpec, geom: Geometry, stats: LayerStats):
    """FLAP's fluctuation metric (WIFV): per input channel j, the sample variance of x_j over calibration
    tokens times ||W[:, j]||_2^2 (how much the output moves when the channel is replaced by its mean); a head
    sums its channels. The removed channels' means are then folded into the bias (slicing.compensate_bias)."""
    w_o = spec.get(layer, spec.o).weight.detach().double()
    w_down = spec.get(layer, spec.down).weight.detach().double()
    channel_o = stats.o_moments.variance.to(w_o.device) * w_o.square().sum(dim=0)
    neuron = stats.down_moments.variance.to(w_down.device) * w_down.square().sum(dim=0)
    head = channel_o.view(geom.num_heads, geom.head_dim).sum(dim=1)
    return head.float().cpu(), neuron.float().cpu()

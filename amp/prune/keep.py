"""Keep sets (pure functions): which query heads, KV heads and neurons a layer keeps once the lowest-scored
structures are removed, and the head map that follows; the uniform prune's target config."""
from __future__ import annotations

import copy

import torch

from ..arch import Geometry
from . import criteria, slicing
from .criteria import removal_order
from .observe import Observation


def complement(kept: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


def target_config(config, heads: int, kv_heads: int, neurons: int, head_dim: int, config_biases: bool):
    """The pruned model's config (uniform: one architecture, new sizes)."""
    target = copy.deepcopy(config)
    slicing.update_config(target, heads, kv_heads, neurons, head_dim)
    if config_biases:
        target.attention_bias = True
        target.mlp_bias = True
    return target


def kept_sets(obs: Observation, geom: Geometry, query: bool, attention_removed: int, neurons_removed: int,
              within_kv: torch.Tensor | None = None):
    """(kept query heads, kept KV heads, kept neurons, head map) after removing the lowest-scored structures.
    `within_kv` (single query heads): the KV heads kept are exactly these; the kept query heads are each one's
    best, then the best of the rest of their heads."""
    if query and geom.is_gqa and within_kv is not None:
        kept_kv = within_kv.sort().values
        n_keep = geom.num_heads - attention_removed
        heads = slicing.head_rows(kept_kv, geom.group_size)          # query heads of those KV heads
        scores = obs.head_scores[heads]
        best = scores.view(len(kept_kv), geom.group_size).argmax(dim=1) + torch.arange(len(kept_kv)) * geom.group_size
        rest = torch.ones(len(heads), dtype=torch.bool)
        rest[best] = False
        extra = rest.nonzero().flatten()[torch.argsort(-scores[rest], stable=True)][:n_keep - len(kept_kv)]
        kept_heads = heads[torch.cat([best, extra])].sort().values
    elif query and geom.is_gqa:
        gone = set(removal_order(obs.head_scores)[:attention_removed].tolist())
        kept_heads = torch.tensor([h for h in range(geom.num_heads) if h not in gone], dtype=torch.long)
        kept_kv = torch.unique(kept_heads // geom.group_size)
    else:
        gone = set(removal_order(criteria.group_scores(obs.head_scores, geom))[:attention_removed].tolist())
        kept_kv = torch.tensor([g for g in range(geom.num_kv_heads) if g not in gone], dtype=torch.long)
        kept_heads = slicing.head_rows(kept_kv, geom.group_size)  # query heads of the kept groups
    gone_n = removal_order(obs.neuron_scores)[:neurons_removed]
    kept_neurons = complement(gone_n, geom.intermediate)
    position = {int(g): i for i, g in enumerate(kept_kv)}
    head_map = [position[int(h) // geom.group_size] for h in kept_heads]
    return kept_heads, kept_kv, kept_neurons, head_map

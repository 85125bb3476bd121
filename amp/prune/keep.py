"""Keep sets (pure functions): which query heads, KV heads and neurons (a mixture-of-experts layer: experts and
expert neurons) a layer keeps once the lowest-scored structures are removed, and the head map that follows; the
uniform prune's target config."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..arch import ArchSpec, Geometry
from . import criteria, slicing
from . import experts as moe_structures
from .criteria import removal_order
from .observe import Observation


@dataclass(frozen=True)
class Cut:
    """How much one layer gives up: attention structures (KV groups, or query heads), dense MLP neurons, and for
    a mixture-of-experts layer whole experts and the neurons removed from every kept expert."""
    attention: int = 0
    neurons: int = 0
    experts: int = 0
    expert_neurons: int = 0


@dataclass
class Keep:
    """What one layer keeps, as indices into the ORIGINAL layer."""
    heads: torch.Tensor
    kv_heads: torch.Tensor
    head_map: list[int]
    neurons: torch.Tensor | None = None               # a dense MLP's kept neurons
    experts: torch.Tensor | None = None               # a mixture-of-experts layer's kept experts
    expert_neurons: list[torch.Tensor] | None = None  # per kept expert (in the order of `experts`), its neurons

    def shape(self, spec: ArchSpec) -> dict:
        """The layer's entry for a per-layer config: sizes under the family's own config keys, and the map."""
        shape = {"num_attention_heads": len(self.heads), "num_key_value_heads": len(self.kv_heads),
                 "head_map": self.head_map}
        if self.neurons is not None:
            shape["intermediate_size"] = len(self.neurons)
        if self.experts is not None:
            shape[spec.moe.experts_key] = len(self.experts)
            shape[spec.moe.width_key] = len(self.expert_neurons[0])
        return shape


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


def kept_sets(obs: Observation, geom: Geometry, query: bool, cut: Cut, within_kv: torch.Tensor | None = None) -> Keep:
    """What a layer keeps after `cut` removes its lowest-scored structures. `within_kv` (single query heads): the
    KV heads kept are exactly these; the kept query heads are each one's best, then the best of the rest of their
    heads."""
    attention_removed = cut.attention
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
    position = {int(g): i for i, g in enumerate(kept_kv)}
    keep = Keep(kept_heads, kept_kv, [position[int(h) // geom.group_size] for h in kept_heads])
    if obs.is_moe:
        keep.experts, keep.expert_neurons = moe_structures.keep_sets(obs.expert_scores, obs.expert_neuron_scores,
                                                                     cut.experts, cut.expert_neurons)
    else:
        keep.neurons = complement(removal_order(obs.neuron_scores)[:cut.neurons], geom.intermediate)
    return keep

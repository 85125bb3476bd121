"""The budget, counted as the paper counts it, and its uniform split over layers.

`ratio` is a fraction of the WHOLE model's parameters (embeddings and lm_head included, though never pruned).
Every decoder layer loses the same parameter count: whole attention units first (a KV group with its query
heads; a single head in plain multi-head attention), rounded down, and the MLP absorbs the remainder in
neurons, so that every layer loses the same share of its parameters.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field

import torch

from ..arch import ArchSpec, Geometry
from ..common.errors import AmpError


@dataclass(frozen=True)
class UnitParams:
    """Parameters of one decoder layer and of each structure it can lose."""
    layer: int        # every parameter of the layer (norms included)
    query_head: int   # q rows (+bias) and o columns of one query head
    kv_head: int      # k and v rows (+bias) of one KV head
    neuron: int       # input-projection rows (+bias) and down-projection column of one neuron

    def attn_unit(self, geom: Geometry) -> int:
        """A KV group: its query heads plus its KV head (a single head under plain MHA)."""
        return geom.group_size * self.query_head + self.kv_head


def _rows(linear: torch.nn.Linear) -> int:
    """Parameters per output row of a linear layer: its weight row plus its bias entry."""
    return linear.in_features + (1 if linear.bias is not None else 0)


def unit_params(layer: torch.nn.Module, spec: ArchSpec, geom: Geometry, moe: bool = False) -> UnitParams:
    """`moe`: the layer's MLP is a mixture of experts (no dense neuron; experts.moe_units counts experts)."""
    d = geom.head_dim
    o = spec.get(layer, spec.o)
    if spec.qkv:
        q_row = k_row = v_row = _rows(spec.get(layer, spec.qkv))
    else:
        q_row, k_row, v_row = (_rows(spec.get(layer, p)) for p in (spec.q, spec.k, spec.v))
    neuron = 0
    if not moe:
        if spec.gate_up:
            neuron_in = 2 * _rows(spec.get(layer, spec.gate_up))
        else:
            neuron_in = sum(_rows(spec.get(layer, p)) for p in spec.mlp_in)
        neuron = neuron_in + spec.get(layer, spec.down).out_features
    return UnitParams(layer=sum(p.numel() for p in layer.parameters()),
                      query_head=d * q_row + d * o.out_features,
                      kv_head=d * (k_row + v_row),
                      neuron=neuron)


@dataclass(frozen=True)
class Plan:
    target_ratio: float
    total_params: int           # what the ratio counts against: the whole model, or the decoder blocks
    attn_units_removed: int     # KV groups (or single heads under MHA) removed per layer
    neurons_removed: int        # per layer
    params_removed_per_layer: int
    num_layers: int
    ideal_attn_units_removed: int   # before any adjustment for loadability or MLP capacity
    rounding: dict = field(default_factory=dict)  # the width multiples applied (for the report)


def total_params(model: torch.nn.Module) -> int:
    """Unique parameters: tied embeddings count once."""
    return sum(p.numel() for p in model.parameters())


def ratio_for_iteration(model, layers, iteration: int) -> float:
    if iteration >= len(layers):
        raise AmpError(f"--iteration {iteration} would remove every layer's worth ({len(layers)} layers)")
    return iteration * sum(p.numel() for p in layers[0].parameters()) / total_params(model)


def config_accepts(config, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the installed transformers accepts this attention geometry for the model's config class.

    Some versions validate more than the modelling code needs (transformers 5.x's LlamaConfig refuses
    hidden_size % num_attention_heads != 0 even with an explicit head_dim, huggingface/transformers#46082);
    a pruned model must load in plain transformers, so the allocation only picks geometries that pass."""
    values = config.to_dict()
    values.update(num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim)
    try:
        type(config)(**values)
    except Exception:  # noqa: BLE001 - any refusal by the config class means "not loadable"
        return False
    return True


def round_kept(keep: int, total: int, multiple_of: int) -> int:
    """`keep` rounded to the nearest multiple of `multiple_of` (at least one multiple, at most `total`); 1: as is."""
    if multiple_of <= 1:
        return keep
    rounded = max(multiple_of, round(keep / multiple_of) * multiple_of)
    return min(rounded, total)


# llama.cpp quantizes a weight row in blocks: 32 values for Q4_0 .. Q8_0, super-blocks of 256 for the K-quants
# (Q4_K_M's ffn_down). A row length that is not a multiple falls back to a larger type (Q4_K -> Q5_0, Q6_K -> Q8_0)
# or, below 32, to F16: ffn_down's rows are the kept MLP width.
QUANT_BLOCKS = (256, 32, 1)
QUANT_STEPS = 4          # a block is offered to an MLP that holds at least this many of them
BUDGET_TOLERANCE = 0.005  # auto keeps the coarsest block whose budget lands within this share of the parameters


def quant_levels(width: int) -> list[int]:
    """The multiples an MLP of dense `width` may keep its width at under --mlp-multiple-of auto, coarsest first:
    256 (every K-quant keeps the rows), 32 (Q4_0 .. Q8_0 do), 1 (as the budget chose), each where the width holds
    at least QUANT_STEPS of it. The prune keeps the first whose budget still lands (BUDGET_TOLERANCE)."""
    return [block for block in QUANT_BLOCKS if block == 1 or width >= QUANT_STEPS * block]


def lands(freed: int, budget: int, total: int) -> bool:
    """Whether the parameters a rounded allocation frees are within BUDGET_TOLERANCE of the model of the budget."""
    return abs(freed - budget) <= BUDGET_TOLERANCE * total


def width_ok(kept_heads: int, head_dim: int, multiple_of: int) -> bool:
    """Whether the attention's width (kept query heads x head_dim) is a multiple of `multiple_of`."""
    return multiple_of <= 1 or (kept_heads * head_dim) % multiple_of == 0


def blocks_params(layers) -> int:
    return sum(sum(p.numel() for p in layer.parameters()) for layer in layers)


def plan(model: torch.nn.Module, layers, spec: ArchSpec, geom: Geometry, ratio: float, multiple_of: int = 1,
         of_blocks: bool = False, mlp_multiple_of: int = 1) -> Plan:
    """`multiple_of`: kept neurons, and the attention's width, are multiples of it (GEMM shapes that tile well),
    `mlp_multiple_of` kept neurons (quantization blocks); the achieved ratio is then as close as that rounding
    allows. `of_blocks`: the ratio counts against the decoder
    blocks' parameters instead of the whole model's."""
    total = blocks_params(layers) if of_blocks else total_params(model)
    if spec.moe is not None:  # decided per layer by the budget (prune/budget.py), which checks the floors
        per_layer = round(ratio * total / len(layers))
        if ratio * total >= sum(sum(p.numel() for p in layer.parameters()) for layer in layers):
            raise AmpError(f"ratio {ratio} would empty every layer")
        return Plan(target_ratio=ratio, total_params=total, attn_units_removed=0, neurons_removed=0,
                    params_removed_per_layer=per_layer, num_layers=len(layers), ideal_attn_units_removed=0)
    units = unit_params(layers[0], spec, geom)
    per_layer = ratio * total / len(layers)
    share = per_layer / units.layer
    if share >= 1.0:
        raise AmpError(f"ratio {ratio} would empty every layer: decoder layers hold only "
                       f"{len(layers) * units.layer / total:.1%} of the parameters" +
                       ("" if of_blocks else "; --ratio-of blocks counts the ratio against them"))
    attn_unit = units.attn_unit(geom)
    ideal = min(int(share * geom.num_kv_heads), geom.num_kv_heads - 1)
    # Whole attention units first (rounded down), the MLP absorbing the remainder. Where the config class
    # refuses that head count, or the MLP cannot absorb, the nearest workable count is taken instead
    # (fewer removed first).
    candidates = sorted(range(geom.num_kv_heads), key=lambda n: (abs(n - ideal), n > ideal))
    for n_units in candidates:
        neurons = round((per_layer - n_units * attn_unit) / units.neuron)
        if not 0 <= neurons < geom.intermediate:
            continue
        neurons = geom.intermediate - round_kept(geom.intermediate - neurons, geom.intermediate,
                                                 math.lcm(multiple_of, mlp_multiple_of))
        kept_kv = geom.num_kv_heads - n_units
        if not width_ok(kept_kv * geom.group_size, geom.head_dim, multiple_of):
            continue
        if n_units and not config_accepts(model.config, kept_kv * geom.group_size, kept_kv, geom.head_dim):
            continue
        return Plan(target_ratio=ratio, total_params=total, attn_units_removed=n_units, neurons_removed=neurons,
                    params_removed_per_layer=n_units * attn_unit + neurons * units.neuron,
                    num_layers=len(layers), ideal_attn_units_removed=ideal)
    raise AmpError(f"ratio {ratio} would empty the MLP of every layer (the attention cannot give enough "
                   "whole heads); choose a smaller ratio")

"""What a prune keeps of one resident layer: its scores, the means a bias compensation needs, and (for the
sensitivity allocation) how much the layer's output changes when a block loses its lowest-scored structures.

The activation store holds the layer's inputs; `observe_layer` runs every calibration batch through the layer
under the statistics hooks and returns an Observation of H + I floats (plus the curves), so that a two-pass prune
never keeps a layer resident while it decides. With `propagate` (dense statistics, `--no-sequential`) each batch
is replaced by the layer's dense output; a sequential prune (the default) moves the store on itself, to the
PRUNED layer's outputs, after the cut (layer_run.PruneRun.propagate)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..arch import ArchSpec, Geometry
from . import criteria
from . import experts as moe_structures
from . import obs as obs_paths
from .config import MOMENT_CRITERIA
from .criteria import removal_order
from .statistics import TokenMask, statistics_hooks

SENSITIVITY_TOKENS = 4096        # calibration tokens the output-change measurement uses (the first batches)
MLP_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 0.9)
ATTENTION_LEVELS = 8             # at most this many measured counts of attention structures removed


@dataclass
class Observation:
    head_scores: torch.Tensor            # (H,) higher = more important
    neuron_scores: torch.Tensor          # (I,)
    o_mean: torch.Tensor | None = None   # input means of the output / down projections (bias compensation)
    down_mean: torch.Tensor | None = None
    attention_error: dict[int, float] = field(default_factory=dict)   # structures removed -> relative change
    mlp_error: dict[int, float] = field(default_factory=dict)
    o_gram: object = None                # compensate.Gram of the same inputs (a refit; one layer's worth)
    down_gram: object = None
    # a mixture-of-experts layer (neuron_scores is then empty): its experts' scores and routed-token counts
    expert_scores: torch.Tensor | None = None          # (E,)
    expert_neuron_scores: torch.Tensor | None = None   # (E, I)
    expert_tokens: torch.Tensor | None = None          # (E,)
    moe_error: dict[int, float] = field(default_factory=dict)  # position on the removal path -> relative change
    expert_paths: object = None          # experts.ExpertPaths: measured costs of the MoE removal path (obs / kl)
    side: "Observation | None" = None    # another candidate's paths on this layer's Grams (observe_layer side_paths)
    o_target: object = None              # compensate.DenseTarget of a dense-target refit (with the Grams)
    down_target: object = None

    @property
    def is_moe(self) -> bool:
        return self.expert_scores is not None


@contextmanager
def _zeroed_inputs(module: torch.nn.Module, columns: torch.Tensor):
    """A pre-hook that zeroes some input columns of `module` (a structure removed, without slicing)."""
    cols = columns.to(next(module.parameters()).device)

    def hook(_m, args):
        x = args[0].clone()
        x[..., cols] = 0
        return (x, *args[1:])
    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _levels(max_remove: int, count: int) -> list[int]:
    if max_remove <= count:
        return list(range(1, max_remove + 1))
    return sorted({max(1, round(max_remove * (i + 1) / count)) for i in range(count)})


def _relative_change(layer, batches, reference) -> float:
    """||y' - y||^2 / ||y||^2 over valid tokens: the relative change of the residual stream after the layer.
    (Measured on SmolLM2 at 20 %, relative to the layer's own update ||y - x||^2 instead: 215 against 128
    WikiText-2 perplexity; both lose to the depth schedule, see benchmarks/results/quality.md.)"""
    num = den = 0.0
    for (x, args, kwargs, mask), y in zip(batches, reference):
        out = layer(x, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        diff = (out.float() - y).square().sum(-1)
        norm = y.square().sum(-1)
        if mask is not None:
            diff, norm = diff[mask], norm[mask]
        num += float(diff.sum())
        den += float(norm.sum())
    return num / max(den, 1e-30)


def measure_sensitivity(layer, spec: ArchSpec, geom: Geometry, batches, obs: Observation, unit: str,
                        attention_max: int, mlp_max: int, moe: dict | None = None) -> None:
    """Fills obs.attention_error / obs.mlp_error (obs.moe_error): the relative change of the layer's output (over
    the measurement batches: (input, args, kwargs, valid-token mask)) when the attention block loses its k lowest
    query heads (unit "query") or KV groups (unit "group"), or the MLP its k lowest neurons (a mixture of experts:
    the first k moves of its removal path, experts masked out of the router and expert neurons zeroed)."""
    reference = []
    for x, args, kwargs, _ in batches:
        out = layer(x, *args, **kwargs)
        reference.append((out[0] if isinstance(out, tuple) else out).float())
    d = geom.head_dim
    if unit == "group":
        group_order = removal_order(criteria.group_scores(obs.head_scores, geom))
        heads_in = [torch.arange(g * geom.group_size, (g + 1) * geom.group_size) for g in group_order.tolist()]
    else:
        heads_in = [torch.tensor([h]) for h in removal_order(obs.head_scores).tolist()]
    o_proj = spec.get(layer, spec.o)
    for k in _levels(attention_max, ATTENTION_LEVELS):
        heads = torch.cat(heads_in[:k])
        cols = (heads[:, None] * d + torch.arange(d)[None, :]).reshape(-1)
        with _zeroed_inputs(o_proj, cols):
            obs.attention_error[k] = _relative_change(layer, batches, reference)
    if obs.is_moe:
        _measure_moe(layer, spec, geom, batches, reference, obs, moe)
        return
    neurons = removal_order(obs.neuron_scores)
    down = spec.get(layer, spec.down)
    for k in sorted({max(1, min(mlp_max, round(f * geom.intermediate))) for f in MLP_LEVELS}):
        with _zeroed_inputs(down, neurons[:k]):
            obs.mlp_error[k] = _relative_change(layer, batches, reference)


def _measure_moe(layer, spec: ArchSpec, geom: Geometry, batches, reference, obs: Observation, moe: dict) -> None:
    states, _, _ = moe_structures.removal_path(obs.expert_scores, obs.expert_neuron_scores, geom,
                                               moe_structures.moe_units(geom), moe["mode"], moe["min_keep"],
                                               moe.get("multiple_of", 1))
    expert_order = torch.argsort(obs.expert_scores, stable=True)
    neuron_order = torch.argsort(obs.expert_neuron_scores, dim=1, stable=True)
    for k in sorted({max(1, round((len(states) - 1) * f)) for f in MLP_LEVELS} - {0}) if len(states) > 1 else []:
        experts_removed, neurons_removed = states[k]
        zeroed = torch.zeros_like(obs.expert_neuron_scores, dtype=torch.bool)
        zeroed.scatter_(1, neuron_order[:, :neurons_removed], True)
        with moe_structures.masked(layer, spec.moe, moe["config"], expert_order[:experts_removed], zeroed):
            obs.moe_error[k] = _relative_change(layer, batches, reference)


@torch.no_grad()
def observe_layer(layer, spec: ArchSpec, geom: Geometry, config, store, layer_args, masks, hidden_act,
                  generator, token_mask: TokenMask, sensitivity: dict | None = None, gram: bool = False,
                  propagate: bool = True, means: bool = False, moe: bool = False, paths=None,
                  dense_store=None, side_paths=None) -> Observation:
    """Statistics and scores of one resident layer; with `propagate` the store's batches become the layer's
    (dense) outputs (a sequential prune propagates the pruned layer's outputs itself, after the cut).
    `sensitivity`: {"unit", "attention_max", "mlp_max"} to measure output-change curves as well;
    `gram`: the Gram matrices of the output projections' inputs (a refit); `means`: their means (a bias);
    `layer_args(b)`: batch b's (args, kwargs) for this layer, on the device; `moe`: its MLP is a mixture of
    experts (sensitivity then carries "moe": {"mode", "min_keep", "config"} for its removal path);
    `paths` (obs.PathRequest): structured OBS chooses the structures (criterion obs) and/or the blocks' error
    curves are computed from the Gram matrices (the KL allocation); they are dropped after unless `gram`.
    `dense_store`: the DENSE model's inputs of this layer (a dense-target refit, compensate.DenseTarget): each
    batch runs on them first, and the store moves on to the dense outputs.
    `side_paths` (obs.PathRequest, a dense MLP): another candidate's paths and curves on the same Grams, into
    `obs.side` (the kl candidate's, during the paper candidate's pass: prune/candidates.py); along this
    observation's scores unless that request chooses."""
    kept_inputs = []
    stats = None
    if config.needs_calibration:
        tokens = 0
        moments = config.criterion in MOMENT_CRITERIA or means
        # a refit solves with the Grams (fp64); without one they only rank structures (fp32: half the memory,
        # the larger half of what a streamed default prune holds at its peak)
        refit = gram or any(p is not None and p.refit for p in (paths, side_paths))
        grams = gram or paths is not None or side_paths is not None
        with statistics_hooks(layer, spec, geom, token_mask, hidden_act, moments, grams, moe,
                              expert_grams=paths is not None and moe,
                              gram_dtype=torch.float64 if refit else torch.float32,
                              scores=config.criterion != "obs", dense_target=dense_store is not None) as stats:
            for b in range(len(store)):
                token_mask.set(masks[b])
                x = store.get(b)
                args, kwargs = layer_args(b)
                if dense_store is not None:  # its projections' inputs wait for the pruned twin (statistics.py)
                    stats.recording = True
                    out = layer(dense_store.get(b), *args, **kwargs)
                    dense_store.put(b, out[0] if isinstance(out, tuple) else out)
                    stats.recording = False
                if sensitivity is not None and tokens < SENSITIVITY_TOKENS:
                    kept_inputs.append((x.clone(), args, kwargs, masks[b]))
                    tokens += x.shape[0] * x.shape[1] if masks[b] is None else int(masks[b].sum())
                out = layer(x, *args, **kwargs)
                if propagate:
                    store.put(b, out[0] if isinstance(out, tuple) else out)
    chosen = config.criterion == "obs"
    head_s, neuron_s = (None, torch.zeros(0) if moe else None) if chosen else \
        criteria.scores(config.criterion, layer, spec, geom, stats, generator, moe)
    obs = Observation(head_s, neuron_s)
    if side_paths is not None:  # first: its request keeps the Grams for what follows
        given = (None, None) if side_paths.choose else (head_s, neuron_s)
        heads, neurons, attention, mlp = obs_paths.layer_paths(layer, spec, geom, stats, side_paths, *given)
        obs.side = Observation(heads, neurons, attention_error=attention, mlp_error=mlp)
    if paths is not None:
        obs.head_scores, obs.neuron_scores, obs.attention_error, obs.mlp_error = obs_paths.layer_paths(
            layer, spec, geom, stats, paths, head_s, neuron_s)
    if moe:
        given = None if chosen else criteria.expert_scores(config.criterion, layer, spec, stats, generator)
        if paths is not None:
            obs.expert_scores, obs.expert_neuron_scores, obs.expert_paths = obs_paths.expert_paths(
                layer, spec.moe, stats.experts, paths, stats.tokens, given)
        else:
            obs.expert_scores, obs.expert_neuron_scores = given
        n = obs.expert_scores.shape[0]
        obs.expert_tokens = stats.experts.tokens.cpu() if stats is not None else torch.zeros(n, dtype=torch.long)
        if stats is not None:
            stats.experts.grams = None
    if stats is not None and stats.o_moments is not None:
        obs.o_mean, obs.down_mean = stats.o_moments.mean.cpu(), stats.down_moments.mean.cpu()
    if stats is not None and stats.o_gram is not None and gram:
        obs.o_gram, obs.down_gram = stats.o_gram, stats.down_gram
        obs.o_target, obs.down_target = stats.o_target, stats.down_target
    if sensitivity is not None and kept_inputs:
        measure_sensitivity(layer, spec, geom, kept_inputs, obs, sensitivity["unit"], sensitivity["attention_max"],
                            sensitivity["mlp_max"], sensitivity.get("moe"))
    return obs

"""Layer-wise pruning: one decoder layer at a time moves to the device, is calibrated, scored and sliced,
and hands its (dense) outputs to the next layer. The whole model never has to sit on the device."""
from __future__ import annotations

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import allocate, criteria, slicing
from .arch import Geometry, spec_for
from .calibrate import TokenMask, statistics_hooks
from .config import MOMENT_CRITERIA, PruneConfig
from .errors import AmpError
from .profiling import PhaseTimer


class _StopForward(Exception):
    pass


class _InputCatcher(nn.Module):
    """Stands in for the first decoder layer: records its inputs, then stops the forward pass."""

    def __init__(self, layer: nn.Module, store: list):
        super().__init__()
        self.layer = layer
        self.store = store

    def __getattr__(self, name):
        # The model's forward may read layer attributes (e.g. attention_type); answer for the real layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append((hidden_states, args, kwargs))
        raise _StopForward


def decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


def make_batches(samples: list[torch.Tensor], batch_size: int, pad_id: int):
    """Right-padded batches (longest first, to waste little on padding): (input_ids, attention_mask)."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        group = [samples[i] for i in order[start:start + batch_size]]
        width = max(len(s) for s in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, s in enumerate(group):
            ids[row, :len(s)] = s
            mask[row, :len(s)] = 1
        batches.append((ids, mask))
    return batches


@torch.no_grad()
def capture_layer_inputs(model, batches, device: torch.device) -> list:
    """Runs the embeddings (on `device`) and records what the first decoder layer receives per batch."""
    layers = decoder_layers(model)
    host = next(model.parameters()).device
    others = [m for name, m in model.model.named_children() if name != "layers"]
    store: list = []
    first = layers[0]
    layers[0] = _InputCatcher(first, store)
    try:
        for m in others:
            m.to(device)
        for ids, mask in batches:
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        layers[0] = first
        for m in others:
            m.to(host)
    return store


def _complement(kept: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def prune_model(model, config: PruneConfig, calibration: list[torch.Tensor] | None = None,
                pad_id: int = 0, timer: PhaseTimer | None = None, progress: bool = True) -> dict:
    """Prunes `model` in place; returns the per-layer keep sets and the plan (the report's core)."""
    timer = timer or PhaseTimer(config.device)
    spec = spec_for(model)
    geom = Geometry.from_config(model.config)
    layers = decoder_layers(model)
    device = torch.device(config.device)
    host = next(model.parameters()).device
    ratio = config.ratio if config.ratio is not None else allocate.ratio_for_iteration(model, layers, config.iteration)
    the_plan = allocate.plan(model, layers, spec, geom, ratio)
    if config.needs_calibration and not calibration:
        raise AmpError(f"criterion {config.criterion!r} needs calibration data")

    cached, masks = [], []
    n_tokens = 0
    if config.needs_calibration:
        with timer.phase("calibrate"):
            batches = make_batches(calibration, config.batch_size, pad_id)
            for (hidden, args, kwargs), (_, mask) in zip(capture_layer_inputs(model, batches, device), batches):
                kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
                kwargs["use_cache"] = False
                cached.append((hidden, args, kwargs))
                masks.append(None if bool(mask.all()) else mask.bool().to(device))
            n_tokens = sum(int(m.sum()) for _, m in batches)

    moments = config.criterion in MOMENT_CRITERIA
    notes = []
    compensate = config.criterion == "flap" and spec.output_bias != "none"
    if config.criterion == "flap" and not compensate:
        notes.append(f"flap: {type(model).__name__} cannot load an output-projection bias in plain transformers, "
                     "so the bias compensation was skipped (fluctuation metric only)")
    if compensate and spec.output_bias == "config":
        slicing.enable_config_biases(model, spec, layers)
        notes.append("flap: biases enabled (attention_bias, mlp_bias) to hold the compensation; q/k/v and "
                     "gate/up biases are zero")

    keep_kv_n = geom.num_kv_heads - the_plan.attn_units_removed
    keep_heads_n = keep_kv_n * geom.group_size
    keep_neurons_n = geom.intermediate - the_plan.neurons_removed
    generator = torch.Generator().manual_seed(config.seed)
    token_mask = TokenMask()
    hidden_act = getattr(model.config, "hidden_act", None)
    kept = []
    for index, layer in enumerate(tqdm(layers, desc=f"pruning ({config.criterion})", unit="layer",
                                       disable=not progress)):
        try:
            stats = None
            if config.needs_calibration:
                with timer.phase("calibrate"):
                    layer.to(device)
                    with statistics_hooks(layer, spec, geom, token_mask, hidden_act, moments) as stats:
                        for b, (hidden, args, kwargs) in enumerate(cached):
                            token_mask.set(masks[b])
                            cached[b] = (_layer_output(layer(hidden, *args, **kwargs)), args, kwargs)
            with timer.phase("score"):
                head_s, neuron_s = criteria.scores(config.criterion, layer, spec, geom, stats, generator)
                kept_kv = criteria.keep_top(criteria.group_scores(head_s, geom), keep_kv_n)
                kept_heads = slicing.head_rows(kept_kv, geom.group_size)  # query heads of the kept groups
                kept_neurons = criteria.keep_top(neuron_s, keep_neurons_n)
            with timer.phase("slice"):
                if compensate:
                    q_cols = slicing.head_rows(kept_heads, geom.head_dim)
                    slicing.compensate_bias(spec.get(layer, spec.o),
                                            _complement(q_cols, geom.num_heads * geom.head_dim), stats.o_moments.mean)
                    slicing.compensate_bias(spec.get(layer, spec.down), _complement(kept_neurons, geom.intermediate),
                                            stats.down_moments.mean)
                slicing.slice_attention(layer, spec, geom, kept_heads, kept_kv)
                slicing.slice_mlp(layer, spec, geom, kept_neurons)
        finally:
            layer.to(host)  # never leave a layer on the device, errors included
        kept.append({"layer": index, "kept_heads": kept_heads.tolist(), "kept_kv_heads": kept_kv.tolist(),
                     "kept_neurons": kept_neurons.tolist(),
                     "head_scores": [float(f"{float(s):.7g}") for s in head_s]})
    slicing.update_config(model.config, keep_heads_n, keep_kv_n, keep_neurons_n, geom.head_dim)
    return {"plan": the_plan, "layers": kept, "notes": notes, "calibration_tokens": n_tokens, "geometry_before": geom,
            "geometry_after": Geometry.from_config(model.config)}

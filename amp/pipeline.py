"""The prune as one pass over a layer stream: a source yields decoder layers one at a time (from a model in
memory, or lazily from safetensors files), each is calibrated, scored and sliced on the device, and a sink takes
it (back into the model, or into output shards). The calibration activations live in an ActivationStore
(device, host or disk) and carry the DENSE layer outputs from one layer to the next. Uniform allocation depends
only on shapes, so observe and prune fold into this single pass; peak memory is one layer plus the store."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import allocate, criteria, slicing
from .activations import ActivationStore, choose_offload
from .arch import Geometry, spec_for
from .calibrate import TokenMask, statistics_hooks
from .config import MOMENT_CRITERIA, TORCH_DTYPES, PruneConfig
from .errors import AmpError
from .profiling import PhaseTimer
from .stream import resolve_compute_dtype


class _StopForward(Exception):
    pass


class _InputCatcher(nn.Module):
    """Stands in for the first decoder layer: records its inputs, then stops the forward pass."""

    def __init__(self, layer: nn.Module, on_input):
        super().__init__()
        self.layer = layer
        self.on_input = on_input

    def __getattr__(self, name):
        # The model's forward may read layer attributes (e.g. attention_type); answer for the real layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        self.on_input(hidden_states, args, kwargs)
        raise _StopForward


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


def _to(obj, device):
    """Tensors inside nested tuples / lists / dicts moved to `device` (the layer kwargs: masks, rotary tables)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _in_dtype(obj, dtype):
    """Floating tensors inside nested containers cast to `dtype` (float masks, rotary tables)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_in_dtype(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _in_dtype(v, dtype) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer_inputs(source, batches, device: torch.device, dtype: torch.dtype, store: ActivationStore,
                         keep_kwargs_on) -> list:
    """Runs the embeddings (on `device`, in the stored dtype: a float32 copy of a large vocabulary's embedding
    would cost more than a layer) and puts what the first decoder layer receives into `store`, in `dtype`;
    returns each batch's other layer arguments (masks, rotary tables), kept on `keep_kwargs_on`."""
    layers = source.layers
    extras: list = []

    rotary = getattr(source.model.model, "rotary_emb", None)

    def on_input(hidden, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        hidden = hidden.to(dtype)  # the embeddings ran in the stored dtype; the cast up is exact
        if rotary is not None and "position_embeddings" in kwargs and kwargs.get("position_ids") is not None:
            # The rotary tables come out in the embeddings' dtype: recompute them in the compute dtype.
            kwargs["position_embeddings"] = rotary(hidden, kwargs["position_ids"])
        store.put(len(extras), hidden)
        extras.append(_to(_in_dtype((args, kwargs), dtype), keep_kwargs_on))

    first = layers[0]
    layers[0] = _InputCatcher(first, on_input)
    try:
        with source.embeddings(device):
            for ids, mask in batches:
                try:
                    source.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        layers[0] = first
    return extras


def _complement(kept: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


def target_config(config, heads: int, kv_heads: int, neurons: int, head_dim: int, config_biases: bool):
    """The pruned model's config (uniform: one architecture, new sizes)."""
    target = copy.deepcopy(config)
    slicing.update_config(target, heads, kv_heads, neurons, head_dim)
    if config_biases:
        target.attention_bias = True
        target.mlp_bias = True
    return target


def _layer_bytes(layer: nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in layer.parameters()) * torch.empty((), dtype=dtype).element_size()


@torch.no_grad()
def prune_layers(source, sink, config: PruneConfig, calibration: list[torch.Tensor] | None = None,
                 pad_id: int = 0, timer: PhaseTimer | None = None, progress: bool = True, staging=None,
                 probe=None) -> dict:
    """Prunes every layer of `source` into `sink`; returns the keep sets, the plan and how it ran (the report's
    core). `staging`: a folder for disk-offloaded activations; `probe(event)`: called while a layer is
    resident (tests use it to bound memory)."""
    timer = timer or PhaseTimer(config.device)
    model = source.model
    spec = spec_for(model)
    geom = Geometry.from_config(model.config)
    layers = source.layers
    device = torch.device(config.device)
    compute_dtype, dtype_why = resolve_compute_dtype(source.storage_dtype, device,
                                                     TORCH_DTYPES.get(config.compute_dtype))
    ratio = config.ratio if config.ratio is not None else allocate.ratio_for_iteration(model, layers, config.iteration)
    the_plan = allocate.plan(model, layers, spec, geom, ratio)
    if config.needs_calibration and not calibration:
        raise AmpError(f"criterion {config.criterion!r} needs calibration data")

    notes = []
    compensate = config.criterion == "flap" and spec.output_bias != "none"
    if config.criterion == "flap" and not compensate:
        notes.append(f"flap: {type(model).__name__} cannot load an output-projection bias in plain transformers, "
                     "so the bias compensation was skipped (fluctuation metric only)")
    config_biases = compensate and spec.output_bias == "config"
    if config_biases:
        notes.append("flap: biases enabled (attention_bias, mlp_bias) to hold the compensation; q/k/v and "
                     "gate/up biases are zero")

    keep_kv_n = geom.num_kv_heads - the_plan.attn_units_removed
    keep_heads_n = keep_kv_n * geom.group_size
    keep_neurons_n = geom.intermediate - the_plan.neurons_removed
    target = target_config(model.config, keep_heads_n, keep_kv_n, keep_neurons_n, geom.head_dim, config_biases)
    with timer.phase("write"):
        sink.begin(target)

    store, extras, masks, n_tokens, offload = None, [], [], 0, None
    if config.needs_calibration:
        with timer.phase("calibrate"):
            batches = make_batches(calibration, config.batch_size, pad_id)
            shapes = [(ids.shape[0], ids.shape[1], geom.hidden) for ids, _ in batches]
            elt = torch.empty((), dtype=compute_dtype).element_size()
            act_bytes = sum(a * b * c for a, b, c in shapes) * elt
            where, why = choose_offload(config.offload, act_bytes, device, _layer_bytes(layers[0], compute_dtype))
            store = ActivationStore(shapes, compute_dtype, where, device, staging)
            kwargs_home = device if where == "device" else torch.device("cpu")
            extras = capture_layer_inputs(source, batches, device, compute_dtype, store, kwargs_home)
            masks = [None if bool(mask.all()) else mask.bool().to(device) for _, mask in batches]
            n_tokens = sum(int(m.sum()) for _, m in batches)
            offload = {"where": where, "why": why, "activation_bytes": act_bytes}

    moments = config.criterion in MOMENT_CRITERIA
    generator = torch.Generator().manual_seed(config.seed)
    token_mask = TokenMask()
    hidden_act = getattr(model.config, "hidden_act", None)
    kept = []
    try:
        for index in tqdm(range(len(layers)), desc=f"pruning ({config.criterion})", unit="layer",
                          disable=not progress):
            with timer.phase("load"):
                layer = source.load_layer(index, device, compute_dtype)
            try:
                if config_biases:
                    slicing.add_zero_biases(layer, spec)
                if probe:
                    probe("resident")
                stats = None
                if config.needs_calibration:
                    with timer.phase("calibrate"):
                        with statistics_hooks(layer, spec, geom, token_mask, hidden_act, moments) as stats:
                            for b in range(len(store)):
                                token_mask.set(masks[b])
                                args, kwargs = extras[b] if offload["where"] == "device" else _to(extras[b], device)
                                store.put(b, _layer_output(layer(store.get(b), *args, **kwargs)))
                with timer.phase("score"):
                    head_s, neuron_s = criteria.scores(config.criterion, layer, spec, geom, stats, generator)
                    kept_kv = criteria.keep_top(criteria.group_scores(head_s, geom), keep_kv_n)
                    kept_heads = slicing.head_rows(kept_kv, geom.group_size)  # query heads of the kept groups
                    kept_neurons = criteria.keep_top(neuron_s, keep_neurons_n)
                with timer.phase("slice"):
                    if compensate:
                        q_cols = slicing.head_rows(kept_heads, geom.head_dim)
                        slicing.compensate_bias(spec.get(layer, spec.o),
                                                _complement(q_cols, geom.num_heads * geom.head_dim),
                                                stats.o_moments.mean)
                        slicing.compensate_bias(spec.get(layer, spec.down),
                                                _complement(kept_neurons, geom.intermediate), stats.down_moments.mean)
                    slicing.slice_attention(layer, spec, geom, kept_heads, kept_kv)
                    slicing.slice_mlp(layer, spec, geom, kept_neurons)
                with timer.phase("write"):
                    sink.put(index, layer)
                if probe:
                    probe("written")
            finally:
                source.release_layer(index)  # never leave a layer on the device, errors included
            kept.append({"layer": index, "kept_heads": kept_heads.tolist(), "kept_kv_heads": kept_kv.tolist(),
                         "kept_neurons": kept_neurons.tolist(),
                         "head_scores": [float(f"{float(s):.7g}") for s in head_s]})
    finally:
        if store is not None:
            store.close()
    with timer.phase("write"):
        params_after = sink.finish(target)
    return {"plan": the_plan, "layers": kept, "notes": notes, "calibration_tokens": n_tokens,
            "geometry_before": geom, "geometry_after": Geometry.from_config(target), "params_after": params_after,
            "offload": offload, "compute_dtype": str(compute_dtype).replace("torch.", ""), "compute_dtype_why": dtype_why,
            "storage_dtype": str(source.storage_dtype).replace("torch.", "")}

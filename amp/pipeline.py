"""The prune as one pass over a layer stream: a source yields decoder layers one at a time (from a model in
memory, or lazily from safetensors files), each is calibrated, scored and sliced on the device, and a sink takes
it (back into the model, or into output shards). The calibration activations live in an ActivationStore
(device, host or disk) and carry the DENSE layer outputs from one layer to the next. Uniform allocation depends
only on shapes, so observe and prune fold into this single pass; peak memory is one layer plus the store."""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import allocate, compensate, criteria, heterogeneous, slicing
from . import budget as budget_module
from .activations import ActivationStore, choose_offload
from .arch import Geometry, spec_for
from .calibrate import TokenMask
from .config import TORCH_DTYPES, PruneConfig
from .errors import AmpError
from .observe import Observation, observe_layer, removal_order
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
    return [pad_right([samples[i] for i in order[start:start + batch_size]], pad_id)
            for start in range(0, len(order), batch_size)]


def pad_right(group: list[torch.Tensor], pad_id: int):
    """One right-padded batch of 1-D token tensors: (input_ids, attention_mask)."""
    width = max(len(s) for s in group)
    ids = torch.full((len(group), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(group), width), dtype=torch.long)
    for row, s in enumerate(group):
        ids[row, :len(s)] = s
        mask[row, :len(s)] = 1
    return ids, mask


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
    kept_neurons = _complement(gone_n, geom.intermediate)
    position = {int(g): i for i, g in enumerate(kept_kv)}
    head_map = [position[int(h) // geom.group_size] for h in kept_heads]
    return kept_heads, kept_kv, kept_neurons, head_map


@contextmanager
def _pruned_view(layer, spec, config, shape: dict):
    """A sliced layer runs before the model's config knows its sizes (some families read them from the config
    in forward, e.g. Phi-3's fused qkv split): its modules see a per-layer view of the config meanwhile, with
    the index-based attention where the head map is uneven."""
    view = heterogeneous.LayerConfig(config, shape)
    if heterogeneous.is_uneven(shape):
        from .inference import ATTN_INDEXED, register
        register()
        view._attn_implementation = ATTN_INDEXED
    modules = [m for m in (layer, spec.get(layer, spec.attn), spec.get(layer, spec.mlp)) if "config" in m.__dict__]
    saved = [m.__dict__["config"] for m in modules]
    for m in modules:
        m.config = view
    try:
        yield
    finally:
        for m, c in zip(modules, saved):
            m.config = c


class _Run:
    """Everything one prune shares between its passes (so that the passes stay short)."""

    def __init__(self, source, config: PruneConfig, timer: PhaseTimer, progress: bool, probe):
        self.source, self.config, self.timer, self.progress, self.probe = source, config, timer, progress, probe
        self.model = source.model
        self.spec = spec_for(self.model)
        self.geom = Geometry.from_config(self.model.config)
        self.device = torch.device(config.device)
        self.dtype, self.dtype_why = resolve_compute_dtype(source.storage_dtype, self.device,
                                                           TORCH_DTYPES.get(config.compute_dtype))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.token_mask = TokenMask()
        self.store, self.extras, self.masks, self.offload = None, [], [], None
        self.bias = config.bias and self.spec.output_bias != "none"
        if config.bias and not self.bias and config.criterion != "flap":
            raise AmpError(f"--compensate {config.compensate}: {type(self.model).__name__} cannot hold an "
                           "output-projection bias in plain transformers; use --compensate refit")
        self.config_biases = self.bias and self.spec.output_bias == "config"
        self.refit = config.refit  # --compensate auto decides once the calibration set is read (decide_refit)
        self.compensation_errors: list[dict] = []
        self.calibration, self.pad_id, self.staging = None, 0, None

    def to_device(self, extra):
        return extra if self.offload["where"] == "device" else _to(extra, self.device)

    def capture(self, calibration, pad_id: int, staging) -> int:
        """Runs the embeddings over the calibration set into a new activation store (the first layer's input)."""
        self.calibration, self.pad_id, self.staging = calibration, pad_id, staging
        if self.store is not None:
            self.store.close()
        with self.timer.phase("calibrate"):
            batches = make_batches(calibration, self.config.batch_size, pad_id)
            shapes = [(ids.shape[0], ids.shape[1], self.geom.hidden) for ids, _ in batches]
            elt = torch.empty((), dtype=self.dtype).element_size()
            act_bytes = sum(a * b * c for a, b, c in shapes) * elt
            where, why = choose_offload(self.config.offload, act_bytes, self.device,
                                        _layer_bytes(self.source.layers[0], self.dtype))
            self.store = ActivationStore(shapes, self.dtype, where, self.device, staging)
            home = self.device if where == "device" else torch.device("cpu")
            self.extras = capture_layer_inputs(self.source, batches, self.device, self.dtype, self.store, home)
            self.masks = [None if bool(mask.all()) else mask.bool().to(self.device) for _, mask in batches]
            self.offload = {"where": where, "why": why, "activation_bytes": act_bytes}
            return sum(int(m.sum()) for _, m in batches)

    def layers(self, desc: str):
        """Yields (index, resident layer); the layer always goes back (errors included)."""
        for index in tqdm(range(len(self.source.layers)), desc=desc, unit="layer", disable=not self.progress):
            with self.timer.phase("load"):
                layer = self.source.load_layer(index, self.device, self.dtype)
            try:
                if self.config_biases:
                    slicing.add_zero_biases(layer, self.spec)
                if self.probe:
                    self.probe("resident")
                yield index, layer
            finally:
                self.source.release_layer(index)

    def observe(self, layer, sensitivity=None, gram: bool = False, dense: bool = True) -> Observation:
        """Scores (and what compensation needs) of a resident layer. `dense`: the store moves on to the layer's
        dense outputs; a sequential prune passes False and moves it on after the cut (`propagate`)."""
        with self.timer.phase("calibrate"):
            return observe_layer(layer, self.spec, self.geom, self.config, self.store, self.extras, self.masks,
                                 self.to_device, getattr(self.model.config, "hidden_act", None), self.generator,
                                 self.token_mask, sensitivity, gram=gram, propagate=dense,
                                 means=self.bias and not self.refit)  # bias+refit: the Gram's affine fit

    def decide_refit(self, tokens: int) -> str | None:
        """--compensate auto: a refit when every refit projection gets enough calibration tokens per input
        channel, else no compensation; returns the report's note."""
        if not self.config.auto_refit:
            return None
        widest = max(self.geom.intermediate, self.geom.num_heads * self.geom.head_dim)
        per = tokens / widest
        self.refit = per >= compensate.MIN_TOKENS_PER_CHANNEL
        if self.refit:
            return None
        return (f"--compensate auto: no refit, since {tokens} calibration tokens are {per:.1f} per input channel "
                f"of the widest output projection ({widest}), fewer than {compensate.MIN_TOKENS_PER_CHANNEL}; "
                f"a refit needs e.g. --calib c4 --nsamples {math.ceil(compensate.MIN_TOKENS_PER_CHANNEL * widest / self.config.seqlen)}")

    @torch.no_grad()
    def propagate(self, layer, shape: dict) -> None:
        """Sequential calibration: the store takes the PRUNED layer's outputs, the next layer's inputs."""
        with self.timer.phase("calibrate"), _pruned_view(layer, self.spec, self.model.config, shape):
            for b in range(len(self.store)):
                args, kwargs = self.to_device(self.extras[b])
                out = layer(self.store.get(b), *args, **kwargs)
                self.store.put(b, out[0] if isinstance(out, tuple) else out)

    def compensate_layer(self, layer, obs: Observation, kept_heads, kept_neurons) -> dict:
        """Folds what the removed channels carried into the output projections (bias and/or refit), before
        their columns are sliced away; returns the refit's calibration errors."""
        g = self.geom
        q_cols = slicing.head_rows(kept_heads, g.head_dim)
        o_proj, down = self.spec.get(layer, self.spec.o), self.spec.get(layer, self.spec.down)
        if self.refit:
            errors = {}
            for key, linear, gram, kept in (("o", o_proj, obs.o_gram, q_cols), ("down", down, obs.down_gram,
                                                                                  kept_neurons)):
                # a projection that loses nothing is left as it is (a refit would only fit the damping)
                errors[key] = compensate.refit(linear, gram, kept, self.config.damp, self.bias) \
                    if len(kept) < linear.in_features else {"error_before": 0.0, "error_after": 0.0}
            obs.o_gram = obs.down_gram = None  # a Gram matrix is the size of a projection: let it go
            self.compensation_errors.append(errors)
            return {k: {m: round(v, 6) for m, v in e.items()} for k, e in errors.items()}
        if self.bias:
            slicing.compensate_bias(o_proj, _complement(q_cols, g.num_heads * g.head_dim), obs.o_mean)
            slicing.compensate_bias(down, _complement(kept_neurons, g.intermediate), obs.down_mean)
        return {}

    def cut(self, index, layer, obs: Observation, sink, attention_removed: int, neurons_removed: int,
            within_kv=None) -> dict:
        """Compensates and slices one layer, then hands it to the sink. `within_kv`: the KV heads that must stay
        (a sequential re-ranking after a per-layer allocation fixed the shapes)."""
        g = self.geom
        query = self.config.heads == "query"
        kept_heads, kept_kv, kept_neurons, head_map = kept_sets(obs, g, query, attention_removed, neurons_removed,
                                                                within_kv)
        with self.timer.phase("compensate"):
            errors = self.compensate_layer(layer, obs, kept_heads, kept_neurons)
        with self.timer.phase("slice"):
            slicing.slice_attention(layer, self.spec, g, kept_heads, kept_kv, head_map)
            slicing.slice_mlp(layer, self.spec, g, kept_neurons)
        if self.config.sequential:
            self.propagate(layer, {"num_attention_heads": len(kept_heads), "num_key_value_heads": len(kept_kv),
                                   "intermediate_size": len(kept_neurons), "head_map": head_map})
        with self.timer.phase("write"):
            sink.put(index, layer)
        if self.probe:
            self.probe("written")
        return {"layer": index, "kept_heads": kept_heads.tolist(), "kept_kv_heads": kept_kv.tolist(),
                "kept_neurons": kept_neurons.tolist(), "head_map": head_map,
                "head_scores": [float(f"{float(s):.7g}") for s in obs.head_scores],
                **({"compensation": errors} if errors else {})}


@torch.no_grad()
def prune_layers(source, sink, config: PruneConfig, calibration: list[torch.Tensor] | None = None,
                 pad_id: int = 0, timer: PhaseTimer | None = None, progress: bool = True, staging=None,
                 probe=None) -> dict:
    """Prunes every layer of `source` into `sink`; returns the keep sets, the plan and how it ran (the report's
    core). Uniform allocation of whole KV groups is one pass (every shape is known up front); any other
    allocation or single query heads observe every layer first, decide, then prune in a second pass.
    `staging`: a folder for disk-offloaded activations; `probe(event)`: called while a layer is resident."""
    run = _Run(source, config, timer or PhaseTimer(config.device), progress, probe)
    model, geom, spec = run.model, run.geom, run.spec
    layers = source.layers
    ratio = config.ratio if config.ratio is not None else allocate.ratio_for_iteration(model, layers, config.iteration)
    the_plan = allocate.plan(model, layers, spec, geom, ratio)
    if config.needs_calibration and not calibration:
        raise AmpError(f"criterion {config.criterion!r} needs calibration data")
    notes = []
    if config.criterion == "flap" and config.bias and not run.bias:
        notes.append(f"flap: {type(model).__name__} cannot load an output-projection bias in plain transformers, "
                     "so the bias compensation was skipped (fluctuation metric only)")
    if run.config_biases:
        notes.append("bias compensation: biases enabled (attention_bias, mlp_bias) to hold it; q/k/v and "
                     "gate/up biases are zero")
    n_tokens = run.capture(calibration, pad_id, staging) if config.needs_calibration else 0
    note = run.decide_refit(n_tokens)
    if note:
        notes.append(note)
    kept, allocation = [], {"method": "uniform", "heads": "group"}
    try:
        if config.single_pass:
            keep_kv = geom.num_kv_heads - the_plan.attn_units_removed
            target = target_config(model.config, keep_kv * geom.group_size, keep_kv,
                                   geom.intermediate - the_plan.neurons_removed, geom.head_dim, run.config_biases)
            with run.timer.phase("write"):
                sink.begin(target)
            for index, layer in run.layers(f"pruning ({config.criterion})"):
                obs = run.observe(layer, gram=run.refit, dense=not config.sequential)
                kept.append(run.cut(index, layer, obs, sink, the_plan.attn_units_removed, the_plan.neurons_removed))
        else:
            target, kept, allocation = _two_passes(run, sink, the_plan)
    finally:
        if run.store is not None:
            run.store.close()
    with run.timer.phase("write"):
        params_after = sink.finish(target)
    mode = "+".join(m for m, on in (("bias", run.bias), ("refit", run.refit)) if on) or "none"
    comp = compensate.summary(mode, n_tokens, {"o": geom.num_heads * geom.head_dim, "down": geom.intermediate},
                              run.compensation_errors, config.damp)
    comp["sequential"] = config.sequential
    if "warning" in comp:
        notes.append(comp["warning"])
    return {"plan": the_plan, "layers": kept, "notes": notes, "calibration_tokens": n_tokens, "compensation": comp,
            "geometry_before": geom, "geometry_after": Geometry.from_config(target), "params_after": params_after,
            "offload": run.offload, "compute_dtype": str(run.dtype).replace("torch.", ""),
            "compute_dtype_why": run.dtype_why, "storage_dtype": str(source.storage_dtype).replace("torch.", ""),
            "allocation": allocation, "target_config": target}


def _two_passes(run: _Run, sink, the_plan):
    """Observe every layer (scores, and output-change curves for the sensitivity allocation), allocate the
    budget over layers, then read each layer again and cut it."""
    config, geom = run.config, run.geom
    query = config.heads == "query"
    units = allocate.unit_params(run.source.layers[0], run.spec, geom)
    sensitivity = None
    if config.allocation == "sensitivity":
        floor = lambda n: n - max(1, math.ceil(config.min_keep * n - 1e-9))  # noqa: E731
        sensitivity = {"unit": "query" if query and geom.is_gqa else "group",
                       "attention_max": floor(geom.num_heads if query and geom.is_gqa else geom.num_kv_heads),
                       "mlp_max": floor(geom.intermediate)}
    observations = [run.observe(layer, sensitivity) for _, layer in run.layers("observing")]
    budget = the_plan.params_removed_per_layer * len(observations) if config.allocation == "uniform" and not query \
        else round(the_plan.target_ratio * the_plan.total_params)
    removed, inputs = budget_module.allocate(observations, units, geom, config.allocation, query, config.min_keep,
                                            budget, config.depth_range)
    shapes, kept_kv = [], []
    for obs, (a, n) in zip(observations, removed):
        heads, kv, _, head_map = kept_sets(obs, geom, query, a, n)
        kept_kv.append(kv)
        shapes.append({"num_attention_heads": len(heads), "num_key_value_heads": len(kv),
                       "intermediate_size": geom.intermediate - n, "head_map": head_map})
    base = target_config(run.model.config, geom.num_heads, geom.num_kv_heads, geom.intermediate, geom.head_dim,
                         run.config_biases)
    target = heterogeneous.per_layer_config(base, shapes)
    with run.timer.phase("write"):
        sink.begin(target)
    # A refit needs each layer's Gram matrices (too large to keep for every layer), a sequential prune the
    # pruned layers' outputs: both calibrate once more, from the embeddings, while cutting.
    again = config.sequential or run.refit
    if again:
        run.capture(run.calibration, run.pad_id, run.staging)
    kept = []
    for index, layer in run.layers(f"pruning ({config.criterion}, {config.allocation})"):
        obs, within = observations[index], None
        if again:
            fresh = run.observe(layer, gram=run.refit, dense=not config.sequential)
            if config.sequential:  # re-ranked on the pruned prefix's outputs, within the allocated shapes
                obs, within = fresh, (kept_kv[index] if query and geom.is_gqa else None)
            else:
                obs.o_gram, obs.down_gram = fresh.o_gram, fresh.down_gram
        kept.append(run.cut(index, layer, obs, sink, *removed[index], within_kv=within))
        observations[index] = None
    if config.sequential:  # the kept query heads may differ: the maps in config.json follow them
        for shape, entry in zip(shapes, kept):
            shape["head_map"] = entry["head_map"]
        target = heterogeneous.per_layer_config(base, shapes)
    return target, kept, {**inputs, "heads": config.heads}

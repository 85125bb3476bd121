"""One prune's shared state and its per-layer steps (the passes in passes.py are short sequences of these):
capture the calibration inputs into the activation store, stream the layers in and out, observe a resident
layer, decide the refit, compensate and slice it, hand it to the sink, and (sequential calibration) move the
store on to the pruned layer's outputs."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..arch import Geometry, spec_for
from ..common.dtypes import TORCH_DTYPES, resolve_compute_dtype
from ..common.errors import AmpError
from ..common.memory import release_free_memory
from ..common.profiling import PhaseTimer
from ..io.activations import ActivationStore, choose_offload
from ..io.calibration import make_batches
from ..runtime import per_layer
from ..runtime.attention import ATTN_INDEXED, register
from . import compensate, slicing
from . import experts as moe_structures
from .capture import _to, capture_layer_inputs
from .config import PruneConfig
from .keep import Cut, complement, kept_sets
from .obs import PathRequest
from .observe import Observation, observe_layer
from .statistics import TokenMask


def _layer_bytes(layer: nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in layer.parameters()) * torch.empty((), dtype=dtype).element_size()


@contextmanager
def _pruned_view(layer, spec, config, shape: dict):
    """A sliced layer runs before the model's config knows its sizes (some families read them from the config
    in forward, e.g. Phi-3's fused qkv split): its modules see a per-layer view of the config meanwhile, with
    the index-based attention where the head map is uneven."""
    view = per_layer.LayerConfig(config, shape)
    if per_layer.is_uneven(shape):
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


class PruneRun:
    """Everything one prune shares between its passes (so that the passes stay short)."""

    def __init__(self, source, config: PruneConfig, timer: PhaseTimer, progress: bool, probe):
        self.source, self.config, self.timer, self.progress, self.probe = source, config, timer, progress, probe
        self.model = source.model
        self.spec = spec_for(self.model)
        self.geom = Geometry.from_config(self.model.config, self.spec)
        moe = self.spec.moe
        self.moe_layers = [moe is not None and bool(moe.is_sparse(self.model.config, i))
                           for i in range(len(source.layers))]
        self.device = torch.device(config.device)
        self.dtype, self.dtype_why = resolve_compute_dtype(source.storage_dtype, self.device,
                                                           TORCH_DTYPES.get(config.compute_dtype))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.token_mask = TokenMask()
        self.store, self.inputs, self.masks, self.offload = None, None, [], None
        self.bias = config.bias and self.spec.output_bias != "none"
        if config.bias and not self.bias and config.criterion != "flap":
            raise AmpError(f"--compensate {config.compensate}: {type(self.model).__name__} cannot hold an "
                           "output-projection bias in plain transformers; use --compensate refit")
        self.config_biases = self.bias and self.spec.output_bias == "config"
        self.refit = config.refit  # --compensate auto decides once the calibration set is read (decide_refit)
        self.compensation_errors: list[dict] = []
        self.calibration, self.pad_id, self.staging = None, 0, None
        self.fisher = None  # per layer fisher.LayerFisher (the KL allocation)
        self.held = None    # fisher.HeldOut: the held-back windows, moved on through every pruned layer
        self.passes = PhaseTimer(config.device)  # time and peak memory per pass (the report's memory.passes)
        self.kept_state: dict = {}  # what the two-pass prune keeps of every layer until the solve (bytes)
        self.dense_store = None     # a dense-target refit: the dense model's layer inputs (start_dense_target)

    def layer_args(self, index: int):
        """batch -> (args, kwargs) that layer `index` receives (its own mask and rotary tables), on the device."""
        def args_of(b: int):
            extra = self.inputs.get(b, index)
            return extra if self.offload["where"] == "device" else _to(extra, self.device)
        return args_of

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
            self.inputs = capture_layer_inputs(self.source, batches, self.device, self.dtype, self.store, home)
            self.masks = [None if bool(mask.all()) else mask.bool().to(self.device) for _, mask in batches]
            self.offload = {"where": where, "why": why, "activation_bytes": act_bytes}
            return sum(int(m.sum()) for _, m in batches)

    def layers(self, desc: str, reverse: bool = False):
        """Yields (index, resident layer), last first with `reverse`; the layer always goes back (errors
        included)."""
        order = range(len(self.source.layers))
        for index in tqdm(reversed(order) if reverse else order, total=len(order), desc=desc, unit="layer",
                          disable=not self.progress):
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
                release_free_memory()  # the layer's temporaries go back to the system, not to the next layer

    def path_request(self, index: int, cut: Cut | None = None, within=None, keep_gram: bool = False,
                     config: PruneConfig | None = None) -> PathRequest | None:
        """What the Gram-based paths of layer `index` must give (obs criterion, kl allocation): up to the cut, or
        to the per-layer floor when the allocation is still to be decided; `within`: the KV groups that stay;
        `keep_gram`: a refit follows, so the Grams wait in the staging folder while the paths run; `config`:
        another candidate's (its criterion, heads and floor; default this run's)."""
        config = config or self.config
        if not config.paths:
            return None
        g, query = self.geom, config.heads == "query"
        floor = lambda n: n - max(1, math.ceil(config.min_keep * n - 1e-9))  # noqa: E731
        attention_units = g.num_heads if query and g.is_gqa else g.num_kv_heads
        attention = floor(attention_units) if cut is None else cut.attention
        neurons = 0 if self.moe_layers[index] else (floor(g.intermediate) if cut is None else cut.neurons)
        return PathRequest(choose=config.criterion == "obs", query=query, attention=attention, neurons=neurons,
                           refit=self.refit, damp=config.damp, bias=self.bias and self.refit,
                           fisher=self.fisher[index] if self.fisher is not None else None,
                           within_kv=within if query and g.is_gqa else None, keep_gram=keep_gram,
                           staging=self.staging)

    @property
    def dense_target(self) -> bool:
        """Whether the refit is fitted to the dense model's output (--refit-target dense, sequential statistics, a
        refit, no bias): start_dense_target keeps a dense store then, and the report says so."""
        return self.config.refit_target == "dense" and self.config.sequential and self.refit and not self.bias

    def start_dense_target(self) -> None:
        """A dense-target refit (--refit-target dense with sequential statistics and a refit): a second store
        holds the DENSE model's inputs of each layer, copied from the freshly captured embeddings; observe moves
        it on through each dense layer beside the pruned one."""
        if self.dense_store is not None:
            self.dense_store.close()
        self.dense_store = None
        if not self.dense_target:
            return
        shapes = [tuple(self.store.get(b).shape) for b in range(len(self.store))]
        self.dense_store = ActivationStore(shapes, self.dtype, self.offload["where"], self.device, self.staging)
        for b in range(len(self.store)):
            self.dense_store.put(b, self.store.get(b))

    def observe(self, index: int, layer, sensitivity=None, gram: bool = False, dense: bool = True,
                paths: bool = False, cut: Cut | None = None, within=None, side: PruneConfig | None = None
                ) -> Observation:
        """Scores (and what compensation needs) of resident layer `index`. `dense`: the store moves on to the
        layer's dense outputs; a sequential prune passes False and moves it on after the cut (`propagate`).
        `paths`: observe through the Gram-based paths (obs, kl) up to `cut` (default: to the floor), keeping the
        KV groups `within`. `side`: another candidate's config, whose paths to the floor (with this run's Fisher)
        are taken on the same Grams into the observation's `side` (candidates.py)."""
        if sensitivity is not None and self.moe_layers[index]:
            sensitivity = {**sensitivity, "moe": {"mode": self.config.moe, "min_keep": self.config.min_keep,
                                                  "config": self.model.config,
                                                  "multiple_of": self.config.mlp_multiple(
                                                      self.geom.expert_intermediate, self.config.width_levels[-1])}}
        if self.moe_layers[index] and not self.config.needs_calibration:  # data-free: still the fused layout
            from .experts import check_fused
            check_fused(layer, self.spec.moe)
        with self.timer.phase("calibrate"):
            return observe_layer(layer, self.spec, self.geom, self.config, self.store, self.layer_args(index),
                                 self.masks, getattr(self.model.config, self.spec.act_key, None), self.generator,
                                 self.token_mask, sensitivity, gram=gram, propagate=dense,
                                 means=self.bias and not self.refit,  # bias+refit: the Gram's affine fit
                                 moe=self.moe_layers[index],
                                 paths=self.path_request(index, cut, within, keep_gram=gram) if paths else None,
                                 dense_store=self.dense_store if gram and not self.moe_layers[index] else None,
                                 side_paths=None if side is None else self.path_request(index, keep_gram=gram,
                                                                                        config=side))

    def decide_refit(self, tokens: int) -> str | None:
        """--compensate auto: a refit when every refit projection gets enough calibration tokens per input
        channel, else no compensation; returns the report's note."""
        if not self.config.auto_refit:
            return None
        dense_mlp = not all(self.moe_layers)  # experts are not refit (see compensate_layer)
        widest = max(self.geom.intermediate if dense_mlp else 0, self.geom.num_heads * self.geom.head_dim)
        per = tokens / widest
        self.refit = per >= compensate.MIN_TOKENS_PER_CHANNEL
        if self.refit:
            return None
        return (f"--compensate auto: no refit, since {tokens} calibration tokens are {per:.1f} per input channel "
                f"of the widest output projection ({widest}), fewer than {compensate.MIN_TOKENS_PER_CHANNEL}; "
                f"a refit needs e.g. --calib c4 --nsamples {math.ceil(compensate.MIN_TOKENS_PER_CHANNEL * widest / self.config.seqlen)}")

    @torch.no_grad()
    def propagate(self, index: int, layer, shape: dict) -> None:
        """Sequential calibration: the store takes the PRUNED layer's outputs, the next layer's inputs."""
        args_of = self.layer_args(index)
        with self.timer.phase("calibrate"), _pruned_view(layer, self.spec, self.model.config, shape):
            for b in range(len(self.store)):
                args, kwargs = args_of(b)
                out = layer(self.store.get(b), *args, **kwargs)
                self.store.put(b, out[0] if isinstance(out, tuple) else out)

    def compensate_layer(self, layer, obs: Observation, kept_heads, kept_neurons) -> dict:
        """Folds what the removed channels carried into the output projections (bias and/or refit), before
        their columns are sliced away; returns the refit's calibration errors. A mixture-of-experts layer has its
        o_proj refit; its experts are not (each expert sees a fraction of the calibration tokens, far fewer per
        channel than a refit needs, and its Gram matrices would be experts x width^2)."""
        g = self.geom
        q_cols = slicing.head_rows(kept_heads, g.head_dim)
        o_proj = self.spec.get(layer, self.spec.o)
        down = None if obs.is_moe else self.spec.get(layer, self.spec.down)
        if self.refit:
            errors = {}
            parts = [("o", o_proj, obs.o_gram, q_cols)] + ([] if obs.is_moe else [("down", down, obs.down_gram,
                                                                                    kept_neurons)])
            targets = {"o": obs.o_target, "down": obs.down_target}
            for key, linear, gram, kept in parts:
                # a projection that loses nothing is left as it is (a refit would only fit the damping), unless
                # it is fitted to the dense model's output (which it does not write yet)
                if len(kept) < linear.in_features or targets[key] is not None:
                    errors[key] = compensate.refit(linear, gram, kept, self.config.damp, self.bias, targets[key])
                else:
                    errors[key] = {"error_before": 0.0, "error_after": 0.0}
            obs.o_gram = obs.down_gram = obs.o_target = obs.down_target = None  # projection-sized: let go
            self.compensation_errors.append(errors)
            return {k: {m: round(v, 6) for m, v in e.items()} for k, e in errors.items()}
        if self.bias:
            slicing.compensate_bias(o_proj, complement(q_cols, g.num_heads * g.head_dim), obs.o_mean)
            if down is not None:
                slicing.compensate_bias(down, complement(kept_neurons, g.intermediate), obs.down_mean)
        return {}

    def cut(self, index, layer, obs: Observation, sink, cut: Cut, within_kv=None) -> dict:
        """Compensates and slices one layer, then hands it to the sink. `within_kv`: the KV heads that must stay
        (a sequential re-ranking after a per-layer allocation fixed the shapes)."""
        g = self.geom
        keep = kept_sets(obs, g, self.config.heads == "query", cut, within_kv)
        with self.timer.phase("compensate"):
            errors = self.compensate_layer(layer, obs, keep.heads, keep.neurons)
        with self.timer.phase("slice"):
            slicing.slice_attention(layer, self.spec, g, keep.heads, keep.kv_heads, keep.head_map)
            if obs.is_moe:
                moe_structures.slice_experts(layer, self.spec.moe, keep.experts, keep.expert_neurons)
            else:
                slicing.slice_mlp(layer, self.spec, g, keep.neurons)
        if self.config.sequential:
            self.propagate(index, layer, keep.shape(self.spec))
        if self.held is not None:  # the held-back windows follow the pruned model (its divergence is measured)
            with self.timer.phase("calibrate"), _pruned_view(layer, self.spec, self.model.config, keep.shape(self.spec)):
                self.held.run_layer(index, layer)
        with self.timer.phase("write"):
            sink.put(index, layer)
        if self.probe:
            self.probe("written")
        entry = {"layer": index, "kept_heads": keep.heads.tolist(), "kept_kv_heads": keep.kv_heads.tolist()}
        if obs.is_moe:
            entry.update(kept_experts=keep.experts.tolist(),
                         kept_expert_neurons=[n.tolist() for n in keep.expert_neurons],
                         expert_tokens=obs.expert_tokens.tolist(),
                         expert_scores=[float(f"{float(s):.7g}") for s in obs.expert_scores])
        else:
            entry["kept_neurons"] = keep.neurons.tolist()
        entry.update(head_map=keep.head_map, head_scores=[float(f"{float(s):.7g}") for s in obs.head_scores],
                     **({"compensation": errors} if errors else {}))
        return entry

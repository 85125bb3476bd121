"""The prune as passes over a layer stream (../shared/DESIGN.md): a source yields decoder layers one at a time
(from a model in memory, or lazily from safetensors files), each is calibrated, scored and sliced on the device,
and a sink takes it (back into the model, or into output shards).

Uniform allocation of whole KV groups depends only on shapes, so observe and prune fold into one pass. Any other
allocation, or single query heads, is two passes: observe every layer (H + I scores, and the output-change curves
for the sensitivity allocation), solve the budget, then read each layer again and cut it. By default calibration
is sequential: the activation store carries each PRUNED layer's outputs to the next layer (`--no-sequential`:
the dense outputs, as the paper does). Peak memory is one layer plus the store, on the device and the host."""
from __future__ import annotations

import math
import sys
from dataclasses import replace

import torch

from ..arch import Geometry
from ..common.dtypes import dtype_name
from ..common.errors import AmpError
from ..common.profiling import PhaseTimer
from ..runtime import per_layer
from . import allocate, compensate
from . import budget as budget_module
from .config import PruneConfig
from .fisher import HeldOut, fisher_pass
from .keep import Cut, kept_sets, target_config
from .layer_run import PruneRun


@torch.no_grad()
def prune_layers(source, sink, config: PruneConfig, calibration: list[torch.Tensor] | None = None,
                 pad_id: int = 0, timer: PhaseTimer | None = None, progress: bool = True, staging=None,
                 probe=None, held_out: list[torch.Tensor] | None = None, measure: bool = False,
                 dense_final: list[torch.Tensor] | None = None, side: PruneConfig | None = None,
                 observed: tuple | None = None) -> dict:
    """Prunes every layer of `source` into `sink`; returns the keep sets, the plan and how it ran (the report's
    core). Uniform allocation of whole KV groups is one pass (every shape is known up front); any other
    allocation or single query heads observe every layer first, decide, then prune in a second pass.
    `staging`: a folder for disk-offloaded activations; `probe(event)`: called while a layer is resident;
    `held_out`: the windows the KL allocation measures on (default: the last --holdout calibration samples);
    `measure`: measure the held-out divergence whatever the allocation (a candidate of --allocation auto), against
    `dense_final` (the dense model's last hidden states there, from an earlier candidate) when given.
    `side`: another candidate's config (the kl candidate of --allocation auto, candidates.py) whose Fisher pass
    and error curves ride on this one-pass prune, on its Grams: the result's `observed` then holds them (and its
    `dense_final` the dense states); `observed`: such a result, given to that candidate, which then skips its
    own Fisher and observing passes."""
    run = PruneRun(source, config, timer or PhaseTimer(config.device), progress, probe)
    model, geom, spec = run.model, run.geom, run.spec
    layers = source.layers
    outside = allocate.total_params(model) - allocate.blocks_params(layers)  # never pruned (embeddings, head)
    ratio = config.ratio if config.ratio is not None else allocate.ratio_for_iteration(model, layers, config.iteration)
    the_plan = _plan(model, layers, spec, geom, ratio, config)
    if config.needs_calibration and not calibration:
        raise AmpError(f"criterion {config.criterion!r} needs calibration data")
    if (config.allocation == "kl" or measure) and not held_out:
        if len(calibration) <= config.holdout:
            raise AmpError(f"the kl allocation holds back {config.holdout} calibration samples (--holdout) to measure "
                           f"on, and {len(calibration)} were given; give more samples or a smaller --holdout")
        calibration, held_out = calibration[:-config.holdout], calibration[-config.holdout:]
    notes = []
    if config.criterion == "flap" and config.bias and not run.bias:
        notes.append(f"flap: {type(model).__name__} cannot load an output-projection bias in plain transformers, "
                     "so the bias compensation was skipped (fluctuation metric only)")
    if run.config_biases:
        notes.append("bias compensation: biases enabled (attention_bias, mlp_bias) to hold it; q/k/v and "
                     "gate/up biases are zero")
    with run.passes.phase("calibration"):
        n_tokens = run.capture(calibration, pad_id, staging) if config.needs_calibration else 0
    note = run.decide_refit(n_tokens)
    if note:
        notes.append(note)
    kept, allocation = [], {"method": "uniform", "heads": "group", **the_plan.rounding}
    try:
        if side is not None:  # the other candidate's Fisher pass, which keeps the dense states here as well
            if not (config.single_pass and spec.moe is None and measure):
                raise AmpError("internal: another candidate's curves ride on a measured one-pass prune only")
            run.held = HeldOut(run, held_out)
            with run.passes.phase("fisher"):
                _yardstick(run, side)
            dense_final = run.held.dense_final
        elif measure and config.allocation != "kl":  # the kl allocation's Fisher pass keeps the dense states
            with run.passes.phase("divergence"):
                run.held = HeldOut(run, held_out)
                if dense_final is None:
                    dense_final = run.held.dense_pass()
                run.held.dense_final = dense_final
        side_observations, held_final, first = [], None, None
        if config.single_pass and spec.moe is None:  # a MoE layer's shape depends on its scores: two passes
            keep_kv = geom.num_kv_heads - the_plan.attn_units_removed
            target = target_config(model.config, keep_kv * geom.group_size, keep_kv,
                                   geom.intermediate - the_plan.neurons_removed, geom.head_dim, run.config_biases)
            with run.timer.phase("write"):
                sink.begin(target)
            with run.passes.phase("cut" if side is None else "cut + curves"):
                if run.held is not None:
                    run.held.capture()
                run.start_dense_target()
                for index, layer in run.layers(f"pruning ({config.criterion})"):
                    cut = Cut(the_plan.attn_units_removed, the_plan.neurons_removed)
                    obs = run.observe(index, layer, gram=run.refit, dense=not config.sequential,
                                      paths=config.criterion == "obs", cut=cut, side=side)
                    if side is not None:
                        side_observations.append(obs.side)
                        obs.side = None
                    kept.append(run.cut(index, layer, obs, sink, cut))
            if side is not None:  # measured beside the other candidate's, on the same dense logits
                held_final = run.held.final()
            elif run.held is not None:
                allocation["heldout_kl"] = _divergence(run, {})
        else:
            target, kept, allocation = _two_passes(run, sink, the_plan, held_out, dense_final, observed)
            if observed is not None:  # the first candidate's divergence, beside this one's
                allocation["heldout_kl"], first = _divergence(run, allocation, observed[2])
        dense_final = run.held.dense_final if run.held is not None else None
    finally:
        if run.store is not None:
            run.store.close()
        if run.dense_store is not None:
            run.dense_store.close()
        if run.held is not None:
            run.held.close()
    with run.timer.phase("write"):
        params_after = sink.finish(target)
    mode = "+".join(m for m, on in (("bias", run.bias), ("refit", run.refit)) if on) or "none"
    widths = {"o": geom.num_heads * geom.head_dim}
    if not all(run.moe_layers):
        widths["down"] = geom.intermediate
    comp = compensate.summary(mode, n_tokens, widths, run.compensation_errors, config.damp)
    if spec.moe is not None and mode != "none":
        comp["experts"] = "not compensated: each expert sees a fraction of the calibration tokens (see the report's " \
                          "expert_tokens), far fewer per channel than a refit needs"
    comp["sequential"] = config.sequential
    if "refit" in mode:
        comp["target"] = "dense model's output" if run.dense_target else \
            "this layer's dense output on the pruned model's input"
    if "warning" in comp:
        notes.append(comp["warning"])
    return {"plan": the_plan, "layers": kept, "notes": notes, "calibration_tokens": n_tokens, "compensation": comp,
            "geometry_before": geom, "geometry_after": Geometry.from_config(target, spec), "params_after": params_after,
            "outside_params": outside,
            "offload": run.offload, "compute_dtype": dtype_name(run.dtype),
            "compute_dtype_why": run.dtype_why, "storage_dtype": dtype_name(source.storage_dtype),
            "allocation": allocation, "target_config": target, "dense_final": dense_final,
            "observed": (side_observations, run.fisher, held_final) if side is not None else None,
            "first_heldout_kl": first,
            "memory": {"passes": run.passes.report(), **run.kept_state}}


def _yardstick(run: PruneRun, config: PruneConfig) -> None:
    """The KL allocation's Fisher (run.fisher), taken on the last --holdout calibration windows, never on the
    held-back ones: the allocation is fitted to the windows its Fisher saw, so a divergence measured there would
    favour it in --allocation auto's choice. The held-back windows (run.held) go through the same forward pass,
    dense, for the divergence after the prune."""
    yardstick = HeldOut(run, run.calibration[-config.holdout:])
    try:
        run.fisher = fisher_pass(run, yardstick, config.seed, measured=run.held)
    finally:
        yardstick.close()


def _two_passes(run: PruneRun, sink, the_plan, held_out=None, dense_final=None, observed=None):
    """Observe every layer (scores, and output-change curves for the sensitivity allocation, or Gram-based error
    curves weighted by the output Fisher for the KL allocation), allocate the budget over layers, then read each
    layer again and cut it. `observed`: the (observations, Fisher) another candidate's pass took for this one
    (prune_layers' `side`), with the dense states on the held-back windows in `dense_final`."""
    config, geom = run.config, run.geom
    query = config.heads == "query"
    layers = run.source.layers
    dense = [i for i, moe in enumerate(run.moe_layers) if not moe]
    units = allocate.unit_params(layers[dense[0] if dense else 0], run.spec, geom, moe=not dense)
    layer_params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    sensitivity = None
    if config.allocation == "sensitivity":
        floor = lambda n: n - max(1, math.ceil(config.min_keep * n - 1e-9))  # noqa: E731
        sensitivity = {"unit": "query" if query and geom.is_gqa else "group",
                       "attention_max": floor(geom.num_heads if query and geom.is_gqa else geom.num_kv_heads),
                       "mlp_max": floor(geom.intermediate)}
    if observed is not None:
        observations, run.fisher, _ = observed
        run.held = HeldOut(run, held_out)
        run.held.dense_final = dense_final
    else:
        if config.allocation == "kl":  # the yardstick first: two reads of every layer over calibration windows
            run.held = HeldOut(run, held_out)
            with run.passes.phase("fisher"):
                _yardstick(run, config)
        with run.passes.phase("curves"):
            observations = [run.observe(index, layer, sensitivity, paths=config.paths)
                            for index, layer in run.layers("observing")]
    run.kept_state = kept_state(observations, run.fisher)
    uniform_groups = config.allocation == "uniform" and not query and run.spec.moe is None
    budget = the_plan.params_removed_per_layer * len(observations) if uniform_groups \
        else round(the_plan.target_ratio * the_plan.total_params)
    with run.passes.phase("solve"):
        removed, inputs = _solve(run, observations, units, query, budget, layer_params, the_plan.total_params)
    if run.spec.moe is not None:
        inputs["moe"] = config.moe
    shapes, kept_kv = [], []
    for obs, cut in zip(observations, removed):
        keep = kept_sets(obs, geom, query, cut)
        kept_kv.append(keep.kv_heads)
        shapes.append(keep.shape(run.spec))
    base = target_config(run.model.config, geom.num_heads, geom.num_kv_heads, geom.intermediate, geom.head_dim,
                         run.config_biases)
    target = per_layer.per_layer_config(base, shapes)
    with run.timer.phase("write"):
        sink.begin(target)
    # A refit needs each layer's Gram matrices (too large to keep for every layer), a sequential prune the
    # pruned layers' outputs: both calibrate once more, from the embeddings, while cutting.
    again = config.sequential or run.refit
    with run.passes.phase("cut"):
        if again:
            run.capture(run.calibration, run.pad_id, run.staging)
            run.start_dense_target()
        if run.held is not None:
            run.held.capture()
        kept = [_cut_one(run, index, layer, observations, removed, kept_kv, again, sink)
                for index, layer in run.layers(f"pruning ({config.criterion}, {config.allocation})")]
    if config.sequential:  # the kept query heads may differ: the maps in config.json follow them
        for shape, entry in zip(shapes, kept):
            shape["head_map"] = entry["head_map"]
        target = per_layer.per_layer_config(base, shapes)
    if run.held is not None and observed is None:  # else prune_layers measures it beside the first candidate's
        inputs["heldout_kl"] = _divergence(run, inputs)
    return target, kept, {**inputs, "heads": config.heads}


def _divergence(run: PruneRun, inputs: dict, first=None):
    """The pruned model's KL from the dense one over the held-back windows (and what the allocation predicted);
    with `first` (another candidate's last hidden states there): (this one's, that one's), on the same dense
    logits."""
    with run.timer.phase("calibrate"), run.passes.phase("divergence"):
        measured = run.held.kl(() if first is None else (first,))
    entries = [{"measured": float(f"{kl:.4g}"), "predicted": inputs.get("predicted_kl_total") if i == 0 else None,
                "samples": len(run.held.samples), "tokens": run.held.tokens} for i, kl in enumerate(measured)]
    return entries[0] if first is None else tuple(entries)


def _cut_one(run: PruneRun, index: int, layer, observations: list, removed: list, kept_kv: list, again: bool,
             sink) -> dict:
    """The second pass on one resident layer: calibrated again where needed (a refit's Grams; a sequential prune
    re-ranks on the pruned prefix's outputs, within the allocated shapes), then cut; its observation goes."""
    config, geom = run.config, run.geom
    query = config.heads == "query"
    obs, within = observations[index], None
    if again:
        fresh = run.observe(index, layer, gram=run.refit, dense=not config.sequential,
                            paths=config.criterion == "obs" and config.sequential, cut=removed[index],
                            within=kept_kv[index])
        if config.sequential:
            obs, within = fresh, (kept_kv[index] if query and geom.is_gqa else None)
        else:
            obs.o_gram, obs.down_gram = fresh.o_gram, fresh.down_gram
    entry = run.cut(index, layer, obs, sink, removed[index], within_kv=within)
    observations[index] = None
    return entry


def _plan(model, layers, spec, geom, ratio: float, config: PruneConfig):
    """The uniform plan at the coarsest MLP width multiple whose budget lands (--mlp-multiple-of auto); what was
    applied goes into the plan's `rounding`."""
    for level in config.width_levels:
        last = level == config.width_levels[-1]
        try:
            the_plan = allocate.plan(model, layers, spec, geom, ratio, config.multiple_of,
                                     of_blocks=config.ratio_of == "blocks",
                                     mlp_multiple_of=config.mlp_multiple(geom.intermediate, level))
        except AmpError:
            if last:
                raise
            continue
        freed = the_plan.params_removed_per_layer * the_plan.num_layers
        if allocate.lands(freed, round(ratio * the_plan.total_params), the_plan.total_params) or last or \
                spec.moe is not None:  # a MoE model's budget is decided per layer (_solve)
            return replace(the_plan, rounding=rounding(config, level, geom))


def _solve(run: PruneRun, observations, units, query: bool, budget: int, layer_params, total: int):
    """The budget allocation at the coarsest MLP (and expert) width multiple whose freed parameters land within
    allocate.BUDGET_TOLERANCE of the budget; the finest level whatever it frees. Under the sensitivity allocation
    a MoE layer's measured curve follows the finest expert path, so the experts stay at that level."""
    config, geom = run.config, run.geom
    levels = config.width_levels
    for level in levels:
        expert_level = levels[-1] if config.allocation == "sensitivity" else level
        removed, inputs = budget_module.allocate(
            observations, units, geom, config.allocation, query, config.min_keep, budget, config.depth_range,
            layer_params, config.moe, config.multiple_of, config.mlp_multiple(geom.intermediate, level),
            config.mlp_multiple(geom.expert_intermediate, expert_level))
        if allocate.lands(inputs["freed_params"], budget, total) or level == levels[-1]:
            inputs.update(rounding(config, level, geom, expert_level))
            return removed, inputs


def rounding(config: PruneConfig, level: int, geom, expert_level: int | None = None) -> dict:
    """The multiples the widths were rounded to, for the report (those above 1), and a note when auto had to
    fall back from its coarsest level."""
    out = {"multiple_of": config.multiple_of, "mlp_multiple_of": config.mlp_multiple(geom.intermediate, level)}
    if geom.is_moe:
        out["expert_multiple_of"] = config.mlp_multiple(geom.expert_intermediate,
                                                        level if expert_level is None else expert_level)
    out = {k: v for k, v in out.items() if v > 1}
    if level != config.width_levels[0]:
        out["width_note"] = (f"MLP widths rounded to multiples of {out.get('mlp_multiple_of', 1)}: a coarser multiple "
                             f"would have missed the budget by more than {allocate.BUDGET_TOLERANCE:.1%} of the "
                             "parameters")
    return out


def kept_state(observations: list, fisher: list | None) -> dict:
    """What the two-pass prune keeps of every layer from the moment the layer leaves until the budget is solved:
    scores, error curves (a few hundred points per block) and the Fisher vectors, in bytes (tensors by their
    storage, curves as the Python dicts they are). Grams and inverses are never among them."""
    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sys.getsizeof(value) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in value.items())
        if hasattr(value, "__dict__"):
            return sum(size(v) for v in vars(value).values())
        return 0
    per_layer = [size(o) + (size(fisher[i]) if fisher is not None else 0) for i, o in enumerate(observations)]
    return {"kept_bytes": sum(per_layer), "kept_bytes_per_layer": max(per_layer, default=0)}

"""The prune's report (amp_report.json's core): what was asked and achieved, how it ran, and every layer's keep
sets (indices into the ORIGINAL layer), with the notes a user should read."""
from __future__ import annotations

from ..io.calibration import Calibration
from ..runtime import per_layer
from . import allocate
from . import experts as moe_structures
from .config import DATA_FREE, PruneConfig

KL_PAYS_FROM = 0.3  # measured: the kl allocation's gain over uniform is small at 10 and 20 %, large at 30 %


def prune_report(source, sink, config: PruneConfig, calibration, result: dict, before: int, timer) -> dict:
    """`result`: what passes.prune_layers returned; `before`: the parameters of the dense model."""
    samples = calibration.samples if isinstance(calibration, Calibration) else calibration
    after = result["params_after"]
    plan, g0, g1 = result["plan"], result["geometry_before"], result["geometry_after"]
    varies = "per layer" if per_layer.entries(result["target_config"]) else None
    blocks = blocks_summary(source, result, before, after)
    report = {
        "model_class": type(source.model).__name__,
        "criterion": config.criterion,
        "ratio_target": plan.target_ratio,
        "ratio_of": config.ratio_of,
        "ratio_achieved": (before - after) / before,
        "blocks": blocks,
        "iteration": config.iteration,
        "params_before": before,
        "params_after": after,
        "per_layer": {
            "heads": [g0.num_heads, varies or g1.num_heads], "kv_heads": [g0.num_kv_heads, varies or g1.num_kv_heads],
            "neurons": [g0.intermediate, varies or g1.intermediate], "head_dim": g0.head_dim,
            "attention_unit": "kv_group" if g0.is_gqa else "head",
            "attention_units_removed": plan.attn_units_removed,
            "attention_units_removed_ideal": plan.ideal_attn_units_removed,
            "params_removed": plan.params_removed_per_layer,
        },
        "notes": notes(plan, g0, config) + blocks_notes(config, plan, blocks) + result["notes"],
        "allocation": result["allocation"],
        "compensation": result["compensation"],
        "calibration": {
            "source": calibration.name if isinstance(calibration, Calibration) else
            ("token tensors" if samples else None),
            "file": calibration.file if isinstance(calibration, Calibration) else None,
            "samples": len(samples) if samples else 0, "tokens": result["calibration_tokens"],
            "seqlen": config.seqlen, "seed": config.seed, "used": config.needs_calibration,
        },
        "device": config.device, "seed": config.seed,
        "dtype": {"stored": result["storage_dtype"], "computed": result["compute_dtype"],
                  "why": result["compute_dtype_why"]},
        "memory": {
            "streamed": source.streamed,
            "checkpoint_bytes": source.size_bytes,
            "bytes_read": source.bytes_read,
            "bytes_written": sink.bytes_written,
            "offload": result["offload"],
            **result["memory"],
        },
        "phases": timer.report(),
        "layers": result["layers"],
    }
    if g0.is_moe:
        report["moe"], more = moe_structures.summary(g0, result["layers"], before, after,
                                                     result["calibration_tokens"], config.moe)
        report["notes"] = [n for n in report["notes"] if "only MLP neurons were pruned" not in n] + more
    return report


def blocks_summary(source, result: dict, before: int, after: int) -> dict:
    """What the prune cost the decoder blocks (a whole-model ratio spends its budget there only): their
    parameters before and after, the share of the model outside them (embeddings, lm_head, final norm), and per
    layer the share of its attention's and its MLP's (or experts') parameters removed."""
    layers = source.layers
    g0 = result["geometry_before"]
    spec = per_layer_spec(source)
    dense = [i for i, entry in enumerate(result["layers"]) if "kept_neurons" in entry]
    units = allocate.unit_params(layers[dense[0] if dense else 0], spec, g0, moe=not dense)
    attention = g0.num_heads * units.query_head + g0.num_kv_heads * units.kv_head
    shares = []
    for entry in result["layers"]:
        kept_attn = len(entry["kept_heads"]) * units.query_head + len(entry["kept_kv_heads"]) * units.kv_head
        if "kept_neurons" in entry:
            mlp = 1 - len(entry["kept_neurons"]) / g0.intermediate
        else:
            mlp = 1 - sum(len(n) for n in entry["kept_expert_neurons"]) / (g0.num_experts * g0.expert_intermediate)
        shares.append({"attention": round(1 - kept_attn / attention, 4), "mlp": round(mlp, 4)})
    outside = result["outside_params"]
    blocks_before, blocks_after = before - outside, after - outside
    return {"params_before": blocks_before, "params_after": blocks_after,
            "ratio_achieved": (blocks_before - blocks_after) / blocks_before,
            "outside_share": round(outside / before, 4), "removed_per_layer": shares}


def per_layer_spec(source):
    from ..arch import spec_for
    return spec_for(source.model)


def blocks_notes(config: PruneConfig, plan: allocate.Plan, blocks: dict) -> list[str]:
    """A whole-model ratio never silently means more of each block: say what it cost them."""
    if config.ratio_of != "model" or config.ratio is None:
        return []
    attention = [s["attention"] for s in blocks["removed_per_layer"]]
    mlp = [s["mlp"] for s in blocks["removed_per_layer"]]
    span = lambda v: f"{v[0]:.0%}" if max(v) - min(v) < 0.005 else f"{min(v):.0%}-{max(v):.0%}"  # noqa: E731
    every = " in every layer" if max(attention) - min(attention) < 0.005 and max(mlp) - min(mlp) < 0.005 else \
        " across layers"
    return [f"--ratio {plan.target_ratio:g} counts the whole model, of which {blocks['outside_share']:.0%} (embeddings, "
            f"lm_head, norms) is never pruned: the decoder blocks lost {blocks['ratio_achieved']:.1%} of their "
            f"parameters, attention {span(attention)} and MLP {span(mlp)}{every}"
            + ("; --ratio-of blocks counts the ratio against the blocks" if blocks["outside_share"] >= 0.05 else "")]


def notes(plan: allocate.Plan, geom, config: PruneConfig) -> list[str]:
    out = []
    if not config.single_pass:
        return [f"per-layer allocation {config.allocation} with {config.heads} heads: every layer has its own "
                "sizes (amp_report.json 'layers'); the folder carries its modelling code (modeling_amp.py), so "
                "transformers loads it with trust_remote_code=True (the engine without), and `amp export --format "
                "vllm|gguf` serves it"]
    if plan.target_ratio >= KL_PAYS_FROM - 1e-9 and config.allocation == "uniform" and \
            config.criterion not in DATA_FREE:
        out.append(f"at {plan.target_ratio:.0%}, consider the default allocation (kl, --allocation auto): on SmolLM2 "
                   "at 30 % OBS under kl budgets gave 1.50x lower perplexity than AMP scores under uniform ones "
                   "(docs/quality.md); its checkpoint has "
                   "per-layer sizes, which load after `import amp` and export to vLLM and llama.cpp")
    if plan.attn_units_removed != plan.ideal_attn_units_removed:
        out.append(f"the budget asked for {plan.ideal_attn_units_removed} attention units per layer; "
                   f"{plan.attn_units_removed} were removed so that the config stays loadable by the "
                   "installed transformers (or the MLP can absorb the rest); the MLP absorbed the difference")
    if geom.is_gqa and plan.attn_units_removed == 0:
        out.append(f"grouped-query attention: a KV group holds {geom.group_size} query heads and "
                   f"{100 / geom.num_kv_heads:.0f}% of a layer's attention; this budget removed no whole group, "
                   "so only MLP neurons were pruned")
    return out



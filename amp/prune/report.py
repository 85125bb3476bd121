"""The prune's report (amp_report.json's core): what was asked and achieved, how it ran, and every layer's keep
sets (indices into the ORIGINAL layer), with the notes a user should read."""
from __future__ import annotations

from ..io.calibration import Calibration
from ..runtime import per_layer
from . import allocate
from . import experts as moe_structures
from .config import PruneConfig

DEPTH_PAYS_FROM = 0.3  # measured: depth allocation ties uniform at 10 %, is within noise at 20 %, wins at 30 %


def prune_report(source, sink, config: PruneConfig, calibration, result: dict, before: int, timer) -> dict:
    """`result`: what passes.prune_layers returned; `before`: the parameters of the dense model."""
    samples = calibration.samples if isinstance(calibration, Calibration) else calibration
    after = result["params_after"]
    plan, g0, g1 = result["plan"], result["geometry_before"], result["geometry_after"]
    varies = "per layer" if per_layer.entries(result["target_config"]) else None
    report = {
        "model_class": type(source.model).__name__,
        "criterion": config.criterion,
        "ratio_target": plan.target_ratio,
        "ratio_achieved": (before - after) / before,
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
        "notes": notes(plan, g0, config) + result["notes"],
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
        },
        "phases": timer.report(),
        "layers": result["layers"],
    }
    if g0.is_moe:
        report["moe"], more = moe_structures.summary(g0, result["layers"], before, after,
                                                     result["calibration_tokens"], config.moe)
        report["notes"] = [n for n in report["notes"] if "only MLP neurons were pruned" not in n] + more
    return report


def notes(plan: allocate.Plan, geom, config: PruneConfig) -> list[str]:
    out = []
    if not config.single_pass:
        return [f"per-layer allocation {config.allocation} with {config.heads} heads: every layer has its own "
                "sizes (amp_report.json 'layers'); a checkpoint with differing layers loads after `import amp`"]
    if plan.target_ratio >= DEPTH_PAYS_FROM - 1e-9 and config.criterion == "amp":
        out.append(f"at {plan.target_ratio:.0%}, consider --allocation depth: on SmolLM2 at 30 % it gave 1.44x "
                   "lower perplexity and 2.4 points more four-task accuracy (paired, beyond noise) than uniform; "
                   "its checkpoint loads after `import amp` (benchmarks/results/quality_paired_gaps.md)")
    if plan.attn_units_removed != plan.ideal_attn_units_removed:
        out.append(f"the budget asked for {plan.ideal_attn_units_removed} attention units per layer; "
                   f"{plan.attn_units_removed} were removed so that the config stays loadable by the "
                   "installed transformers (or the MLP can absorb the rest); the MLP absorbed the difference")
    if geom.is_gqa and plan.attn_units_removed == 0:
        out.append(f"grouped-query attention: a KV group holds {geom.group_size} query heads and "
                   f"{100 / geom.num_kv_heads:.0f}% of a layer's attention; this budget removed no whole group, "
                   "so only MLP neurons were pruned")
    return out



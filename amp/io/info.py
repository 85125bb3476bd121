"""`amp info`: structure and parameter counts of a model folder, and its pruning report if it has one."""
from __future__ import annotations

from pathlib import Path

from ..arch import Geometry, spec_for_class
from ..common.errors import AmpError
from ..runtime.per_layer import meta_model
from .folders import read_report


def describe(folder) -> str:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise AmpError(f"{folder} is not a model folder (no config.json)")
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    arch = (config.architectures or ["?"])[0]
    spec_for_class(arch)
    spec = spec_for_class(arch)
    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]  # each its own sizes
    span = f"{min(layers):,}" if min(layers) == max(layers) else f"{min(layers):,} to {max(layers):,}"
    g = Geometry.from_config(config, spec)
    per_layer = getattr(config, "amp_per_layer", None)
    shape = (f"heads {g.num_heads}, kv heads {g.num_kv_heads}, head_dim {g.head_dim}, intermediate {g.intermediate}"
             if not per_layer else
             f"head_dim {g.head_dim}, per layer (query heads/kv heads/"
             f"{'neurons or experts x width' if spec.moe else 'neurons'}): " +
             " ".join(f"{e['num_attention_heads']}/{e['num_key_value_heads']}/{_mlp(e, spec, g)}"
                      for e in per_layer))
    lines = [f"{folder}: {arch} ({config.model_type})",
             f"  layers {config.num_hidden_layers}, hidden {g.hidden}, {shape}",
             f"  parameters {total:,} (per decoder layer {span}; decoder layers {sum(layers) / total:.1%} of "
             "the total)"]
    if spec.moe is not None:
        idle = 0
        for i in range(config.num_hidden_layers):
            if spec.moe.is_sparse(config, i):
                entry = per_layer[i] if per_layer else {}
                experts = entry.get(spec.moe.experts_key, g.num_experts)
                width = entry.get(spec.moe.width_key, g.expert_intermediate)
                idle += (experts - g.top_k) * 3 * g.hidden * width
        lines.append(f"  experts: {g.num_experts} per MoE layer of width {g.expert_intermediate} (global config), "
                     f"{g.top_k} per token; parameters active per token {total - idle:,}")
    report = read_report(folder)
    if report:
        lines.append(f"  pruned by AMP: criterion {report['criterion']}, ratio {report['ratio_achieved']:.2%} "
                     f"(asked {report['ratio_target']:.2%}), {report['params_before']:,} -> "
                     f"{report['params_after']:,} parameters")
        cal = report.get("calibration", {})
        if cal.get("used"):
            lines.append(f"  calibration {cal['source']}: {cal['samples']} samples, {cal['tokens']:,} tokens")
    return "\n".join(lines)


def _mlp(entry: dict, spec, geom) -> str:
    """A per-layer entry's MLP: dense neurons, or experts x width."""
    if spec.moe is not None and spec.moe.experts_key in entry:
        return f"{entry[spec.moe.experts_key]}x{entry.get(spec.moe.width_key, geom.expert_intermediate)}"
    return str(entry.get("intermediate_size", geom.intermediate))

"""Qwen3-MoE (30B-A3B, 235B-A22B): Qwen3's attention (q_norm / k_norm per head), and sparse blocks of
`num_experts` experts of `moe_intermediate_size` where `decoder_sparse_step` and `mlp_only_layers` say so (the
other layers keep a dense MLP of `intermediate_size`); the router renormalizes its top-k weights only with
`norm_topk_prob`."""
from .base import ArchSpec, MoESpec


def _sparse(config, index: int) -> bool:
    only = getattr(config, "mlp_only_layers", None) or []
    return index not in only and config.num_experts > 0 and (index + 1) % config.decoder_sparse_step == 0


QWEN3_MOE = ArchSpec(family="qwen3_moe", classes=("Qwen3MoeForCausalLM",), output_bias="none",
                     moe=MoESpec(experts_key="num_experts", width_key="moe_intermediate_size", is_sparse=_sparse,
                                 renormalize=lambda config: bool(config.norm_topk_prob),
                                 legacy_keys={"num_experts": "num_local_experts"}),
                     hf=(("qwen3_moe", "Qwen3MoeDecoderLayer", "Qwen3MoeModel"),))

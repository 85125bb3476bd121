"""Mixtral (8x7B, 8x22B): LLaMA's attention, and in every layer a sparse block of `num_local_experts` SwiGLU
experts (w1 gate, w3 up, w2 down on disk, under `block_sparse_moe`) behind a top-k router that always renormalizes
its top-k weights."""
from .base import ArchSpec, MoESpec

MIXTRAL = ArchSpec(family="mixtral", classes=("MixtralForCausalLM",), output_bias="none",
                   moe=MoESpec(experts_key="num_local_experts", width_key="intermediate_size",
                               disk_block="block_sparse_moe", disk_gate="w1", disk_up="w3", disk_down="w2"),
                   hf=(("mixtral", "MixtralDecoderLayer", "MixtralModel"),))

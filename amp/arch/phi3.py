"""Phi-3: fused qkv_proj ([q; k; v] rows) and fused gate_up_proj ([gate; up] rows)."""
from .base import ArchSpec

PHI3 = ArchSpec(family="phi3", classes=("Phi3ForCausalLM",), q=None, k=None, v=None,
                qkv="self_attn.qkv_proj", mlp_in=(), gate_up="mlp.gate_up_proj",
                hf=(("phi3", "Phi3DecoderLayer", "Phi3Model"),))

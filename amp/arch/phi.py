"""Phi-1.5 / Phi-2: `dense` output projection, GELU MLP fc1 -> fc2, biases everywhere, partial rotary."""
from .base import ArchSpec

PHI = ArchSpec(family="phi", classes=("PhiForCausalLM",), o="self_attn.dense",
               mlp_in=("mlp.fc1",), down="mlp.fc2", gated=False, output_bias="native",
               hf=(("phi", "PhiDecoderLayer", "PhiModel"),))

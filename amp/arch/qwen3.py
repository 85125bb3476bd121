"""Qwen3 (dense, 0.6B-32B): LLaMA's layout plus per-head q_norm / k_norm, RMSNorms over head_dim that every head
shares, so they are kept whole when heads go; head_dim is the config's own (Qwen3-0.6B: 16 heads x 128 on a
1,024 hidden). attention_bias exists but the MLP has no bias flag, so a bias compensation has nowhere to go."""
from .base import ArchSpec

QWEN3 = ArchSpec(family="qwen3", classes=("Qwen3ForCausalLM",), output_bias="none",
                 hf=(("qwen3", "Qwen3DecoderLayer", "Qwen3Model"),))

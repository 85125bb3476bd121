"""LLaMA family: LLaMA-1/2/3, SmolLM2, Mistral, Qwen2 (q/k/v biases are sliced with their rows)."""
from .base import ArchSpec

LLAMA = ArchSpec(family="llama", classes=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"))

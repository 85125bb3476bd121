"""LLaMA family: LLaMA-1/2/3, SmolLM2, Mistral, Qwen2 (q/k/v biases are sliced with their rows)."""
from dataclasses import replace

from .base import ArchSpec

# LlamaConfig's attention_bias / mlp_bias turn on biases that Mistral's and Qwen2's modelling code lacks.
LLAMA = ArchSpec(family="llama", classes=("LlamaForCausalLM",), output_bias="config",
                 hf=(("llama", "LlamaDecoderLayer", "LlamaModel"),))
MISTRAL_QWEN2 = replace(LLAMA, family="mistral/qwen2", classes=("MistralForCausalLM", "Qwen2ForCausalLM"),
                        output_bias="none", hf=(("mistral", "MistralDecoderLayer", "MistralModel"),
                                                ("qwen2", "Qwen2DecoderLayer", "Qwen2Model")))

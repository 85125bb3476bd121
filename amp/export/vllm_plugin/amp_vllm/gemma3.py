"""Gemma 3 text (Gemma3Model builds Gemma3DecoderLayer by name)."""
from vllm.model_executor.models import gemma3

from .common import per_layer, swapped


class AmpGemma3ForCausalLM(gemma3.Gemma3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        with swapped(gemma3, Gemma3DecoderLayer=per_layer(gemma3.Gemma3DecoderLayer)):
            super().__init__(vllm_config=vllm_config, prefix=prefix)

"""Gemma 2 (Gemma2Model builds Gemma2DecoderLayer by name)."""
from vllm.model_executor.models import gemma2

from .common import per_layer, swapped


class AmpGemma2ForCausalLM(gemma2.Gemma2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        with swapped(gemma2, Gemma2DecoderLayer=per_layer(gemma2.Gemma2DecoderLayer)):
            super().__init__(vllm_config=vllm_config, prefix=prefix)

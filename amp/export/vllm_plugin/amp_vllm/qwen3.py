"""Qwen3 (Qwen3Model builds its layers from a class attribute; Qwen3ForCausalLM builds Qwen3Model by name)."""
from vllm.model_executor.models import qwen3

from .common import per_layer, swapped


class _Model(qwen3.Qwen3Model):
    decoder_layer_type = per_layer(qwen3.Qwen3DecoderLayer)


class AmpQwen3ForCausalLM(qwen3.Qwen3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        with swapped(qwen3, Qwen3Model=_Model):
            super().__init__(vllm_config=vllm_config, prefix=prefix)

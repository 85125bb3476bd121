"""Qwen2 (vLLM's Qwen2Model takes the decoder layer class; Qwen2ForCausalLM builds Qwen2Model by name)."""
from vllm.model_executor.models import qwen2

from .common import per_layer, swapped

AmpQwen2DecoderLayer = per_layer(qwen2.Qwen2DecoderLayer)


class _Model(qwen2.Qwen2Model):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        kwargs["decoder_layer_type"] = AmpQwen2DecoderLayer
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)


class AmpQwen2ForCausalLM(qwen2.Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        with swapped(qwen2, Qwen2Model=_Model):
            super().__init__(vllm_config=vllm_config, prefix=prefix)

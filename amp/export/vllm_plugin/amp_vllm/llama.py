"""LLaMA and Mistral (vLLM's LlamaForCausalLM takes the decoder layer class as an argument)."""
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from .common import layer_config


class AmpLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None, **kwargs):
        base = config or vllm_config.model_config.hf_config
        super().__init__(vllm_config, prefix, config=layer_config(base, prefix), **kwargs)


class AmpLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        kwargs["layer_type"] = AmpLlamaDecoderLayer
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)


class AmpMistralForCausalLM(AmpLlamaForCausalLM):
    pass

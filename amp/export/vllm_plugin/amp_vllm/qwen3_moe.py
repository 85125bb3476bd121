"""Qwen3-MoE (its layers and sparse blocks read their sizes from the VllmConfig: each layer gets a view of it)."""
from vllm.model_executor.models import qwen3_moe

from .common import swapped, vllm_config_for


class AmpQwen3MoeDecoderLayer(qwen3_moe.Qwen3MoeDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config_for(vllm_config, prefix), prefix, **kwargs)


class _Model(qwen3_moe.Qwen3MoeModel):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        kwargs["decoder_layer_type"] = AmpQwen3MoeDecoderLayer
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)


class AmpQwen3MoeForCausalLM(qwen3_moe.Qwen3MoeForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        with swapped(qwen3_moe, Qwen3MoeModel=_Model):
            super().__init__(vllm_config=vllm_config, prefix=prefix)

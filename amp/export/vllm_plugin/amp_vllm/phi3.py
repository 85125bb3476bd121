"""Phi-3 (vLLM's Phi3ForCausalLM is its LLaMA model with fused qkv_proj / gate_up_proj checkpoints)."""
from vllm.model_executor.models.phi3 import Phi3ForCausalLM

from .llama import AmpLlamaDecoderLayer


class AmpPhi3ForCausalLM(Phi3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        kwargs["layer_type"] = AmpLlamaDecoderLayer
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)

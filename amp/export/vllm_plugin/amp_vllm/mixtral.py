"""Mixtral (MixtralModel builds MixtralDecoderLayer by name; each layer's FusedMoE holds that layer's experts,
numbered 0..n-1 in the checkpoint, and their width)."""
from vllm.model_executor.models import mixtral

from .common import per_layer, swapped


class AmpMixtralForCausalLM(mixtral.MixtralForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        with swapped(mixtral, MixtralDecoderLayer=per_layer(mixtral.MixtralDecoderLayer)):
            super().__init__(vllm_config=vllm_config, prefix=prefix)

"""ArchSpec: where a model family keeps its prunable projections. Families are data, not if/else chains."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class ArchSpec:
    family: str
    classes: tuple[str, ...]                 # HF class names this spec serves
    # Paths are relative to one decoder layer. Either q/k/v or a fused qkv ([q; k; v] rows).
    q: str | None = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    qkv: str | None = None
    o: str = "self_attn.o_proj"              # output projection: its input is the per-head attention output
    attn: str = "self_attn"
    # MLP: projections whose output rows are neurons, or a fused [gate; up]; then the down projection.
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    gate_up: str | None = None
    down: str = "mlp.down_proj"
    mlp: str = "mlp"
    gated: bool = True                       # SwiGLU (silu(gate) * up) vs plain gelu(fc1); the activation
                                             # itself is read from config.hidden_act
    # How a bias on the output / down projection survives a save (FLAP's compensation needs one):
    # "native" (the family always has it), "config" (config flags attention_bias / mlp_bias turn biases on for
    # every projection of the block), "none" (the modelling code hard-codes bias=False).
    output_bias: str = "none"

    def get(self, layer: nn.Module, path: str) -> nn.Module:
        return layer.get_submodule(path)


@dataclass(frozen=True)
class Geometry:
    """Attention and MLP sizes of one decoder layer, read from the model config."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    hidden: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads < self.num_heads

    @classmethod
    def from_config(cls, config) -> "Geometry":
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(heads, kv, head_dim, config.intermediate_size, config.hidden_size)

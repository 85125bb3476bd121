"""ArchSpec: where a model family keeps its prunable projections. Families are data, not if/else chains."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn


def _every_layer(config, index: int) -> bool:
    return True


@dataclass(frozen=True)
class MoESpec:
    """A sparse mixture-of-experts block, as transformers >= 5 holds it in memory: a router whose weight is
    (experts, hidden) and experts fused into two 3-D tensors, gate_up_proj (E, 2I, hidden) and down_proj
    (E, hidden, I). Hub checkpoints store every expert on its own (`{disk_block}.experts.{e}.{gate|up|down}`
    below); the io layer translates."""
    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    experts_key: str = "num_local_experts"      # config: experts per layer (canonical name)
    width_key: str = "intermediate_size"        # config: each expert's intermediate size
    top_k_key: str = "num_experts_per_tok"
    # Hub names, relative to a decoder layer: the block's prefix on disk, and each expert's projections.
    disk_block: str = "mlp"
    disk_gate: str = "gate_proj"
    disk_up: str = "up_proj"
    disk_down: str = "down_proj"
    is_sparse: Callable = _every_layer          # (config, layer index) -> whether the layer is a MoE layer
    renormalize: Callable = lambda config: True  # whether the top-k routing weights are renormalized
    # config keys that older transformers read under another name (written too, so that 4.57 loads the output)
    legacy_keys: dict = field(default_factory=dict)

    def memory_block(self) -> str:
        return self.router.rsplit(".", 1)[0]


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
    gated: bool = True                       # gated MLP (act(gate) * up: SwiGLU, GeGLU) vs plain act(fc1); the
                                             # activation itself is read from the config, under `act_key`
    act_key: str = "hidden_act"
    # How a bias on the output / down projection survives a save (FLAP's compensation needs one):
    # "native" (the family always has it), "config" (config flags attention_bias / mlp_bias turn biases on for
    # every projection of the block), "none" (the modelling code hard-codes bias=False).
    output_bias: str = "none"
    moe: MoESpec | None = None               # mixture-of-experts layers (None: every MLP is dense)
    # Norms on what a block writes, before the residual add (Gemma's post-attention and post-feedforward
    # RMSNorms): (after the attention, after the MLP), or None. They divide each token's projection output by its
    # RMS, so the error the residual stream sees is the projection's error over that RMS (statistics.py weighs
    # the Grams by it) times the norm's gain (the rows' weights), and the output Fisher is taken after them.
    post_norms: tuple[str, str] | None = None
    # (transformers module, decoder-layer class, base-model class) per served class: what the per-layer patch
    # teaches to build layers of their own shapes.
    hf: tuple[tuple[str, str, str], ...] = ()

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
    num_experts: int = 0          # experts per MoE layer (0: a dense model)
    expert_intermediate: int = 0  # each expert's intermediate size
    top_k: int = 0                # experts each token is routed to

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads < self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_config(cls, config, spec: ArchSpec | None = None) -> "Geometry":
        """The dense layer's sizes; with a MoE spec, the experts' as well. head_dim is the config's own where it
        has one (Qwen3, Gemma: not hidden_size / num_heads)."""
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        moe = spec.moe if spec is not None else None
        experts = width = top_k = 0
        if moe is not None:
            experts = int(getattr(config, moe.experts_key))
            width = int(getattr(config, moe.width_key))
            top_k = int(getattr(config, moe.top_k_key))
        return cls(heads, kv, head_dim, config.intermediate_size, config.hidden_size, experts, width, top_k)

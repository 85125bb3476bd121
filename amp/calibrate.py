"""Calibration statistics of one decoder layer, gathered by hooks that a context manager always removes.

Per layer: for each query head the sum over calibration tokens of the L1 norm of what it writes through the
output projection (through the fused `head_norms` kernel), and for each MLP neuron the sum of |input of the
down projection|. Padding tokens are excluded through the mask the pipeline sets before each batch.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

import amp_kernels

from .arch import ArchSpec, Geometry


@dataclass
class LayerStats:
    head_l1: torch.Tensor        # (H,) fp32, summed over tokens
    neuron_abs: torch.Tensor     # (I,) fp32, summed over tokens
    tokens: int = 0


@dataclass
class TokenMask:
    """The valid-token mask (B, T) of the batch being run; None means every token counts."""
    mask: torch.Tensor | None = None
    flat: torch.Tensor | None = field(default=None, repr=False)

    def set(self, mask: torch.Tensor | None):
        self.mask = mask
        self.flat = None if mask is None else mask.reshape(-1)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1])
        return x if self.flat is None else x[self.flat.to(x.device)]


@contextmanager
def statistics_hooks(layer: torch.nn.Module, spec: ArchSpec, geom: Geometry, token_mask: TokenMask):
    device = next(layer.parameters()).device
    stats = LayerStats(torch.zeros(geom.num_heads, dtype=torch.float32, device=device),
                       torch.zeros(geom.intermediate, dtype=torch.float32, device=device))
    o_proj = spec.get(layer, spec.o)
    down = spec.get(layer, spec.down)

    def on_o_input(_module, args):
        x = token_mask.select(args[0])
        stats.tokens += x.shape[0]
        amp_kernels.head_norms(x, o_proj.weight, geom.num_heads, p=1, out=stats.head_l1)

    def on_down_input(_module, args):
        stats.neuron_abs += token_mask.select(args[0]).float().abs().sum(dim=0)

    handles = [o_proj.register_forward_pre_hook(on_o_input), down.register_forward_pre_hook(on_down_input)]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()

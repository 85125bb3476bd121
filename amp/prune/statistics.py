"""Calibration statistics of one decoder layer, gathered by hooks that a context manager always removes.

Per layer: for each query head the sum over calibration tokens of the L1 norm of what it writes through the
output projection (the fused `head_norms` kernel), and for each MLP neuron the sum of |input of the down
projection| (gathered by the fused `swiglu` / `geglu` / `gelu_mlp_act` kernels in the MLP's own forward pass).
With `moments=True` (the wanda-sp and flap baselines, a bias compensation) also the per-channel sum and sum of
squares (fp64) of the inputs of the output and down projections; with `gram=True` (a refit) their Gram
matrices. Padding tokens are excluded through the mask the prune run sets before each batch.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

import amp_kernels

from ..arch import ArchSpec, Geometry
from ..runtime.fused import fused_activation, mlp_inputs
from . import experts as moe_structures
from .compensate import DenseTarget, Gram


@dataclass
class ChannelMoments:
    """Per input channel of a projection, over calibration tokens: count, sum and sum of squares (fp64)."""
    total: torch.Tensor
    squares: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, width: int, device) -> "ChannelMoments":
        return cls(torch.zeros(width, dtype=torch.float64, device=device),
                   torch.zeros(width, dtype=torch.float64, device=device))

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.double()
        self.total += rows.sum(dim=0)
        self.squares += rows.square().sum(dim=0)
        self.count += rows.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def l2(self) -> torch.Tensor:
        """||x_j||_2 over tokens."""
        return self.squares.sqrt()

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance over tokens."""
        n = self.count
        return ((self.squares - self.total.square() / n) / max(n - 1, 1)).clamp_min(0.0)


@dataclass
class LayerStats:
    head_l1: torch.Tensor        # (H,) fp32, summed over tokens
    neuron_abs: torch.Tensor     # (I,) fp32, summed over tokens
    tokens: int = 0
    o_moments: ChannelMoments | None = None      # inputs of the output projection (H*d channels)
    down_moments: ChannelMoments | None = None   # inputs of the down projection (I channels)
    o_gram: Gram | None = None                 # sum x x^T of the same inputs (a refit)
    down_gram: Gram | None = None
    experts: "moe_structures.ExpertStats | None" = None  # a mixture-of-experts layer's expert statistics
    # a family with post-norms (ArchSpec.post_norms): the squared gain of the norm after o_proj / down_proj per
    # output channel, which weighs the rows of the Gram-based errors (the Grams' tokens are weighted already)
    o_rows: torch.Tensor | None = None
    down_rows: torch.Tensor | None = None
    # a dense-target refit (compensate.DenseTarget): while `recording`, the layer runs on the DENSE model's batch
    # and its projections' inputs wait in `pending` for the pruned model's batch that follows
    o_target: "DenseTarget | None" = None
    down_target: "DenseTarget | None" = None
    recording: bool = False
    pending: dict | None = None


@dataclass
class TokenMask:
    """The valid-token mask of the batch being run, flattened to (B*T,); None means every token counts."""
    flat: torch.Tensor | None = None

    def set(self, mask: torch.Tensor | None):
        self.flat = None if mask is None else mask.reshape(-1)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1])
        return x if self.flat is None else x[self.flat.to(x.device)]




def norm_eps(norm: torch.nn.Module) -> float:
    """An RMSNorm-like module's eps, under either name transformers gives it (0 where it has none)."""
    return float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 0.0)) or 0.0)


def norm_gain(norm: torch.nn.Module, width: int, like: torch.Tensor) -> torch.Tensor:
    """The per-channel gain of an RMSNorm-like module: what it makes of a vector of ones (RMS 1), with its eps
    taken back out. Read through the module's own forward, so a family's (1 + weight) convention needs no code."""
    eps = norm_eps(norm)
    ones = torch.ones(1, width, dtype=like.dtype, device=like.device)
    return (norm(ones).float().reshape(-1) * (1.0 + eps) ** 0.5)


class PostNormWeights:
    """A projection followed by a norm before the residual add (Gemma): the residual stream sees y / rms(y)
    times the norm's gain, so a change d of token t's output y_t reaches it as about gain * d / rms(y_t). Each
    token's Gram row is weighted by 1 / (mean(y_t^2) + eps), its dense output's, and the rows by gain^2: the
    Gram-based error is then the error after the norm (to first order, the radial part, which the norm
    removes, counted as well). Measured before the norm, the few tokens whose output is hundreds of times
    the typical one (which the norm scales back) would own the Gram."""

    def __init__(self, projection: torch.nn.Module, norm: torch.nn.Module):
        self.projection = projection
        self.eps = norm_eps(norm) or 1e-6  # a norm without eps still must not divide by a zero output
        weight = projection.weight
        self.gain_sq = norm_gain(norm, weight.shape[0], weight).square()

    def token_weights(self, rows: torch.Tensor) -> torch.Tensor:
        """1 / (mean(y_t^2) + the median token's, over this batch): the first-order weight for tokens whose output
        is typical or larger, bounded for the quiet ones. The norm's output has RMS 1 whatever goes in, so a
        quiet token's error after the norm is bounded too, while the first-order 1 / mean(y_t^2) grows without
        bound once the pruning error is no longer small against y_t. Unbounded, on Gemma-3-270M the few quiet
        tokens owned the down_proj Grams of layers 5-17 (0.4-1.2 % effective tokens; the BOS, the same state in
        every window, 15-68 % of the weight) and structured OBS chose neurons for them."""
        y = torch.nn.functional.linear(rows, self.projection.weight, self.projection.bias).float()
        ms = y.square().mean(-1)
        return 1.0 / (ms + ms.median() + self.eps)


def _fused_mlp_forward(mlp_in, down, kernel, stats: "LayerStats", token_mask: TokenMask):
    """The MLP's forward on valid tokens only, its activation (and the neuron statistics) in one kernel call.
    Padding rows get zeros: with right padding and a causal mask they never reach a valid token."""
    def forward(x):
        rows = token_mask.select(x)
        counting = stats is not None and not stats.recording
        a = kernel(*mlp_in(rows), neuron_stats=stats.neuron_abs if counting else None)
        y = down(a)
        if token_mask.flat is None:
            return y.view(*x.shape[:-1], y.shape[-1])
        out = y.new_zeros(x.shape[:-1].numel(), y.shape[-1])
        out[token_mask.flat.to(out.device)] = y
        return out.view(*x.shape[:-1], y.shape[-1])
    return forward


@contextmanager
def statistics_hooks(layer: torch.nn.Module, spec: ArchSpec, geom: Geometry, token_mask: TokenMask,
                     hidden_act: str | None = None, moments: bool = False, gram: bool = False, moe: bool = False,
                     expert_grams: bool = False, gram_dtype: torch.dtype = torch.float64, scores: bool = True,
                     dense_target: bool = False):
    """`moe`: the layer's MLP is a mixture of experts (its statistics come from experts.expert_statistics; the
    moments and Gram matrices then cover the output projection only; `expert_grams`: each expert's Gram too;
    `gram_dtype`: fp64 for a refit, fp32 where the Grams only rank structures; `scores`: AMP's head and neuron
    statistics too (not when structured OBS chooses from the Grams)); `dense_target`: the cross sums of a
    dense-target refit as well (the caller runs each dense batch with `stats.recording` set before its pruned
    twin)."""
    device = next(layer.parameters()).device
    width = 0 if moe else geom.intermediate
    stats = LayerStats(torch.zeros(geom.num_heads, dtype=torch.float32, device=device),
                       torch.zeros(width, dtype=torch.float32, device=device))
    o_proj = spec.get(layer, spec.o)
    if moments:
        stats.o_moments = ChannelMoments.zeros(geom.num_heads * geom.head_dim, device)
        stats.down_moments = ChannelMoments.zeros(width, device)
    if gram:
        stats.o_gram = Gram.zeros(geom.num_heads * geom.head_dim, device, gram_dtype)
        stats.down_gram = None if moe else Gram.zeros(width, device, gram_dtype)
    if gram and dense_target:
        stats.pending = {}
        stats.o_target = DenseTarget(geom.num_heads * geom.head_dim, device)
        stats.down_target = None if moe else DenseTarget(width, device)

    kernel = fused_activation(spec.gated, hidden_act)  # any other activation falls back to a down-proj hook
    fused = kernel is not None and not moe
    o_post = down_post = None
    if gram and spec.post_norms is not None:
        attn_norm, mlp_norm = (layer.get_submodule(p) for p in spec.post_norms)
        o_post = PostNormWeights(o_proj, attn_norm)
        stats.o_rows = o_post.gain_sq
        if not moe:
            down_post = PostNormWeights(spec.get(layer, spec.down), mlp_norm)
            stats.down_rows = down_post.gain_sq

    def add_gram(key, gram_, target, post, projection, rows):
        """The Gram of the projection's input (and a dense target's cross sums, against its pending twin)."""
        if target is None:
            gram_.add(rows, post.token_weights(rows) if post is not None else None)
            return
        dense_rows, weights = stats.pending.pop(key)
        gram_.add(rows, weights)
        target.add(projection.weight, dense_rows, rows, weights)

    def record(key, post, rows) -> bool:
        """While the dense batch runs: its rows (and post-norm weights, from the dense output) wait."""
        if not stats.recording:
            return False
        stats.pending[key] = (rows.clone(), post.token_weights(rows) if post is not None else None)
        return True

    def on_o_input(_module, args):
        x = token_mask.select(args[0])
        if record("o", o_post, x):
            return
        stats.tokens += x.shape[0]
        if scores:
            amp_kernels.head_norms(x, o_proj.weight, geom.num_heads, p=1, out=stats.head_l1)
        if moments:
            stats.o_moments.add(x)
        if gram:
            add_gram("o", stats.o_gram, stats.o_target, o_post, o_proj, x)

    def on_down_input(_module, args):
        # The fused MLP forward already feeds the down projection valid rows only (and counted |a| itself).
        rows = args[0].reshape(-1, args[0].shape[-1]) if fused else token_mask.select(args[0])
        if record("down", down_post, rows):
            return
        if not fused and scores:
            stats.neuron_abs += rows.float().abs().sum(dim=0)
        if moments:
            stats.down_moments.add(rows)
        if gram:
            add_gram("down", stats.down_gram, stats.down_target, down_post, down_module, rows)

    down_module = None if moe else spec.get(layer, spec.down)
    handles = [o_proj.register_forward_pre_hook(on_o_input)]
    if moe:
        with moe_structures.expert_statistics(layer, spec.moe, geom, token_mask, expert_grams) as stats.experts:
            try:
                yield stats
            finally:
                for h in handles:
                    h.remove()
        return
    mlp = spec.get(layer, spec.mlp)
    if moments or gram or not fused:
        handles.append(down_module.register_forward_pre_hook(on_down_input))
    try:
        if fused:
            mlp.forward = _fused_mlp_forward(mlp_inputs(layer, spec), down_module, kernel, stats if scores else None,
                                             token_mask)
        yield stats
    finally:
        for h in handles:
            h.remove()
        if fused:
            del mlp.forward  # back to the class's forward

"""The divergence of a model from the dense one on held-back windows, measured from outside the engine: what the
benchmarks check the prune's own figure (prune/fisher.HeldOut.kl) and each layer's share of it against."""
from __future__ import annotations

import torch


@torch.no_grad()
def log_probs(model, window: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities of one window of token ids (1 x tokens x vocabulary), in fp32."""
    return torch.log_softmax(model(window[None]).logits.float(), -1)


def mean_kl(model, windows, dense_logp: list[torch.Tensor]) -> float:
    """Mean over the windows' tokens of KL(dense || model) of the next-token distributions, one window at a time;
    `dense_logp`: the dense model's log_probs of the same windows, computed once by the caller."""
    total = tokens = 0
    for window, dense in zip(windows, dense_logp):
        total += float((dense.exp() * (dense - log_probs(model, window))).sum())
        tokens += window.numel()
    return total / max(tokens, 1)

"""Compensation of what a pruned projection loses, from calibration statistics of its input x.

Two remedies for the output projections (o_proj, down_proj), whose input channels pruning removes:
- bias (FLAP): each removed channel is replaced by its calibration mean, folded into the bias
  (slicing.compensate_bias: the one implementation, also what the `flap` criterion uses);
- refit: a damped least-squares refit of the kept columns from the Gram matrix G = sum over calibration
  tokens of x x^T (SlimGPT / MoDeGPT / Tyr style): W' = (W G[:, K] + lam W[:, K]) (G[K, K] + lam I)^-1, which
  minimizes the calibration error plus lam ||W' - W[:, K]||^2. The damping pulls toward the original weights
  rather than toward zero (plain ridge, W G[:, K] (G[K, K] + lam I)^-1): so a refit never has a larger
  calibration error than no refit, and a huge lam gives back `none`. With the bias as well, the fit is affine:
  x is augmented with a constant 1, so that W' and the bias shift are solved together (the bias undamped).

The reconstruction error over the calibration tokens, ||W x - W' x_K - c||^2 summed, is a quadratic form in G,
so the report's before / after errors cost no extra forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..common.errors import AmpError

MODES = ("none", "bias", "refit", "bias+refit")
# Below this many calibration tokens per input channel of a refit projection, the report warns: on SmolLM2 a
# down_proj refit on 2.9k Alpaca tokens (1.9 per channel) was worse than no refit, on 32k C4 tokens (21) better.
MIN_TOKENS_PER_CHANNEL = 10


@dataclass
class Gram:
    """sum x x^T, sum x and the token count of one projection's input (fp64; each batch's product in fp32)."""
    matrix: torch.Tensor
    total: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, width: int, device) -> "Gram":
        return cls(torch.zeros(width, width, dtype=torch.float64, device=device),
                   torch.zeros(width, dtype=torch.float64, device=device))

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.float()
        self.matrix += (rows.T @ rows).double()
        self.total += rows.sum(dim=0).double()
        self.count += rows.shape[0]

    def augmented(self) -> torch.Tensor:
        """The Gram matrix of [x; 1]: (width + 1) square, the constant channel last."""
        w = self.matrix.shape[0]
        g = self.matrix.new_empty(w + 1, w + 1)
        g[:w, :w] = self.matrix
        g[:w, w] = g[w, :w] = self.total
        g[w, w] = float(self.count)
        return g


def _error(target: torch.Tensor, approx: torch.Tensor, g: torch.Tensor) -> float:
    """sum over tokens of ||(target - approx) [x; 1]||^2 = tr(D G D^T)."""
    d = target - approx
    return float(((d @ g) * d).sum())


def refit(linear: nn.Linear, gram: Gram, kept: torch.Tensor, damp: float, with_bias: bool) -> dict:
    """Refits the kept input columns of `linear` (and, `with_bias`, shifts its bias) to reproduce its full
    output over the calibration tokens; returns the relative reconstruction errors without and with the refit.
    Leaves the weight's full width (the caller slices the kept columns away afterwards): removed columns are
    zeroed, so the layer computes what the pruned layer will."""
    if damp <= 0:
        raise AmpError(f"--damp must be positive, got {damp}")
    weight = linear.weight.detach()
    dev = gram.matrix.device
    w = weight.to(dev, torch.float64)
    width = w.shape[1]
    kept = kept.to(dev)
    g = gram.augmented()
    target = torch.cat([w, w.new_zeros(w.shape[0], 1)], dim=1)        # [W, 0]: the bias already there stays
    cols = torch.cat([kept, kept.new_tensor([width])]) if with_bias else kept
    plain = target.clone()
    plain[:, _removed(kept, width + 1)] = 0                              # no compensation: the columns just go
    g_kk = g[cols][:, cols].clone()
    lam = damp * float(torch.diagonal(gram.matrix).mean())
    diag = torch.full((len(cols),), lam, dtype=torch.float64, device=dev)
    if with_bias:
        diag[-1] = 0.0                                                   # the bias is one value per row: no prior
    g_kk += torch.diag(diag)
    prior = plain[:, cols]                                               # W[:, K] (and no bias shift)
    rhs = target @ g[:, cols] + prior * diag                             # W G[:, K] + lam W[:, K]
    chol, info = torch.linalg.cholesky_ex(g_kk)
    fitted = torch.cholesky_solve(rhs.T, chol).T if int(info) == 0 else torch.linalg.lstsq(g_kk, rhs.T).solution.T
    approx = torch.zeros_like(target)
    approx[:, cols] = fitted
    reference = max(_error(target, torch.zeros_like(target), g), 1e-30)
    before, after = _error(target, plain, g) / reference, _error(target, approx, g) / reference
    new_weight = torch.zeros_like(w)
    new_weight[:, kept] = fitted[:, :len(kept)]
    linear.weight.data.copy_(new_weight.to(weight.device, weight.dtype))
    if with_bias:
        shift = fitted[:, -1]
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device),
                                       requires_grad=False)
        linear.bias.data += shift.to(linear.bias.device, linear.bias.dtype)
    return {"error_before": before, "error_after": after}


def _removed(kept: torch.Tensor, width: int) -> torch.Tensor:
    mask = torch.ones(width, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask.nonzero().flatten()


def summary(mode: str, tokens: int, widths: dict[str, int], errors: list[dict], damp: float) -> dict:
    """The report's `compensation` entry: what was compensated, calibration tokens per input channel, the mean
    reconstruction errors, and a warning when a refit has too few tokens to be trusted."""
    out = {"mode": mode, "calibration_tokens": tokens}
    if mode == "none":
        return out
    out["projections"] = sorted(widths)
    out["tokens_per_channel"] = {k: round(tokens / max(w, 1), 2) for k, w in widths.items()}
    if "refit" in mode:
        out["damp"] = damp
        for key in ("o", "down"):
            rows = [e[key] for e in errors if key in e]
            if rows:
                out[f"{key}_error_before"] = sum(r["error_before"] for r in rows) / len(rows)
                out[f"{key}_error_after"] = sum(r["error_after"] for r in rows) / len(rows)
        thin = {k: v for k, v in out["tokens_per_channel"].items() if v < MIN_TOKENS_PER_CHANNEL}
        if thin:
            out["warning"] = (f"refit on {tokens} calibration tokens: " +
                              ", ".join(f"{v} per input channel of {k}_proj" for k, v in thin.items()) +
                              f" (fewer than {MIN_TOKENS_PER_CHANNEL}); a refit this thin can overfit "
                              "the calibration set: use more tokens (e.g. --calib c4 --nsamples 64)")
    return out

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

import torch
import torch.nn as nn

from ..common.errors import AmpError

MODES = ("none", "bias", "refit", "bias+refit")
# Below this many calibration tokens per input channel of a refit projection, the report warns: on SmolLM2 a
# down_proj refit on 2.9k Alpaca tokens (1.9 per channel) was worse than no refit, on 32k C4 tokens (21) better.
MIN_TOKENS_PER_CHANNEL = 10
BLOCK = 1024  # columns of a Gram-sized matrix handled at a time (what a temporary costs: width x BLOCK)


def blocks(width: int) -> list[slice]:
    return [slice(start, min(start + BLOCK, width)) for start in range(0, width, BLOCK)]


def upper_blocks(width: int) -> list[tuple[slice, slice]]:
    """(rows, columns) of a symmetric matrix's block rows from the diagonal on: forming those is half the work."""
    return [(rows, slice(rows.start, width)) for rows in blocks(width)]


def mirror_upper(matrix: torch.Tensor) -> None:
    """Fills the blocks below the diagonal from those above (a symmetric product formed on one side only)."""
    parts = blocks(matrix.shape[0])
    for i, rows in enumerate(parts):
        for cols in parts[:i]:
            matrix[rows, cols] = matrix[cols, rows].T


class Gram:
    """sum x x^T, sum x and the token count of one projection's input (fp64 where a refit solves with it, fp32
    where it only ranks structures). Each batch adds the blocks on and above the diagonal only (half the
    flops of a full product); the blocks below are filled when the matrix is read."""

    def __init__(self, matrix: torch.Tensor, total: torch.Tensor, count: int = 0):
        self._matrix, self.total, self.count = matrix, total, count
        self._lower_stale = False

    @property
    def matrix(self) -> torch.Tensor | None:
        if self._lower_stale and self._matrix is not None:
            mirror_upper(self._matrix)
            self._lower_stale = False
        return self._matrix

    @matrix.setter
    def matrix(self, value: torch.Tensor | None) -> None:
        self._matrix, self._lower_stale = value, False

    @classmethod
    def zeros(cls, width: int, device, dtype: torch.dtype = torch.float64) -> "Gram":
        """`dtype`: fp64 where a refit solves with it; fp32 where it only ranks (half the memory)."""
        return cls(torch.zeros(width, width, dtype=dtype, device=device),
                   torch.zeros(width, dtype=torch.float64, device=device))

    def add(self, rows: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Each batch's product added into the sum a block at a time (a whole product beside the sum would
        double the Gram's memory: 0.9 GB more at LLaMA-2-7B's down_proj), in fp32, or in bf16 for a ranking
        Gram of bf16 activations (exact products, each block rounded once; twice the speed on a CPU).
        `weights`: one per row (token), so that the Gram is sum w x x^T, its total sum w x and its count sum w
        (a post-norm family's tokens, weighted by how much their error reaches the residual stream)."""
        if weights is not None:  # products in fp32 as below (fp64 inputs, the tests', stay fp64)
            dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
            root = weights.to(dtype).sqrt()[:, None]
            rows = rows.to(dtype) * root
            total = (rows * root).sum(dim=0, dtype=torch.float64)
        elif not (self._matrix.dtype == torch.float32 and rows.dtype == torch.bfloat16):
            rows = rows.float()
        for left, right in upper_blocks(self._matrix.shape[0]):
            self._matrix[left, right].add_(rows[:, left].T @ rows[:, right])
        self._lower_stale = True
        if weights is None:
            self.total += rows.sum(dim=0, dtype=torch.float64)
            self.count += rows.shape[0]
        else:
            self.total += total
            self.count += float(weights.double().sum())

    def augmented(self, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """The Gram matrix of [x; 1]: (width + 1) square, the constant channel last (`matrix`: this Gram's
        matrix where it was lent out, see obs._lent_gram)."""
        matrix = self.matrix if matrix is None else matrix
        w = matrix.shape[0]
        g = matrix.new_empty(w + 1, w + 1)
        g[:w, :w] = matrix
        g[:w, w] = g[w, :w] = self.total
        g[w, w] = float(self.count)
        return g


class DenseTarget:
    """What a dense-target refit fits (GPTAQ-style): the dense model's own output of a projection, W u_t, with u_t
    its input when the DENSE model runs (the pruned one feeds x_t to the pruned layer): the cross sum
    C = sum w u x^T (fp64, rows: u's channels), and sum w ||W u||^2, the error of writing nothing. `weights` as
    Gram.add's (post-norm families), taken from the dense output, and the pruned input's Gram then weighted alike."""

    def __init__(self, width: int, device):
        self.cross = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.reference = 0.0

    def add(self, weight: torch.Tensor, dense_rows: torch.Tensor, rows: torch.Tensor,
            weights: torch.Tensor | None) -> None:
        u = dense_rows.double()
        if weights is not None:
            u = u * weights.double()[:, None]
        self.cross.addmm_(u.T, rows.double())
        y = dense_rows.double() @ weight.detach().double().T
        self.reference += float(((y.square().sum(-1)) * (weights.double() if weights is not None else 1.0)).sum())


def _gram_rows(gram: Gram, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of the Gram of [x; 1] ((len(rows), width + 1); index `width` is the constant channel), without
    forming the whole augmented matrix."""
    n = gram.matrix.shape[0]
    inner = rows.clamp_max(n - 1)
    out = torch.cat([gram.matrix.index_select(0, inner), gram.total.index_select(0, inner)[:, None]], dim=1)
    const = rows == n
    if bool(const.any()):
        out[const] = torch.cat([gram.total, gram.total.new_tensor([float(gram.count)])])
    return out


def refit(linear: nn.Linear, gram: Gram, kept: torch.Tensor, damp: float, with_bias: bool,
          target: DenseTarget | None = None) -> dict:
    """Refits the kept input columns of `linear` (and, `with_bias`, shifts its bias) to reproduce its full
    output over the calibration tokens; returns the relative reconstruction errors without and with the refit.
    Leaves the weight's full width (the caller slices the kept columns away afterwards): removed columns are
    zeroed, so the layer computes what the pruned layer will.

    Memory: the Gram is read a block of rows at a time; besides it, the refit holds its kept block (the matrix
    it factorizes, in place) and out x kept products, never a second matrix of the Gram's size. The errors come
    from the normal equations instead of a full quadratic form each: with F the fitted columns, R = W G[:, K]
    and L the damping, tr(F G_KK F^T) = <F, R + (W_K - F) L>.

    `target` (a DenseTarget; no bias): fit the dense model's output instead of this layer's dense output on the
    pruned model's input: R = W C[:, K] with C the cross sum, the reference its sum w ||W u||^2."""
    if damp <= 0:
        raise AmpError(f"--damp must be positive, got {damp}")
    weight = linear.weight.detach()
    dev = gram.matrix.device
    w = weight.to(dev, torch.float64)
    width = w.shape[1]
    kept = kept.to(dev)
    removed = _removed(kept, width)
    cols = torch.cat([kept, kept.new_tensor([width])]) if with_bias else kept   # K, in [x; 1]'s channels
    lam = damp * float(torch.diagonal(gram.matrix).mean())
    diag = torch.full((len(cols),), lam, dtype=torch.float64, device=dev)
    if with_bias:
        diag[-1] = 0.0                                                   # the bias is one value per row: no prior
    prior = torch.zeros(w.shape[0], len(cols), dtype=torch.float64, device=dev)
    prior[:, :len(kept)] = w[:, kept]                                    # W[:, K] (and no bias shift)
    rhs, reference = torch.zeros_like(prior), 0.0                        # R = W G[:, K]; tr(W G W^T)
    if target is not None:
        if with_bias:
            raise AmpError("a dense-target refit has no affine (bias) form")
        rhs = w @ target.cross.to(dev).index_select(1, kept)              # R = W C[:, K]
        reference = target.reference
    for rows in torch.arange(width, device=dev).split(BLOCK) if target is None else ():
        g_rows = _gram_rows(gram, rows)
        wg = w[:, rows] @ g_rows[:, :width]                              # (out, width): this block's share of W G
        reference += float((wg * w).sum())
        rhs += wg.index_select(1, kept) if not with_bias else \
            torch.cat([wg.index_select(1, kept), w[:, rows] @ g_rows[:, width:]], dim=1)
        del wg, g_rows
    def kept_block(damped: bool = True) -> torch.Tensor:               # G[K, K] + L, a block of rows at a time
        block = torch.cat([_gram_rows(gram, rows).index_select(1, cols) for rows in cols.split(BLOCK)])
        if damped:
            torch.diagonal(block).add_(diag)
        return block
    if target is None:
        before = 0.0                                                     # tr(W_C G_CC W_C^T): the columns just go
        for rows in removed.split(BLOCK):
            before += float(((w[:, rows] @ _gram_rows(gram, rows).index_select(1, removed)) * w[:, removed]).sum())
    else:  # sum w ||W u - W_K x_K||^2 = reference - 2 <W_K, R> + tr(W_K G_KK W_K^T)
        w_k = w[:, kept]
        before = reference - 2 * float((w_k * rhs).sum()) + float(((w_k @ kept_block(False)) * w_k).sum())
    g_kk = kept_block()
    info = torch.empty((), dtype=torch.int32, device=dev)
    torch.linalg.cholesky_ex(g_kk, out=(g_kk, info))                     # the factor overwrites its matrix
    if int(info) == 0:
        fitted = torch.cholesky_solve((rhs + prior * diag).T, g_kk).T
    else:  # the failed factorization overwrote it: formed again for least squares
        g_kk = kept_block()
        fitted = torch.linalg.lstsq(g_kk, (rhs + prior * diag).T).solution.T
    del g_kk
    # after = tr((W - F) G (W - F)^T) over [x; 1] = tr(W G W^T) - 2 <F, R> + tr(F G_KK F^T)
    after = reference - float((fitted * rhs).sum()) + float((fitted * (prior - fitted) * diag).sum())
    reference = max(reference, 1e-30)
    new_weight = torch.zeros_like(w)
    new_weight[:, kept] = fitted[:, :len(kept)]
    linear.weight.data.copy_(new_weight.to(weight.device, weight.dtype))
    if with_bias:
        shift = fitted[:, -1]
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device),
                                       requires_grad=False)
        linear.bias.data += shift.to(linear.bias.device, linear.bias.dtype)
    return {"error_before": before / reference, "error_after": max(after, 0.0) / reference}


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

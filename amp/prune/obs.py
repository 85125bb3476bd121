"""Structured OBS (ZipLM / structured OBC / SlimGPT): which structures of a layer go is chosen by the
reconstruction error their removal leaves, from the Gram matrix G of the output projection's input, greedily,
with the inverse-Gram update of the kept columns after every removal; the exact refit follows (compensate.refit).

For a projection W (out x n) and the damped Gram H = G + lam I (lam = damp x mean diag G, the damping the refit
uses), removing the columns C and refitting the rest by least squares leaves the error
    E(C) = tr(W_C ([H^-1]_CC)^-1 W_C^T),
and afterwards the kept columns and H^-1 are updated (W -= W_C ([H^-1]_CC)^-1 [H^-1]_C:, H^-1 likewise), so that
the next choice is made against the refit weights. A structure owns several columns (a query head: head_dim; a KV
group: its query heads' columns), a neuron one. The sum of the step errors is the error the refit leaves after
all removals: so a path is also each block's error curve, which the KL allocation weighs across layers.

`row_weights` weigh the output channels in the error (the diagonal Fisher of the model's output with respect to
the projection's output, prune/fisher.py): the choice then minimizes a second-order estimate of the divergence
from the dense model instead of the plain output error. The refit itself is row by row, so weights leave it as is.

Without a refit (the experts of a mixture, which are not refit) the error of removing C is the plain quadratic
form tr(W_C G_CC W_C^T), and `plain_path` chooses greedily by its increase.
"""
from __future__ import annotations

import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path as FilePath

import numpy
import torch

from ..common.errors import AmpError
from .compensate import mirror_upper, upper_blocks

# Removal steps per path: a neuron path moves in batches of n / STEPS columns (the ones with the least error,
# then one joint update); measured on SmolLM2's down_proj, finer batches change the chosen sets by a few neurons.
STEPS = 256


def neuron_step(width: int) -> int:
    """Neurons a path removes per update: 1/STEPS of the projection's width."""
    return max(1, width // STEPS)

SPILL_ROWS = 1024  # rows of a Gram written or read at a time when it waits on disk


@dataclass
class Path:
    """Structures in the order they go (indices of groups of columns) and the cumulative error after each
    removal (errors[0] = 0, errors[k] = the error left after the first k)."""
    order: list[int]
    errors: list[float]
    step: int = 1      # structures removed per update: errors are exact at multiples of it (and at the end)

    def scores(self, groups: int) -> torch.Tensor:
        """Rank scores (higher = more important): the k-th removed gets k, the structures never removed get
        `groups` (ties broken by index, as everywhere), so that the engine's keep sets follow the path."""
        s = torch.full((groups,), float(groups))
        s[torch.tensor(self.order, dtype=torch.long)] = torch.arange(len(self.order), dtype=torch.float32)
        return s


def damped(matrix: torch.Tensor, damp: float, in_place: bool = False) -> torch.Tensor:
    """G + lam I with lam = damp x mean diag G (compensate.refit's damping), fp64; `in_place`: into G's own
    storage (an fp64 G the caller no longer needs), so that a path holds one matrix of the Gram's size."""
    g = matrix if in_place and matrix.dtype == torch.float64 else matrix.double().clone()
    lam = damp * float(torch.diagonal(g).mean())
    torch.diagonal(g).add_(max(lam, 1e-12))
    return g


def _inverse(h: torch.Tensor) -> torch.Tensor:
    """H^-1 for a damped Gram H, computed in H's own storage: LAPACK's Cholesky and its inverse work in place, so
    a path holds one matrix of the Gram's size where a factor and an inverse beside it would hold three."""
    info = torch.empty((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(h, out=(h, info))
    if int(info) != 0:  # G + lam I with lam > 0 fails only when lam drowns in rounding (or G holds NaN / inf)
        raise AmpError("a layer's damped Gram matrix is not positive definite (non-finite calibration "
                       "activations, or --damp too small for their scale); raise --damp")
    torch.cholesky_inverse(h, out=h)
    return h


def _cols(groups: torch.Tensor, width: int) -> torch.Tensor:
    return (groups[:, None] * width + torch.arange(width, device=groups.device)[None, :]).reshape(-1)


def _allowed(alive: torch.Tensor, families: torch.Tensor | None, protect: torch.Tensor | None) -> torch.Tensor:
    """Groups that may go next: alive, and not the last alive member of a protected family."""
    if families is None or protect is None:
        return alive
    left = torch.zeros(int(families.max()) + 1, dtype=torch.long, device=alive.device)
    left.index_add_(0, families, alive.long())
    last = alive & protect[families] & (left[families] <= 1)
    return alive & ~last


def refit_path(weight: torch.Tensor, h: torch.Tensor, width: int, count: int, *, order=None, forced=(),
               row_weights: torch.Tensor | None = None, step: int = 1, families: torch.Tensor | None = None,
               protect: torch.Tensor | None = None, groups: int | None = None, consume: bool = False) -> Path:
    """The first `count` groups of `width` columns of `weight` (out, n) to remove, greedily by the error the refit
    leaves under the damped Gram `h` (n, n). `order`: remove in this order instead (a path along another
    criterion's ranking); `forced`: groups that go first, in this order; `step`: groups removed per update (their
    joint error is exact, its split among them proportional to their own errors); `families`, `protect`: a group's
    family, and the families that must keep one alive member (the kept KV groups of single query heads);
    `groups`: how many groups the leading columns form (default: all columns; more columns are never removed);
    `consume`: `h` (fp64) becomes H^-1 in place (the caller no longer needs it), else it is copied first."""
    dev = h.device
    # W^T (n, out), one contiguous row per column: a step reads every column's norm, which along W's rows
    # would be a strided reduction; updated in place below
    wt = weight.detach().T.to(dev, torch.float64, memory_format=torch.contiguous_format, copy=True)
    if row_weights is not None:
        wt.mul_(row_weights.to(dev, torch.float64).clamp_min(0).sqrt()[None, :])
    live = _LiveColumns(wt, _inverse(h if consume and h.dtype == torch.float64 else h.double().clone()))
    groups = groups or wt.shape[0] // width
    alive = torch.ones(groups, dtype=torch.bool, device=dev)
    forced = [int(g) for g in forced]
    queue = [int(g) for g in order if int(g) not in forced] if order is not None else []
    out_order, errors = [], [0.0]
    while len(out_order) < count:
        if forced:                       # one at a time: a forced removal's error is its own
            chosen, own = [forced.pop(0)], torch.ones(1, dtype=torch.float64)
        elif order is not None:
            if not queue:
                break
            chosen = [queue.pop(0) for _ in range(min(step, count - len(out_order), len(queue)))]
            own = torch.ones(len(chosen), dtype=torch.float64)
        else:
            candidates = _allowed(alive, families, protect).nonzero().flatten()
            if len(candidates) == 0:
                break
            cost = _group_costs(live.wt, live.hinv, live.at[_cols(candidates, width)], width)
            m = min(step, count - len(out_order), len(candidates))
            if families is not None and protect is not None:
                m = 1  # one at a time where a removal can change what may go next
            best = torch.topk(cost, m, largest=False).indices
            chosen = candidates[best].tolist()
            own = cost[best].cpu()
        err = live.remove(_cols(torch.tensor(chosen, device=dev), width))
        alive[torch.tensor(chosen, device=dev)] = False
        share = own.clamp_min(0)
        share = share / share.sum() if float(share.sum()) > 0 else torch.full_like(share, 1 / len(share))
        for g, part in zip(chosen, share.tolist()):
            out_order.append(g)
            errors.append(errors[-1] + err * part)
    return Path(out_order, errors, step)


class _LiveColumns:
    """W^T and H^-1 over the columns not yet removed. Every removal updates all of H^-1, so a path to the floor
    would touch n^2 entries per step to the end; once a fifth of the columns are gone both matrices are shrunk to
    the live ones, in their own storage (the path holds no second matrix of the Gram's size), and a step's cost
    falls with the columns left. `at`: an original column's index in the shrunk matrices."""
    SHRINK_AT = 0.8

    def __init__(self, wt: torch.Tensor, hinv: torch.Tensor):
        self.wt, self.hinv = wt, hinv
        n, dev = hinv.shape[0], hinv.device
        self.columns = torch.arange(n, device=dev)   # original index of each live column
        self.at = torch.arange(n, device=dev)        # live index of each original column (-1: gone)
        self.dead = torch.zeros(n, dtype=torch.bool, device=dev)  # removed, still in the matrices

    def remove(self, cols: torch.Tensor) -> float:
        """Removes original columns `cols` jointly (_remove); returns their error."""
        local = self.at[cols]
        err = _remove(self.wt, self.hinv, local)
        self.dead[local] = True
        self.at[cols] = -1
        if int(self.dead.sum()) >= (1 - self.SHRINK_AT) * len(self.dead):
            index = (~self.dead).nonzero().flatten()
            self.columns = self.columns[index]
            self.hinv = _shrink(self.hinv, index, index)
            self.wt = _shrink(self.wt, index, torch.arange(self.wt.shape[1], device=index.device))
            self.at[self.columns] = torch.arange(len(index), device=index.device)
            self.dead = torch.zeros(len(index), dtype=torch.bool, device=index.device)
        return err


def _shrink(matrix: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """matrix[rows][:, cols] (sorted indices) written into the head of matrix's own storage, SPILL_ROWS rows at a
    time: new row i lands before old row rows[i] >= i begins, and before any row a later block reads."""
    if not matrix.is_contiguous():
        return matrix[rows[:, None], cols[None, :]]
    k = len(cols)
    flat = matrix.view(-1)
    for start in range(0, len(rows), SPILL_ROWS):
        block = matrix[rows[start:start + SPILL_ROWS, None], cols[None, :]]
        flat[start * k:start * k + block.numel()] = block.reshape(-1)
    return flat[:len(rows) * k].view(len(rows), k)


def _group_costs(wt: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor, width: int) -> torch.Tensor:
    """E(group) = tr(W_g ([H^-1]_gg)^-1 W_g^T) for every candidate group, given W^T and the groups' columns in
    order."""
    if width == 1:
        d = torch.diagonal(hinv)[cols].clamp_min(1e-30)
        return torch.linalg.vector_norm(wt, dim=1)[cols].square() / d  # no n x out temporary
    cols = cols.view(-1, width)
    blocks = hinv[cols[:, :, None], cols[:, None, :]]                      # (g, width, width)
    inv = torch.linalg.inv(blocks)
    wg = wt[cols]                                                          # (g, width, out)
    return torch.einsum("gao,gab,gbo->g", wg, inv, wg)


def _remove(wt: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> float:
    """Removes columns `cols` jointly: returns their error and updates the kept columns (rows of W^T) and H^-1 in
    place (the removed rows and columns of H^-1 become those of the identity, so that they never count again)."""
    rows = hinv[cols]                                                      # (c, n)
    inv = torch.linalg.inv(rows[:, cols])
    wc = wt[cols]                                                          # (c, out)
    err = float(((inv @ wc) * wc).sum())
    wt.addmm_(rows.T, inv @ wc, alpha=-1.0)
    hinv.addmm_(rows.T, inv @ rows, alpha=-1.0)
    wt.index_fill_(0, cols, 0.0)
    hinv.index_fill_(0, cols, 0.0)
    hinv.index_fill_(1, cols, 0.0)
    hinv[cols, cols] = 1.0
    return max(err, 0.0)


def _product_dtype(dtype: torch.dtype) -> torch.dtype:
    """W^T W for plain_path: in bf16 for a bf16 layer (its weights are bf16 values; BLAS accumulates the products in
    fp32 and rounds each entry once, 2^-9 relative, for twice fp32's speed on CPUs with bf16 units), in fp64 for
    fp64 weights (the tests' exact comparisons), else in fp32 (fp16 sums can overflow or underflow)."""
    if dtype in (torch.bfloat16, torch.float64):
        return dtype
    return torch.float32


def plain_path(weight: torch.Tensor, g: torch.Tensor, width: int, count: int, *, order=None,
               row_weights: torch.Tensor | None = None, step: int = 1, consume: bool = False) -> Path:
    """As refit_path, for a projection that is not refit: the error of removing columns C is tr(W_C G_CC W_C^T)
    = sum over C x C of M = (W^T W) o G; greedily, the group whose removal adds the least goes next (`step`
    groups at a time: their joint error exact, its split proportional to their own). `consume`: M is built in
    G's own storage (the caller no longer needs G), a block of columns at a time, so that the path holds
    no second matrix of the Gram's size; else G is copied first. W^T W's products run in the precision the layer
    computes in (_product_dtype); the errors are summed in fp64."""
    dev = g.device
    w = weight.detach().to(dev, _product_dtype(weight.dtype), copy=True)
    if row_weights is not None:
        scale = row_weights.to(dev, torch.float64 if w.dtype == torch.float64 else torch.float32)
        w.mul_(scale.clamp_min(0).sqrt().to(w.dtype)[:, None])
    m = g if consume and g.is_floating_point() else g.double().clone()  # M in G's dtype (fp32: a ranking)
    for left, right in upper_blocks(m.shape[0]):  # M is symmetric: the blocks from the diagonal on, mirrored
        m[left, right].mul_(w[:, left].T @ w[:, right])  # promoted into M's dtype in place: no copy
    mirror_upper(m)
    del w
    groups = m.shape[0] // width
    if width > 1:
        m = m.view(groups, width, groups, width).sum(dim=(1, 3))
    marginal = torch.diagonal(m).double()
    alive = torch.ones(groups, dtype=torch.bool, device=dev)
    queue = [int(x) for x in order] if order is not None else None
    out_order, errors = [], [0.0]
    while len(out_order) < min(count, groups):
        k = min(step, count - len(out_order), groups - len(out_order))
        if queue is not None:
            chosen = queue[:k]
            del queue[:k]
        else:
            masked = torch.where(alive, marginal, torch.full_like(marginal, float("inf")))
            chosen = torch.topk(masked, k, largest=False).indices.tolist()
        rows = m[chosen]                                                     # (k, groups): M is symmetric
        own = marginal[chosen].clamp_min(0)
        inner = rows[:, chosen]                                              # within the step
        joint = float(own.sum() + inner.sum() - torch.diagonal(inner).sum())
        share = own / own.sum() if float(own.sum()) > 0 else torch.full_like(own, 1 / len(chosen))
        for j, part in zip(chosen, share.tolist()):
            out_order.append(j)
            errors.append(errors[-1] + max(joint, 0.0) * part)
        alive[chosen] = False
        marginal += 2 * rows.double().sum(0)
    return Path(out_order, errors, step)


# ---------------------------------------------------------------- one layer's paths (the criterion and its curves)


@dataclass
class PathRequest:
    """What one resident layer's paths must give: how far they go, along what, and in what unit."""
    choose: bool                   # structured OBS chooses the order (the `obs` criterion); else along the scores
    query: bool                    # single query heads (GQA) rather than whole KV groups
    attention: int                 # attention structures the path reaches (query heads or KV groups)
    neurons: int                   # MLP neurons it reaches
    refit: bool                    # errors after the refit; else the plain error of removing (no compensation)
    damp: float
    bias: bool = False             # the refit is affine (bias+refit): the constant channel is kept and undamped
    fisher: object = None          # fisher.LayerFisher: errors weighted into predicted KL (nats per token)
    within_kv: torch.Tensor | None = None  # single query heads after an allocation: the KV groups that stay
    keep_gram: bool = False        # a refit follows in the same pass: the Grams must outlive the paths
    staging: object = None         # a folder where a kept Gram waits while its path runs (None: a copy in memory)


def _hessian(gram, matrix: torch.Tensor, damp: float, bias: bool) -> torch.Tensor:
    """The damped Gram that compensate.refit solves with, in `matrix`'s storage (lent by _lent_gram): G + lam I,
    or with the bias, the Gram of [x; 1] with the constant channel undamped (one size larger: a new matrix)."""
    if not bias:
        return damped(matrix, damp, in_place=True)
    lam = damp * float(torch.diagonal(matrix).mean())
    h = gram.augmented(matrix)
    del matrix
    torch.diagonal(h)[:-1].add_(max(lam, 1e-12))
    return h


@contextmanager
def _lent_gram(gram, keep: bool, staging):
    """The Gram's matrix in a one-element list, for a path to take out and consume in place (its damping, Cholesky
    and inverse overwrite it; the list, emptied, holds no reference while the Gram is read back). Where a
    refit still needs the Gram after the path (`keep`), it is written to the staging folder first and read back
    afterwards, so that one matrix of its size is resident at a time; without a staging folder (a model pruned
    in memory, which holds the whole model anyway) the path takes a copy instead."""
    if not keep:
        holder, gram.matrix = [gram.matrix], None  # the path's to overwrite; nobody reads this Gram again
        yield holder
        return
    if staging is None:
        yield [gram.matrix.clone()]
        return
    spill = FilePath(staging) / f"gram-{uuid.uuid4().hex}.bin"
    shape, dtype, device = gram.matrix.shape, gram.matrix.dtype, gram.matrix.device
    try:
        with open(spill, "wb") as f:
            for rows in gram.matrix.split(SPILL_ROWS):
                f.write(rows.cpu().numpy().tobytes())
        holder, gram.matrix = [gram.matrix], None
        yield holder
        holder.clear()
        restored = torch.empty(shape, dtype=dtype, device=device)
        stored = torch.empty(0, dtype=dtype).numpy().dtype
        with open(spill, "rb") as f:
            for rows in restored.split(SPILL_ROWS):
                data = numpy.fromfile(f, dtype=stored, count=rows.numel())
                rows.copy_(torch.from_numpy(data).view(rows.shape))
        gram.matrix = restored
    finally:
        spill.unlink(missing_ok=True)


def _path(weight, gram, width: int, count: int, request: PathRequest, rows, order=None, **constraints) -> Path:
    step = 1 if width > 1 else neuron_step(weight.shape[1])
    if not request.refit:
        with _lent_gram(gram, request.keep_gram, request.staging) as lent:
            return plain_path(weight, lent.pop(), width, count, order=order, row_weights=rows, step=step,
                              consume=True)
    w = weight.detach()
    if request.bias:  # [W, 0]: the constant channel belongs to no structure, so it is never removed
        w = torch.cat([w, w.new_zeros(w.shape[0], 1)], dim=1)
    with _lent_gram(gram, request.keep_gram, request.staging) as lent:
        return refit_path(w, _hessian(gram, lent.pop(), request.damp, request.bias), width, count, order=order,
                          row_weights=rows, step=step, groups=weight.shape[1] // width, consume=True,
                          **constraints)


def _curve(path: Path, tokens: int, weighted: bool) -> dict[int, float]:
    """k removed -> error per calibration token (x 1/2 with Fisher weights: predicted KL in nats per token), at
    the ends of the path's steps only: there the errors are exact (within a step they are a proportional split),
    and the budget solve interpolates between them, so what a layer hands on to the solve is a few hundred
    floats per block, not one per neuron."""
    scale = (0.5 if weighted else 1.0) / max(tokens, 1)
    last = len(path.errors) - 1
    return {k: path.errors[k] * scale for k in range(1, last + 1) if k % path.step == 0 or k == last}


def _row_weights(fisher: torch.Tensor | None, gain_sq: torch.Tensor | None) -> torch.Tensor | None:
    """The output channels' weights in a path's error: the output Fisher (the KL allocation), times a post-norm's
    squared gain (statistics.PostNormWeights; the Fisher is then taken after the norm), either, or neither."""
    if gain_sq is None:
        return fisher
    gain_sq = gain_sq.cpu()
    return gain_sq if fisher is None else fisher.to(gain_sq.dtype) * gain_sq


def layer_paths(layer, spec, geom, stats, request: PathRequest, head_scores=None, neuron_scores=None):
    """(head scores, neuron scores, attention curve, MLP curve) of a resident layer from its Gram statistics.
    With `request.choose` the scores are structured OBS's ranks; else the given scores are kept and the curves
    follow their removal order. A mixture-of-experts layer has no dense MLP path here (see experts.py)."""
    from .criteria import group_scores, removal_order
    d, g_size = geom.head_dim, geom.group_size
    fisher = request.fisher
    o_rows = _row_weights(fisher.o if fisher is not None else None, stats.o_rows)
    o_weight = spec.get(layer, spec.o).weight
    if request.query and geom.is_gqa:
        families = torch.arange(geom.num_heads) // g_size
        constraints = {}
        if request.within_kv is not None:
            stay = torch.zeros(geom.num_kv_heads, dtype=torch.bool)
            stay[request.within_kv] = True
            constraints = dict(forced=[h for h in range(geom.num_heads) if not stay[h // g_size]],
                               families=families.to(stats.o_gram.matrix.device),
                               protect=stay.to(stats.o_gram.matrix.device))
        order = None if request.choose else removal_order(head_scores).tolist()
        path = _path(o_weight, stats.o_gram, d, request.attention, request, o_rows, order, **constraints)
        heads = path.scores(geom.num_heads) if request.choose else head_scores
    else:
        order = None if request.choose else removal_order(group_scores(head_scores, geom)).tolist()
        path = _path(o_weight, stats.o_gram, d * g_size, request.attention, request, o_rows, order)
        heads = path.scores(geom.num_kv_heads).repeat_interleave(g_size) if request.choose else head_scores
    attention_curve = _curve(path, stats.tokens, fisher is not None)
    if stats.down_gram is None:
        return heads, neuron_scores, attention_curve, {}
    down = spec.get(layer, spec.down).weight
    order = None if request.choose else removal_order(neuron_scores).tolist()
    path = _path(down, stats.down_gram, 1, request.neurons, request,
                 _row_weights(fisher.mlp if fisher is not None else None, stats.down_rows), order)
    neurons = path.scores(geom.intermediate) if request.choose else neuron_scores
    return heads, neurons, attention_curve, _curve(path, stats.tokens, fisher is not None)


def expert_paths(layer, moe, stats, request, tokens: int, scores=None):
    """(expert scores, expert neuron scores, ExpertPaths) from each expert's Gram: with `scores` None, structured
    OBS chooses (experts ranked by their cost, each expert's neurons by its greedy path); else the given (expert,
    neuron) scores are kept and the costs follow their order."""
    from .experts import ExpertPaths, experts_module
    experts = experts_module(layer, moe)
    down = experts.down_proj.detach()
    n, width = down.shape[0], down.shape[2]
    rows = request.fisher.mlp if request.fisher is not None else None
    scale = (0.5 if rows is not None else 1.0) / max(tokens, 1)
    expert_cost = torch.zeros(n, dtype=torch.float64)
    neuron_cost = torch.zeros(n, width + 1, dtype=torch.float64)
    neuron_scores = torch.zeros(n, width) if scores is None else scores[1]
    for e in range(n):
        order = None if scores is None else torch.argsort(scores[1][e], stable=True).tolist()
        path = plain_path(down[e], stats.grams[e], 1, width, order=order, row_weights=rows,
                          step=neuron_step(width), consume=True)  # each expert's Gram goes after its path
        neuron_cost[e] = torch.tensor(path.errors, dtype=torch.float64) * scale
        expert_cost[e] = neuron_cost[e, -1]  # every neuron gone = the expert's whole output
        if scores is None:
            neuron_scores[e] = path.scores(width)
    expert_scores = expert_cost.float() if scores is None else scores[0]
    return expert_scores, neuron_scores, ExpertPaths(expert_cost, neuron_cost)

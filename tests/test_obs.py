"""Structured OBS (prune/obs.py) against brute force: its first choice is the single removal with the least error
after the refit, each cumulative error is the refit error of the set removed so far, and in the engine its keep
sets are the brute-force greedy ones with the refit at the least-squares optimum."""
import copy

import pytest
import torch

import amp
from amp.arch import Geometry, spec_for
from amp.prune.obs import damped, plain_path, refit_path
from conftest import random_calibration
from test_compensate import _ridge
from test_exactness import masked_reference
from test_scores import captured_inputs
from tiny_models import make_tiny


def _refit_error(w, h, removed_cols):
    """min over the kept columns of tr((W - W') H (W - W')^T), W' zero on the removed columns (least squares)."""
    n = w.shape[1]
    kept = [c for c in range(n) if c not in set(removed_cols)]
    fitted = w @ h[:, kept] @ torch.linalg.inv(h[kept][:, kept])
    approx = torch.zeros_like(w)
    approx[:, kept] = fitted
    d = w - approx
    return float(torch.trace(d @ h @ d.T))


def _cols(groups, width):
    return [g * width + j for g in groups for j in range(width)]


def _layer(out=6, n=12, tokens=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    return torch.randn(out, n, generator=g, dtype=torch.float64), damped(x.T @ x, 0.01)


@pytest.mark.parametrize("width", [1, 3])
def test_first_choice_is_the_least_error_single_removal_and_errors_are_exact(width):
    w, h = _layer()
    groups = w.shape[1] // width
    path = refit_path(w, h, width, groups - 1)
    brute = [_refit_error(w, h, _cols([g], width)) for g in range(groups)]
    assert path.order[0] == min(range(groups), key=brute.__getitem__)
    assert path.errors[1] == pytest.approx(min(brute), rel=1e-9)
    for k in range(1, groups):  # the path's cumulative error is the refit error of what it removed
        assert path.errors[k] == pytest.approx(_refit_error(w, h, _cols(path.order[:k], width)), rel=1e-7)
    # greedy: every step is the least-error next removal given the earlier ones
    for k in range(1, min(4, groups - 1)):
        rest = [g for g in range(groups) if g not in path.order[:k]]
        best = min(rest, key=lambda g: _refit_error(w, h, _cols(path.order[:k] + [g], width)))
        assert path.order[k] == best


def test_batched_steps_keep_exact_cumulative_errors_and_row_weights_are_a_metric():
    w, h = _layer(n=24)
    path = refit_path(w, h, 1, 20, step=4)
    assert len(path.order) == 20 and len(set(path.order)) == 20
    for k in (4, 8, 20):  # at the end of each batch the error is exact
        assert path.errors[k] == pytest.approx(_refit_error(w, h, path.order[:k]), rel=1e-7)
    f = torch.rand(w.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    weighted = refit_path(w, h, 1, 5, row_weights=f)
    scaled = refit_path(w * f.sqrt()[:, None], h, 1, 5)
    assert weighted.order == scaled.order and weighted.errors == pytest.approx(scaled.errors)


def test_shrinking_to_the_live_columns_keeps_the_greedy_path_and_the_storage(monkeypatch):
    """Once a fifth of the columns are gone the path works on the live ones only, in the same storage: the
    shrink is the plain gather (in blocks of a few rows here, so that a block's writes must not clobber the rows a
    later block reads), and every step to the floor is still the least-error next removal."""
    from amp.prune import obs
    monkeypatch.setattr(obs, "SPILL_ROWS", 3)
    g = torch.Generator().manual_seed(5)
    m = torch.randn(37, 37, generator=g, dtype=torch.float64)
    rows, cols = torch.tensor([0, 2, 3, 9, 10, 20, 36]), torch.tensor([1, 2, 5, 6, 7, 30])
    expected, storage = m[rows][:, cols].clone(), m.data_ptr()
    shrunk = obs._shrink(m, rows, cols)
    assert torch.equal(shrunk, expected) and shrunk.data_ptr() == storage
    w, h = _layer(n=16, seed=2)
    path = refit_path(w, h, 1, 15)
    for k in range(15):
        rest = [c for c in range(16) if c not in path.order[:k]]
        best = min(rest, key=lambda c: _refit_error(w, h, path.order[:k] + [c]))
        assert path.order[k] == best
        assert path.errors[k + 1] == pytest.approx(_refit_error(w, h, path.order[:k + 1]), rel=1e-7)


def test_forced_and_protected_groups():
    w, h = _layer(n=12)
    families = torch.arange(6) // 2                  # 6 heads of width 2 in 3 groups of 2
    protect = torch.tensor([True, True, False])
    path = refit_path(w, h, 2, 4, forced=[4, 5], families=families, protect=protect)
    assert path.order[:2] == [4, 5]                  # group 2's heads go first
    left = [f for f in range(3) if any(families[g] == f and g not in path.order for g in range(6))]
    assert left == [0, 1]                            # each protected group keeps a head


def test_plain_path_is_the_quadratic_form_greedy():
    w, h = _layer()
    g = h  # any PSD matrix
    path = plain_path(w, g, 1, 8)
    m = (w.T @ w) * g
    for k in range(1, 9):
        s = path.order[:k]
        assert path.errors[k] == pytest.approx(float(m[s][:, s].sum()), rel=1e-9)
    first = min(range(12), key=lambda j: float(m[j, j]))
    assert path.order[0] == first


def test_engine_obs_keeps_the_brute_force_greedy_set_and_refits_to_least_squares():
    """Dense statistics, so that every layer's inputs are the dense model's: per layer the removed neurons are
    the brute-force greedy choice on the damped Gram of the captured down_proj inputs, and the refit is the
    least-squares optimum for what stays."""
    model = make_tiny("llama_gqa")
    spec, geom = spec_for(model), Geometry.from_config(model.config)
    samples = random_calibration(n=8, lo=20, hi=40)
    down_in = captured_inputs(model, samples, spec.down)
    dense = copy.deepcopy(model)
    damp = 0.05
    report = amp.prune_(model, amp.PruneConfig(ratio=0.06, criterion="obs", compensate="refit", damp=damp,
                                               sequential=False, batch_size=3), samples, progress=False)
    for i, entry in enumerate(report["layers"]):
        x = down_in[i].double()
        w = spec.get(dense.model.layers[i], spec.down).weight.detach().double()
        h = damped(x.T @ x, damp)
        removed = sorted(set(range(geom.intermediate)) - set(entry["kept_neurons"]))
        assert 0 < len(removed) < 20
        chosen = []
        for _ in removed:  # brute-force greedy
            rest = [j for j in range(geom.intermediate) if j not in chosen]
            chosen.append(min(rest, key=lambda j: _refit_error(w, h, chosen + [j])))
        assert sorted(chosen) == removed
        kept = torch.tensor(entry["kept_neurons"])
        lam = damp * float((x * x).sum(0).mean())
        want = _ridge(x[:, kept], x @ w.T, w[:, kept], lam, False)
        got = spec.get(model.model.layers[i], spec.down).weight.detach().double()
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("allocation,heads", [("uniform", "group"), ("uniform", "query"), ("kl", "query"),
                                              ("kl", "group"), ("depth", "query")])
def test_obs_prunes_equal_the_masked_original(family, allocation, heads):
    original = make_tiny(family)
    pruned = copy.deepcopy(original)
    report = amp.prune_(pruned, amp.PruneConfig(ratio=0.3, criterion="obs", allocation=allocation, heads=heads,
                                                batch_size=3), random_calibration(n=16), progress=False)
    assert abs(report["ratio_achieved"] - 0.3) < 0.01
    ids = torch.randint(2, 258, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = pruned(ids).logits, masked_reference(original, report)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

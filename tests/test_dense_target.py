"""The dense-target refit (--refit-target dense, compensate.DenseTarget; issue 29): under sequential statistics the
pruned layer is fed the pruned model's input and its output projections are fitted to what the DENSE model writes
there, not to what the dense layer would write on the pruned input. Checked against a direct damped least-squares
solve on captured rows (and for Gemma with its post-norm token weights), and in the engine against an
independent computation."""
import copy

import pytest
import torch

import amp
from amp.arch import Geometry, spec_for
from amp.prune import compensate
from amp.prune.statistics import PostNormWeights, TokenMask, statistics_hooks
from conftest import random_calibration
from test_compensate import _ridge
from tiny_models import make_tiny


def _rows(mlp, x):
    """The down projection's input rows for MLP inputs x."""
    got = []
    h = mlp.down_proj.register_forward_pre_hook(lambda m, a: got.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        mlp(x)
    h.remove()
    return got[0].double()


@pytest.mark.parametrize("family", ["llama_gqa", "gemma3_gqa"])
def test_dense_target_refit_is_the_weighted_least_squares_fit_to_the_dense_output(family):
    model = make_tiny(family).double()
    spec, geom = spec_for(model), Geometry.from_config(model.config)
    layer = model.model.layers[0]
    mlp, down = spec.get(layer, spec.mlp), spec.get(layer, spec.down)
    g = torch.Generator().manual_seed(0)
    dense_x = torch.randn(400, geom.hidden, generator=g, dtype=torch.float64)
    pruned_x = dense_x + 0.3 * torch.randn(400, geom.hidden, generator=g, dtype=torch.float64)  # upstream error
    hooks = statistics_hooks(layer, spec, geom, TokenMask(), model.config.hidden_activation if family.startswith(
        "gemma") else model.config.hidden_act, gram=True, scores=False, dense_target=True)
    with torch.no_grad(), hooks as stats:
        for part in range(2):  # two batches, each dense first (recording), then its pruned twin
            rows = slice(200 * part, 200 * (part + 1))
            stats.recording = True
            mlp(dense_x[rows])
            stats.recording = False
            mlp(pruned_x[rows])
    u, x = _rows(mlp, dense_x), _rows(mlp, pruned_x)
    weight = down.weight.detach().clone()
    # independent: weighted (post-norm: 1 / (mean(y^2) + the batch's median) of the dense output) ridge toward
    # W_K, by lstsq; the weights per batch of 200, as the hooks saw them
    w = torch.ones(len(u), dtype=torch.float64)
    if spec.post_norms is not None:
        with torch.no_grad():
            post = PostNormWeights(down, layer.get_submodule(spec.post_norms[1]))
            w = torch.cat([post.token_weights(u[:200]), post.token_weights(u[200:])]).double()
    kept = torch.arange(0, geom.intermediate, 2)
    errors = compensate.refit(down, stats.down_gram, kept, 0.01, False, stats.down_target)
    xw, target = x[:, kept] * w.sqrt()[:, None], (u @ weight.T) * w.sqrt()[:, None]
    lam = 0.01 * float((x.square() * w[:, None]).sum(0).mean())
    expected = _ridge(xw, target, weight[:, kept], lam, False)
    torch.testing.assert_close(down.weight[:, kept].detach(), expected, rtol=1e-6, atol=1e-8)
    assert float(down.weight.detach()[:, 1::2].abs().max()) == 0.0
    # the report's errors: relative to the dense output, before (columns dropped) and after the fit
    def err(wk):
        return float((((u @ weight.T) - x[:, kept] @ wk.T).square().sum(-1) * w).sum() /
                     ((u @ weight.T).square().sum(-1) * w).sum())
    assert errors["error_before"] == pytest.approx(err(weight[:, kept]), rel=1e-6)
    assert errors["error_after"] == pytest.approx(err(expected), rel=1e-5)
    assert errors["error_after"] < errors["error_before"]


def test_dense_target_in_the_engine_differs_only_under_sequential_statistics():
    dense = make_tiny("llama_gqa")
    cal = random_calibration(n=40, lo=30, hi=50)
    out = {}
    for target in ("pruned", "dense"):
        for sequential in (True, False):
            m = copy.deepcopy(dense)
            r = amp.prune_(m, amp.PruneConfig(ratio=0.3, criterion="amp", allocation="uniform", compensate="refit",
                                              refit_target=target, sequential=sequential), cal, progress=False)
            with torch.no_grad():
                out[target, sequential] = m(cal[0][None]).logits
            if sequential:
                assert r["compensation"]["target"].startswith("dense model" if target == "dense" else "this layer")
    # without sequential statistics the pruned model's input is the dense one: the same fit
    torch.testing.assert_close(out["dense", False], out["pruned", False])
    assert not torch.allclose(out["dense", True], out["pruned", True], atol=1e-4)
    with pytest.raises(amp.AmpError, match="refit-target"):
        amp.PruneConfig(ratio=0.3, refit_target="teacher")

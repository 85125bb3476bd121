"""Gemma's post-norms (issue 29): a block's MLP writes post_feedforward_layernorm(down_proj(a)), which divides each
token's output by its RMS. The Gram-based paths (structured OBS, the refit, the KL allocation's curves) must
measure the error there, where the residual stream sees it: on a layer where a few tokens' MLP outputs are hundreds
of times the typical one (as in Gemma-3-270M), an error measured before the norm is owned by those tokens, which the
norm scales back. Both checks failed before statistics.PostNormWeights: predicted / measured 0.003, and the choice
and refit made before the norm left 3.1x the error the residual stream sees that the weighted ones leave."""
import copy
from dataclasses import replace

import pytest
import torch

from amp.arch import Geometry, spec_for
from amp.prune import compensate
from amp.prune.obs import PathRequest, layer_paths
from amp.prune.statistics import TokenMask, statistics_hooks
from tiny_models import make_tiny

REMOVE = 24  # of 96 neurons


def _inputs(hidden: int, tokens: int = 2048, massive: float = 30.0, seed: int = 1):
    """MLP inputs: Gaussian tokens, 3 % of them scaled by `massive` (their GeGLU output grows about quadratically)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    x[torch.randperm(tokens, generator=g)[: tokens * 3 // 100]] *= massive
    return x


def _choose_and_refit(layer, spec, geom, x):
    """The engine's neuron choice (structured OBS) and down_proj refit for REMOVE neurons, from the statistics it
    gathers on `x`; returns (the pruned MLP, its predicted error summed over tokens, after the refit)."""
    layer = copy.deepcopy(layer)
    mlp, down = spec.get(layer, spec.mlp), spec.get(layer, spec.down)
    with torch.no_grad(), statistics_hooks(layer, spec, geom, TokenMask(), "gelu_pytorch_tanh", gram=True,
                                           gram_dtype=torch.float64, scores=False) as stats:
        mlp(x)
    stats.tokens = x.shape[0]
    request = PathRequest(choose=True, query=False, attention=1, neurons=REMOVE, refit=True, damp=0.01,
                          keep_gram=True)
    stats.o_gram = None
    _, neuron_scores, _, curve = _paths(layer, spec, geom, stats, request)
    kept = torch.sort(torch.argsort(neuron_scores, descending=True, stable=True)[: geom.intermediate - REMOVE]).values
    with torch.no_grad():
        compensate.refit(down, stats.down_gram, kept, 0.01, False)
    return mlp, curve[REMOVE] * x.shape[0]


def _paths(layer, spec, geom, stats, request):
    """layer_paths on the MLP alone (the attention's Gram is not gathered here)."""
    from amp.prune import obs
    real = obs._path
    calls = []

    def only_mlp(weight, gram, width, count, request, rows, order=None, **constraints):
        if gram is None:  # the attention: nothing to remove in this test
            calls.append("o")
            return obs.Path([], [0.0])
        return real(weight, gram, width, count, request, rows, order, **constraints)
    obs._path = only_mlp
    try:
        return layer_paths(layer, spec, geom, stats, request)
    finally:
        obs._path = real


def _written_error(layer, spec, pruned_mlp, x) -> float:
    """sum over tokens of ||post_norm(dense MLP(x)) - post_norm(pruned MLP(x))||^2: what the residual stream sees."""
    norm = layer.get_submodule(spec.post_norms[1])
    with torch.no_grad():
        dense = norm(spec.get(layer, spec.mlp)(x))
        pruned = norm(pruned_mlp(x))
    return float((dense - pruned).square().sum())


@pytest.mark.parametrize("family", ["gemma3_gqa", "gemma2_gqa"])
def test_post_norm_error_is_predicted_and_chosen_where_the_residual_stream_sees_it(family):
    model = make_tiny(family).double()
    spec, geom = spec_for(model), Geometry.from_config(model.config)
    assert spec.post_norms is not None
    layer = model.model.layers[1]
    x = _inputs(geom.hidden).double()

    mlp, predicted = _choose_and_refit(layer, spec, geom, x)
    measured = _written_error(layer, spec, mlp, x)
    # first order, the norm's radial part aside; the quiet-token bound (1 / (mean y^2 + the median's)) weighs a
    # typical token about half, the same for every layer of a model: 0.58 here (1.01 unbounded, 0.003 before norms)
    assert 0.5 < predicted / measured < 1.5, (predicted, measured)

    # what the engine did before: the same choice and refit from the error measured before the norm
    before_mlp, _ = _choose_and_refit(layer, replace(spec, post_norms=None), geom, x)
    before = _written_error(layer, spec, before_mlp, x)
    assert measured < 0.7 * before, (measured, before)


@pytest.mark.parametrize("family", ["gemma3_gqa", "gemma2_gqa"])
def test_quiet_tokens_do_not_own_the_post_norm_gram(family):
    """A token whose MLP writes almost nothing from ordinary activations (Gemma-3-270M's BOS in layers 5-17: the
    same state in every calibration window) has an unbounded first-order weight 1 / mean(y^2) after the norm,
    while its true error there is bounded (the norm's output has RMS 1). Unbounded, 64 copies of one such token
    among 2,048 held 99.9 % of the Gram's weight: its diagonal, and with it the damping, grew until the refit
    barely moved, and the prune left 1.19x the error on fresh tokens that the same prune without them leaves;
    bounded (statistics.PostNormWeights), their share is their count's and the error 1.01x."""
    from amp.prune.statistics import PostNormWeights
    model = make_tiny(family).double()
    spec, geom = spec_for(model), Geometry.from_config(model.config)
    layer = model.model.layers[1]
    mlp, down = spec.get(layer, spec.mlp), spec.get(layer, spec.down)
    x = 10 * _inputs(geom.hidden, massive=1.0).double()           # outputs of mean square ~0.07
    quiet = 10 * torch.randn(1, geom.hidden, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    calibration = torch.cat([x, quiet.expand(64, -1)])
    with torch.no_grad():  # down_proj writes nothing for the quiet token's (ordinary-sized) activations
        rows = torch.nn.functional.gelu(mlp.gate_proj(calibration), approximate="tanh") * mlp.up_proj(calibration)
        u = rows[-1:] / rows[-1].norm()
        down.weight -= (down.weight @ u.T) @ u
        w = PostNormWeights(down, layer.get_submodule(spec.post_norms[1])).token_weights(rows)
    assert float(w[-64:].sum() / w.sum()) < 0.1, float(w[-64:].sum() / w.sum())  # 64 of 2,112 tokens

    fresh = 10 * _inputs(geom.hidden, massive=1.0, seed=2).double()
    with_quiet, _ = _choose_and_refit(layer, spec, geom, calibration)
    without, _ = _choose_and_refit(layer, spec, geom, x)
    error, reference = _written_error(layer, spec, with_quiet, fresh), _written_error(layer, spec, without, fresh)
    assert error < 1.08 * reference, (error, reference)

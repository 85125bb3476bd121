"""benchmarks/kl_layers.py's own pieces: scaling one layer's error curves moves the kl allocation's budget off it
and is undone afterwards; its held-back divergence is zero for the dense model and the engine's measured one for
the pruned model."""
import copy

import pytest
import torch

import amp
from amp.prune import budget
from amp.quality.divergence import log_probs, mean_kl
from benchmarks.kl_layers import _scaled_curves
from conftest import random_calibration
from tiny_models import make_tiny


def _prune(model, held, scale=None, ratio=0.3):
    with _scaled_curves(scale):
        return amp.prune_(model, amp.PruneConfig(ratio=ratio, batch_size=3),
                          amp.Calibration("t", random_calibration(n=8), held_out=held), progress=False)


def test_a_scaled_layer_keeps_everything_and_the_budget_is_still_met():
    dense = make_tiny("llama_gqa")
    held = random_calibration(n=3, lo=12, hi=13, seed=7)
    n = len(dense.model.layers)
    original = budget.layer_blocks
    # a budget the other layer can meet alone (two layers here)
    report = _prune(copy.deepcopy(dense), held, [1e9] + [1.0] * (n - 1), ratio=0.1)
    assert budget.layer_blocks is original
    first = report["layers"][0]
    assert len(first["kept_heads"]) == dense.config.num_attention_heads
    assert len(first["kept_neurons"]) == dense.config.intermediate_size
    assert report["ratio_achieved"] == pytest.approx(0.1, abs=0.01)
    plain = _prune(copy.deepcopy(dense), held, ratio=0.1)
    # unscaled, the same budget takes neurons from layer 0 too: the scaling is what moved it
    assert len(plain["layers"][0]["kept_neurons"]) < dense.config.intermediate_size


def test_held_kl_is_zero_for_dense_and_the_engines_figure_for_the_pruned_model():
    dense = make_tiny("llama_gqa").eval()
    held = random_calibration(n=3, lo=12, hi=13, seed=7)  # windows of one length, as the benchmark's
    windows = torch.stack(held)
    dense_logp = [log_probs(dense, window) for window in windows]
    assert mean_kl(dense, windows, dense_logp) == pytest.approx(0.0, abs=1e-6)
    pruned = copy.deepcopy(dense)
    report = _prune(pruned, held)
    measured = report["allocation"]["heldout_kl"]["measured"]
    assert measured > 0
    assert mean_kl(pruned, windows, dense_logp) == pytest.approx(measured, rel=2e-3)

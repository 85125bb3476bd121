"""Pruning equals masking: a sliced model gives the logits of the original with the pruned heads' output-
projection columns and the pruned neurons' down-projection columns zeroed (an independent computation)."""
import copy

import pytest
import torch

import amp
from amp.arch import Geometry, spec_for
from conftest import random_calibration
from tiny_models import make_tiny


def masked_reference(original, report):
    """The original model with pruned structures zeroed at their only exit (o_proj / down_proj columns)."""
    ref = copy.deepcopy(original)
    spec, geom = spec_for(ref), Geometry.from_config(ref.config)
    with torch.no_grad():
        for layer, kept in zip(ref.model.layers, report["layers"]):
            gone_heads = sorted(set(range(geom.num_heads)) - set(kept["kept_heads"]))
            o = spec.get(layer, spec.o).weight.view(geom.hidden, geom.num_heads, geom.head_dim)
            o[:, gone_heads] = 0
            gone = sorted(set(range(geom.intermediate)) - set(kept["kept_neurons"]))
            spec.get(layer, spec.down).weight[:, gone] = 0
    return ref


@pytest.mark.parametrize("criterion,ratio", [("amp", 0.35), ("amp", 0.15), ("random", 0.45), ("magnitude", 0.3),
                                             ("reversed", 0.25), ("wanda-sp", 0.35)])
def test_pruned_logits_equal_masked_original(family, criterion, ratio):
    original = make_tiny(family)
    pruned = copy.deepcopy(original)
    report = amp.prune_(pruned, amp.PruneConfig(ratio=ratio, criterion=criterion, batch_size=3),
                        random_calibration(), progress=False)
    geom = Geometry.from_config(original.config)
    # Something was really removed, and heads went where the budget allowed it.
    assert report["params_after"] < report["params_before"]
    if ratio >= 0.35:
        assert report["per_layer"]["heads"][1] < geom.num_heads, "the budget should have removed heads"
    reference = masked_reference(original, report)
    ids = torch.randint(2, 258, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = pruned(ids).logits
        want = reference(ids).logits
        dense = original(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-4), "pruning changed nothing"

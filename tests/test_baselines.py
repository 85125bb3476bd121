"""The baseline criteria of the comparison: wanda-sp and flap, checked against their formulas computed directly
from activations captured on the dense model, and flap's bias compensation against its defining property."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import amp
from amp.arch import Geometry, spec_for
from amp.io.folders import save_pruned
from amp.prune import criteria
from conftest import random_calibration
from test_scores import captured_inputs
from tiny_models import make_tiny, tiny_tokenizer


def _direct(model, samples):
    spec, geom = spec_for(model), Geometry.from_config(model.config)
    o_in, down_in = captured_inputs(model, samples, spec.o), captured_inputs(model, samples, spec.down)
    weights = [(spec.get(layer, spec.o).weight.detach().double().clone(),
                spec.get(layer, spec.down).weight.detach().double().clone()) for layer in model.model.layers]
    return spec, geom, o_in, down_in, weights


@pytest.mark.parametrize("family", ["llama_gqa", "phi_mha", "phi3_gqa"])
def test_wanda_sp_scores_equal_formula(family):
    model = make_tiny(family)
    samples = random_calibration(n=5)
    spec, geom, o_in, down_in, weights = _direct(model, samples)
    report = amp.prune_(model, amp.PruneConfig(ratio=0.3, criterion="wanda-sp", batch_size=2, sequential=False), samples,
                        progress=False)
    for i, kept in enumerate(report["layers"]):
        w_o, w_down = weights[i]
        x, a = o_in[i].double(), down_in[i].double()
        # |W_ij| * ||x_j||_2, averaged over output rows, summed over a head's channels
        head = (w_o.abs() * x.norm(dim=0)).mean(0).view(geom.num_heads, geom.head_dim).sum(1)
        torch.testing.assert_close(torch.tensor(kept["head_scores"]), head.float(), rtol=1e-4, atol=1e-7)
        neuron = (w_down.abs() * a.norm(dim=0)).mean(0)
        want = criteria.keep_top(neuron.float(), len(kept["kept_neurons"]))
        assert kept["kept_neurons"] == want.tolist()


@pytest.mark.parametrize("family", ["llama_gqa", "phi_mha", "qwen2_gqa"])
def test_flap_scores_equal_formula(family):
    model = make_tiny(family)
    samples = random_calibration(n=5)
    spec, geom, o_in, down_in, weights = _direct(model, samples)
    report = amp.prune_(model, amp.PruneConfig(ratio=0.3, criterion="flap", batch_size=3, sequential=False), samples, progress=False)
    for i, kept in enumerate(report["layers"]):
        w_o, w_down = weights[i]
        x, a = o_in[i].double(), down_in[i].double()
        # sample variance of each input channel times the squared norm of its weight column
        head = (x.var(dim=0) * w_o.square().sum(0)).view(geom.num_heads, geom.head_dim).sum(1)
        torch.testing.assert_close(torch.tensor(kept["head_scores"]), head.float(), rtol=1e-4, atol=1e-7)
        neuron = a.var(dim=0) * w_down.square().sum(0)
        assert kept["kept_neurons"] == criteria.keep_top(neuron.float(), len(kept["kept_neurons"])).tolist()


@pytest.mark.parametrize("family", ["llama_gqa", "phi_mha"])
def test_flap_compensation_keeps_output_on_calibration_mean(family):
    model = make_tiny(family)
    samples = random_calibration(n=6)
    spec, geom, o_in, down_in, _ = _direct(model, samples)
    dense = copy.deepcopy(model)
    report = amp.prune_(model, amp.PruneConfig(ratio=0.35, criterion="flap", batch_size=2, sequential=False), samples,
                        progress=False)
    assert report["per_layer"]["heads"][1] < geom.num_heads
    for i, kept in enumerate(report["layers"]):
        d = geom.head_dim
        cols = torch.tensor([h * d + j for h in kept["kept_heads"] for j in range(d)])
        mean_x, mean_a = o_in[i].mean(0), down_in[i].mean(0)
        with torch.no_grad():
            before_o = spec.get(dense.model.layers[i], spec.o)(mean_x)
            after_o = spec.get(model.model.layers[i], spec.o)(mean_x[cols])
            before_d = spec.get(dense.model.layers[i], spec.down)(mean_a)
            after_d = spec.get(model.model.layers[i], spec.down)(mean_a[torch.tensor(kept["kept_neurons"])])
        torch.testing.assert_close(after_o, before_o, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(after_d, before_d, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama_gqa", "phi_mha", "mistral_gqa"])
def test_flap_result_loads_in_plain_transformers(family, tmp_path):
    model = make_tiny(family)
    report = amp.prune_(model, amp.PruneConfig(ratio=0.3, criterion="flap"), random_calibration(), progress=False)
    if family == "mistral_gqa":
        assert any("compensation was skipped" in n for n in report["notes"])
    elif family == "llama_gqa":
        assert model.config.attention_bias and model.config.mlp_bias
        assert bool(model.model.layers[0].mlp.down_proj.bias.abs().sum() > 0)
        assert bool(model.model.layers[0].self_attn.q_proj.bias.abs().sum() == 0)
    save_pruned(model, tiny_tokenizer(), report, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(2, 258, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)

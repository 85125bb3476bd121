"""Scores equal a direct computation from activations captured on the dense model; padding never counts."""
import copy
import inspect

import torch

import amp
from amp.prune import criteria
from amp.arch import Geometry, spec_for
from conftest import random_calibration
from tiny_models import make_tiny


def captured_inputs(model, samples, path):
    """Inputs of the module at `path` in every layer, one sample at a time, no padding anywhere."""
    got = {i: [] for i in range(model.config.num_hidden_layers)}
    handles = [layer.get_submodule(path).register_forward_pre_hook(
        lambda m, a, i=i: got[i].append(a[0].reshape(-1, a[0].shape[-1]).float()))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for s in samples:
            model(s[None])
    for h in handles:
        h.remove()
    return {i: torch.cat(v) for i, v in got.items()}


def test_head_and_neuron_scores_match_direct_computation(family):
    model = make_tiny(family)
    spec, geom = spec_for(model), Geometry.from_config(model.config)
    samples = random_calibration(n=5)
    o_in = captured_inputs(model, samples, spec.o)
    down_in = captured_inputs(model, samples, spec.down)
    w_o = [spec.get(layer, spec.o).weight.detach().clone() for layer in model.model.layers]
    # batch_size 2 pads every batch: padding must not change the scores.
    report = amp.prune_(model, amp.PruneConfig(ratio=0.3, batch_size=2, sequential=False, criterion="amp"), samples,
                        progress=False)
    n_tokens = sum(len(s) for s in samples)
    assert report["calibration"]["tokens"] == n_tokens
    for i, kept in enumerate(report["layers"]):
        x = o_in[i].view(n_tokens, geom.num_heads, geom.head_dim)
        w = w_o[i].view(geom.hidden, geom.num_heads, geom.head_dim)
        direct = torch.stack([(x[:, h] @ w[:, h].T).abs().sum(-1).mean() for h in range(geom.num_heads)])
        torch.testing.assert_close(torch.tensor(kept["head_scores"]), direct, rtol=1e-4, atol=1e-6)
        neuron = down_in[i].abs().mean(0)
        want = criteria.keep_top(neuron, len(kept["kept_neurons"]))
        assert kept["kept_neurons"] == want.tolist()
        groups = direct.view(geom.num_kv_heads, -1).sum(1)
        assert kept["kept_kv_heads"] == criteria.keep_top(groups, len(kept["kept_kv_heads"])).tolist()


def test_reversed_keeps_the_least_important():
    samples = random_calibration()
    # dense statistics: sequential ones would differ between the two after the first layer
    a = amp.prune_(make_tiny("llama_mha"), amp.PruneConfig(ratio=0.35, sequential=False), samples, progress=False)
    r = amp.prune_(make_tiny("llama_mha"), amp.PruneConfig(ratio=0.35, criterion="reversed", sequential=False),
                   samples, progress=False)
    for la, lr in zip(a["layers"], r["layers"]):
        scores = torch.tensor(la["head_scores"])
        gone_amp = sorted(set(range(len(scores))) - set(la["kept_heads"]))
        gone_rev = sorted(set(range(len(scores))) - set(lr["kept_heads"]))
        assert gone_amp and len(gone_amp) == len(gone_rev)
        assert scores[gone_amp].max() <= scores[la["kept_heads"]].min()   # amp drops the lowest
        assert scores[gone_rev].min() >= scores[lr["kept_heads"]].max()   # reversed drops the highest


def test_same_seed_same_keep_sets_and_other_seed_differs():
    def run(seed, criterion="random"):
        return amp.prune_(make_tiny("llama_gqa"), amp.PruneConfig(ratio=0.3, criterion=criterion, seed=seed),
                          random_calibration(), progress=False)["layers"]
    assert run(5) == run(5)
    assert [layer["kept_neurons"] for layer in run(5)] != [layer["kept_neurons"] for layer in run(6)]
    assert run(0, "amp") == run(0, "amp")


def test_magnitude_needs_no_data_and_matches_weight_norms():
    model = make_tiny("llama_mha")
    layer0 = copy.deepcopy(model.model.layers[0])
    d, h = model.config.head_dim, model.config.num_attention_heads
    report = amp.prune_(model, amp.PruneConfig(ratio=0.3, criterion="magnitude"), None, progress=False)
    assert report["calibration"]["tokens"] == 0
    q = layer0.self_attn.q_proj.weight.view(h, d, -1)
    o = layer0.self_attn.o_proj.weight.view(-1, h, d)
    direct = (q.square().sum((1, 2)) + o.square().sum((0, 2))).sqrt()
    torch.testing.assert_close(torch.tensor(report["layers"][0]["head_scores"]), direct.detach(), rtol=1e-5,
                               atol=1e-6)


def test_fused_mlp_statistics_equal_the_hook_path(family):
    """Calibration gathers neuron statistics inside the fused activation kernel; the plain down-proj hook
    (used for activations the kernels do not cover) must agree, and so must the layer's outputs."""
    from amp.prune.statistics import TokenMask, statistics_hooks
    from amp.runtime.fused import fused_activation
    model = make_tiny(family)
    spec, geom = spec_for(model), Geometry.from_config(model.config)
    layer = model.model.layers[0]
    x = torch.randn(3, 11, geom.hidden, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 3:] = False
    position_ids = torch.arange(11)[None]
    rotary = model.model.rotary_emb
    emb = rotary(x, position_ids, "full_attention") if "layer_type" in inspect.signature(rotary.forward).parameters \
        else rotary(x, position_ids)
    act = getattr(model.config, spec.act_key)
    assert fused_activation(spec.gated, act) is not None, f"{act}: no fused kernel, so nothing to compare"
    with torch.no_grad():
        results = []
        for act in (act, None):
            token_mask = TokenMask()
            token_mask.set(mask)
            with statistics_hooks(layer, spec, geom, token_mask, act) as stats:
                out = layer(x, position_embeddings=emb, position_ids=position_ids)
            results.append((stats, out[0] if isinstance(out, tuple) else out))
    (fused, out_f), (hooked, out_h) = results
    assert fused.tokens == hooked.tokens == int(mask.sum())
    torch.testing.assert_close(fused.neuron_abs, hooked.neuron_abs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.head_l1, hooked.head_l1)
    torch.testing.assert_close(out_f[mask], out_h[mask], rtol=1e-5, atol=1e-6)
    assert "forward" not in vars(spec.get(layer, spec.mlp)), "the MLP forward was not restored"

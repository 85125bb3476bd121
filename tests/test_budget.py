"""Budget accounting, uniform allocation and grouped-query consistency."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import amp
from amp.arch import Geometry
from tiny_models import make_tiny


def smollm2_shaped(layers=30):
    """SmolLM2-135M's exact shapes, random weights on the meta device (no memory, no data)."""
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_smollm2_shapes_have_the_real_parameter_count():
    assert sum(p.numel() for p in smollm2_shaped().parameters()) == 134_515_008


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.4, 0.5])
def test_achieved_ratio_within_half_a_point_on_smollm2_shapes(ratio):
    model = smollm2_shaped()
    report = amp.prune_(model, amp.PruneConfig(ratio=ratio, criterion="random"), progress=False)
    assert abs(report["ratio_achieved"] - ratio) < 0.005
    assert report["params_after"] == sum(p.numel() for p in model.parameters())
    g = Geometry.from_config(model.config)
    assert g.num_heads % g.num_kv_heads == 0 and g.num_heads >= 3 and g.intermediate >= 1
    # Every layer has the same, config-consistent shape: GQA groups stay whole.
    for layer in model.model.layers:
        assert layer.self_attn.q_proj.out_features == g.num_heads * 64
        assert layer.self_attn.k_proj.out_features == g.num_kv_heads * 64
        assert layer.self_attn.o_proj.in_features == g.num_heads * 64
        assert layer.mlp.down_proj.in_features == g.intermediate
    for kept in report["layers"]:
        heads, groups = kept["kept_heads"], kept["kept_kv_heads"]
        assert heads == [k * 3 + j for k in groups for j in range(3)]


def test_iteration_removes_that_many_layers_worth():
    model = smollm2_shaped()
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    report = amp.prune_(model, amp.PruneConfig(iteration=4, criterion="random", mlp_multiple_of=1), progress=False)
    removed = report["params_before"] - report["params_after"]
    assert abs(removed - 4 * per_layer) < 0.005 * report["params_before"]
    # with the default widths (multiples llama.cpp's blocks keep, where the budget still lands)
    rounded = amp.prune_(smollm2_shaped(), amp.PruneConfig(iteration=4, criterion="random"), progress=False)
    multiple = rounded["allocation"].get("mlp_multiple_of", 1)
    assert all(len(layer["kept_neurons"]) % multiple == 0 for layer in rounded["layers"])
    assert abs(rounded["params_before"] - rounded["params_after"] - 4 * per_layer) < 0.005 * rounded["params_before"]


def test_mha_prunes_single_heads_and_never_empties_a_layer():
    model = make_tiny("llama_mha")
    report = amp.prune_(model, amp.PruneConfig(ratio=0.6, criterion="random"), progress=False)
    assert report["per_layer"]["attention_unit"] == "head"
    assert 1 <= report["per_layer"]["heads"][1] < 6
    assert report["per_layer"]["heads"][1] == report["per_layer"]["kv_heads"][1]
    assert report["per_layer"]["neurons"][1] >= 1


def test_ratio_that_would_empty_layers_is_refused():
    with pytest.raises(amp.AmpError, match="empty"):
        amp.prune_(make_tiny("llama_gqa"), amp.PruneConfig(ratio=0.95, criterion="random"), progress=False)


@pytest.mark.parametrize("kwargs", [dict(ratio=0.0), dict(ratio=1.0), dict(ratio=-0.2), dict(),
                                    dict(ratio=0.2, iteration=1), dict(ratio=0.2, criterion="nope"),
                                    dict(iteration=0), dict(ratio=0.2, device="tpu")])
def test_bad_configs_are_refused(kwargs):
    with pytest.raises(amp.AmpError):
        amp.PruneConfig(**kwargs)

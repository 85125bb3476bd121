"""The 2026 families beyond what the family-parametrized tests cover: Gemma's sliding-window layers calibrated
with their own masks, head_dim != hidden / heads, and families the engine refuses with a reason."""
import json

import pytest
import torch

import amp
from amp.arch import Geometry, spec_for
from amp.io.calibration import make_batches
from amp.io.sources import ModelSource
from amp.prune.capture import capture_layer_inputs
from amp.io.activations import ActivationStore
from test_cli import assert_clean_failure, run_cli
from test_scores import captured_inputs
from tiny_models import make_tiny, save_tiny


def _long_samples(n=4, length=27, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 258, (length - i,), generator=g) for i in range(n)]


@pytest.mark.parametrize("family", ["gemma2_gqa", "gemma3_gqa"])
def test_gemma_layers_are_calibrated_with_their_own_window(family):
    """Calibration windows longer than the sliding window: every layer's head scores equal a direct computation on
    the model's own forward (which gives sliding and global layers their own masks, and Gemma 3 its own rotary
    tables per kind), and the captured inputs hold one set of arguments per kind of layer."""
    model = make_tiny(family)
    window, kinds = model.config.sliding_window, model.config.layer_types
    samples = _long_samples()
    assert min(len(s) for s in samples) > 2 * window and len(set(kinds)) == 2
    batches = make_batches(samples, 2, 0)
    shapes = [(ids.shape[0], ids.shape[1], model.config.hidden_size) for ids, _ in batches]
    store = ActivationStore(shapes, torch.float32, "host", torch.device("cpu"))
    inputs = capture_layer_inputs(ModelSource(model), batches, torch.device("cpu"), torch.float32, store, "cpu")
    for b in range(len(inputs)):
        assert inputs.of_layer[b] == [kinds.index(k) if kinds[0] != k else 0 for k in kinds] or \
            len(set(inputs.of_layer[b])) == 2
        assert len(inputs.variants[b]) == 2  # one per kind of layer, shared by the layers of that kind
    spec, geom = spec_for(model), Geometry.from_config(model.config)
    o_in = captured_inputs(model, samples, spec.o)
    w_o = [spec.get(layer, spec.o).weight.detach().clone() for layer in model.model.layers]
    report = amp.prune_(model, amp.PruneConfig(ratio=0.3, batch_size=2, sequential=False, criterion="amp"), samples,
                        progress=False)
    n_tokens = sum(len(s) for s in samples)
    for i, kept in enumerate(report["layers"]):
        x = o_in[i].view(n_tokens, geom.num_heads, geom.head_dim)
        w = w_o[i].view(geom.hidden, geom.num_heads, geom.head_dim)
        direct = torch.stack([(x[:, h] @ w[:, h].T).abs().sum(-1).mean() for h in range(geom.num_heads)])
        torch.testing.assert_close(torch.tensor(kept["head_scores"]), direct, rtol=1e-4, atol=1e-6)


def test_qwen3_head_dim_is_not_hidden_over_heads(tmp_path):
    model = make_tiny("qwen3_gqa")
    assert model.config.head_dim * model.config.num_attention_heads != model.config.hidden_size
    report = amp.prune_(model, amp.PruneConfig(ratio=0.35, batch_size=3), _long_samples(), progress=False)
    assert report["per_layer"]["head_dim"] == 16 and report["per_layer"]["heads"][1] < 6
    layer = model.model.layers[0].self_attn
    assert layer.q_proj.out_features == report["per_layer"]["heads"][1] * 16
    assert layer.q_norm.weight.shape == (16,)  # shared by every head: kept whole


def test_olmo2_is_refused_with_the_reason(tmp_path, capsys):
    from transformers import Olmo2Config, Olmo2ForCausalLM
    config = Olmo2Config(vocab_size=258, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    folder = save_tiny(Olmo2ForCausalLM(config), tmp_path / "olmo2")
    code, _, err = run_cli(capsys, "prune", folder, "--ratio", 0.2, "--out", tmp_path / "out", "--quiet")
    assert_clean_failure(code, err, tmp_path / "out")
    assert "Olmo2ForCausalLM cannot be pruned" in err and "over all heads" in err
    with pytest.raises(amp.AmpError, match="all heads together"):
        amp.prune_(Olmo2ForCausalLM(config), amp.PruneConfig(ratio=0.2, criterion="magnitude"), progress=False)


def test_supported_lists_the_new_families():
    for cls in ("Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "MixtralForCausalLM",
                "Qwen3MoeForCausalLM"):
        assert cls in amp.SUPPORTED
    assert "Olmo2ForCausalLM" not in amp.SUPPORTED
    assert json.dumps(list(amp.SUPPORTED))


@pytest.mark.parametrize("family", ["qwen3_gqa", "gemma2_gqa", "gemma3_gqa"])
def test_recovery_runs_and_merges_exactly(family):
    """LoRA on the new dense families (Gemma 2's soft-capped eager attention included): the loss is finite, the
    merged model equals the adapted one."""
    model = make_tiny(family)
    amp.prune_(model, amp.PruneConfig(ratio=0.3, heads="query", allocation="depth", batch_size=3), _long_samples(),
               progress=False)
    result = amp.recover_model(model, None, amp.RecoverConfig(steps=3, batch_size=2, lr=1e-3),
                               samples=_long_samples(6, 20), progress=False)
    assert result["steps"] == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result["history"])
    assert result["merge_max_abs_diff"] < 1e-4

"""A pruned folder loads in vanilla transformers, gives the same logits, and generates."""
import copy
import json

import torch
from transformers import AutoModelForCausalLM

import amp
from amp.io.folders import save_pruned
from conftest import random_calibration
from tiny_models import make_tiny, tiny_tokenizer


def test_saved_pruned_model_reloads_with_same_logits(family, tmp_path):
    model = make_tiny(family)
    report = amp.prune_(model, amp.PruneConfig(ratio=0.4, batch_size=2), random_calibration(), progress=False)
    out = tmp_path / "pruned"
    save_pruned(model, tiny_tokenizer(), report, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no custom code
    assert type(reloaded) is type(model)
    ids = torch.randint(2, 258, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
        generated = reloaded.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 18)
    saved = json.loads((out / "amp_report.json").read_text())
    assert saved["params_after"] == sum(p.numel() for p in reloaded.parameters())
    assert len(saved["layers"]) == model.config.num_hidden_layers


def test_load_pruned_returns_report(tmp_path):
    model = make_tiny("llama_gqa")
    report = amp.prune_(copy.deepcopy(model), amp.PruneConfig(ratio=0.3, criterion="magnitude"), progress=False)
    pruned = copy.deepcopy(model)
    amp.prune_(pruned, amp.PruneConfig(ratio=0.3, criterion="magnitude"), progress=False)
    save_pruned(pruned, tiny_tokenizer(), report, tmp_path / "m")
    loaded, tok, rep = amp.load_pruned(tmp_path / "m")
    assert rep["layers"] == report["layers"] and tok is not None
    assert loaded.config.intermediate_size == report["per_layer"]["neurons"][1]

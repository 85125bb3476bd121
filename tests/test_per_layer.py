"""Per-layer budgets and single query heads: exact against the masked original, exact budgets, checkpoints with
per-layer shapes that load (from_pretrained after `import amp`, load_pruned, amp eval, generate with a cache)."""
import copy
import dataclasses
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import amp
from amp.prune import budget
from amp.runtime import per_layer
from conftest import random_calibration
from test_cli import assert_clean_failure, run_cli
from test_exactness import masked_reference
from test_budget import smollm2_shaped
from tiny_models import make_tiny, save_tiny

MODES = [("uniform", "query"), ("depth", "query"), ("depth", "group"), ("sensitivity", "query"),
         ("sensitivity", "group")]
TEXT_CALIB = dict(calib="wikitext2", nsamples=4, seqlen=32, batch_size=3)


def _ids(b=2, t=11, seed=1):
    return torch.randint(2, 258, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("allocation,heads", MODES)
def test_per_layer_pruning_equals_masked_original(family, allocation, heads):
    original = make_tiny(family)
    pruned = copy.deepcopy(original)
    report = amp.prune_(pruned, amp.PruneConfig(ratio=0.35, allocation=allocation, heads=heads, batch_size=3),
                        random_calibration(), progress=False)
    assert abs(report["ratio_achieved"] - 0.35) < 0.005
    assert report["allocation"]["method"] == allocation and report["allocation"]["heads"] == heads
    for layer in report["layers"]:  # no layer emptied, maps consistent with the kept sets
        assert layer["kept_heads"] and layer["kept_neurons"]
        assert len(layer["head_map"]) == len(layer["kept_heads"])
        assert sorted(set(layer["head_map"])) == list(range(len(layer["kept_kv_heads"])))
    with torch.no_grad():
        got, want = pruned(_ids()).logits, masked_reference(original, report)(_ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_query_heads_leave_uneven_groups_and_kv_heads_go_with_their_last_query_head():
    model = make_tiny("llama_gqa")  # 8 query heads on 4 KV heads
    report = amp.prune_(model, amp.PruneConfig(ratio=0.3, heads="query"), random_calibration(), progress=False)
    for layer in report["layers"]:
        groups = {h // 2 for h in layer["kept_heads"]}
        assert sorted(groups) == layer["kept_kv_heads"]  # a KV head stays exactly while a query head uses it
    sizes = [sorted(layer["head_map"].count(g) for g in set(layer["head_map"])) for layer in report["layers"]]
    assert any(len(set(s)) > 1 for s in sizes), f"expected uneven groups, got {sizes}"
    assert model.config._attn_implementation == "amp_indexed"
    twin = copy.deepcopy(model)  # per-layer config views survive a copy
    with torch.no_grad():
        torch.testing.assert_close(twin(_ids()).logits, model(_ids()).logits)


def test_depth_allocation_removes_more_from_later_layers():
    model = smollm2_shaped(layers=12)
    report = amp.prune_(model, amp.PruneConfig(ratio=0.3, criterion="random", allocation="depth"), progress=False)
    kept = [len(layer["kept_neurons"]) + 100 * len(layer["kept_heads"]) for layer in report["layers"]]
    assert kept[0] > kept[5] > kept[-1]
    targets = report["allocation"]["layer_targets"]
    assert targets == sorted(targets) and targets[-1] > 2 * targets[0]


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.4, 0.5])
@pytest.mark.parametrize("allocation,heads", [("depth", "query"), ("uniform", "query"), ("depth", "group")])
def test_budget_exact_on_smollm2_shapes(ratio, allocation, heads):
    model = smollm2_shaped()
    report = amp.prune_(model, amp.PruneConfig(ratio=ratio, criterion="random", allocation=allocation, heads=heads,
                                               mlp_multiple_of=1), progress=False)
    assert abs(report["ratio_achieved"] - ratio) < 0.005
    assert report["params_after"] == sum(p.numel() for p in model.parameters())
    # the default widths (multiples llama.cpp's blocks keep): the coarsest whose budget still lands
    model = smollm2_shaped()
    report = amp.prune_(model, amp.PruneConfig(ratio=ratio, criterion="random", allocation=allocation, heads=heads),
                        progress=False)
    multiple = report["allocation"].get("mlp_multiple_of", 1)
    assert all(len(layer["kept_neurons"]) % multiple == 0 for layer in report["layers"])
    assert abs(report["ratio_achieved"] - ratio) <= 0.005


def test_solver_budget_is_exact_for_random_scores_and_shapes():
    """Property-style: random block shapes, costs and error curves; the solver frees the budget to within one
    neuron (or one attention step where no MLP can give back), never passes a floor, never empties a block."""
    rng = random.Random(0)
    for trial in range(200):
        blocks = []
        for layer in range(rng.randint(1, 6)):
            heads, neurons = rng.randint(1, 12), rng.randint(2, 300)
            qc, nc = rng.randint(10, 200), rng.randint(1, 50)
            floor_h, floor_n = rng.randint(1, heads), rng.randint(1, neurons)
            attn_err = sorted(rng.random() for _ in range(heads - floor_h))
            mlp_err = sorted(rng.random() for _ in range(neurons - floor_n))
            blocks.append(budget.Block(layer, "attention", [k * qc for k in range(heads - floor_h + 1)],
                                       [0.0] + attn_err, 1))
            blocks.append(budget.Block(layer, "mlp", [k * nc for k in range(neurons - floor_n + 1)],
                                       [0.0] + mlp_err, max(1, neurons // 64)))
        capacity = sum(b.params[-1] for b in blocks)
        target = rng.randint(0, capacity)
        freed = budget.solve(blocks, target)
        assert freed == sum(b.params[b.removed] for b in blocks)
        assert all(0 <= b.removed <= b.max_remove for b in blocks)
        step = max((b.params[1] for b in blocks if b.max_remove), default=0)  # one neuron or one attention step
        assert target <= freed <= target + step, (trial, target, freed)
    with pytest.raises(amp.AmpError, match="min-keep"):
        budget.solve([budget.Block(0, "mlp", [0, 5, 10], [0.0, 0.1, 0.2])], 11)


# ---- checkpoints with per-layer shapes ----------------------------------------------------------------------



@pytest.mark.parametrize("family", ["llama_gqa", "qwen2_gqa", "phi3_gqa", "phi_mha", "qwen3_gqa", "gemma2_gqa",
                                    "gemma3_gqa"])
def test_heterogeneous_checkpoint_round_trip(family, tmp_path, data_dir):
    src = save_tiny(make_tiny(family), tmp_path / "dense")
    config = amp.PruneConfig(ratio=0.3, allocation="sensitivity", heads="query", **TEXT_CALIB)
    report = amp.prune_checkpoint(str(src), config, tmp_path / "stream", data_dir=data_dir, progress=False)
    memory = amp.prune_checkpoint(str(src), dataclasses.replace(config, stream=False),
                                  tmp_path / "memory", data_dir=data_dir, progress=False)
    assert [l["kept_heads"] for l in report["layers"]] == [l["kept_heads"] for l in memory["layers"]]
    saved = json.loads((tmp_path / "stream" / "config.json").read_text())
    shapes = [(len(l["kept_heads"]), len(l["kept_kv_heads"]), len(l["kept_neurons"])) for l in report["layers"]]
    if len(set(shapes)) > 1 or any(per_layer.is_uneven({"num_attention_heads": a, "num_key_value_heads": b,
                                                            "head_map": l["head_map"]})
                                   for (a, b, _), l in zip(shapes, report["layers"])):
        assert [(e["num_attention_heads"], e["num_key_value_heads"], e["intermediate_size"])
                for e in saved[per_layer.KEY]] == shapes
    ids = _ids()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    pruned, _, rep = amp.load_pruned(tmp_path / "memory")
    assert sum(p.numel() for p in loaded.parameters()) == report["params_after"] == rep["params_after"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, pruned(ids).logits, rtol=1e-5, atol=1e-5)
        # generate with the KV cache equals a greedy recomputation over the whole sequence each step
        loaded.generation_config.eos_token_id = None  # no early stop: compare all five steps
        cached = loaded.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        seq = ids
        for _ in range(5):
            nxt = loaded(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)
    # ... and through the fused path (accelerate_) too
    amp.accelerate_(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, pruned(ids).logits, rtol=1e-5, atol=1e-5)
    amp.accelerate_(loaded, enable=False)
    assert loaded.config._attn_implementation in ("sdpa", "eager", "amp_indexed")  # Gemma 2 loads eager


def test_amp_eval_and_info_on_a_heterogeneous_checkpoint(tmp_path, data_dir, capsys):
    src = save_tiny(make_tiny("llama_gqa"), tmp_path / "dense")
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(capsys, "prune", src, "--ratio", 0.3, "--out", out, "--allocation", "depth",
                                "--heads", "query", "--calib", "wikitext2", "--data-dir", data_dir,
                                "--nsamples", 4, "--seqlen", 32, "--quiet")
    assert code == 0, err
    assert "per layer (depth, query heads)" in stdout
    assert per_layer.KEY in json.loads((out / "config.json").read_text())
    code, stdout, _ = run_cli(capsys, "info", out)
    assert code == 0 and "per layer (query heads/kv heads/neurons)" in stdout
    # every layer counted with its own sizes, not layer 0's times the layer count
    model, _, report = amp.load_pruned(out)
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    assert min(sizes) < max(sizes)
    assert f"per decoder layer {min(sizes):,} to {max(sizes):,}" in stdout
    assert f"decoder layers {sum(sizes) / report['params_after']:.1%} of the total" in stdout
    from test_evaluate import ROWS
    small = tmp_path / "data"
    (small / "tasks").mkdir(parents=True)
    (small / "text").mkdir()
    (small / "tasks" / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS["piqa"]))
    (small / "text" / "wikitext2_test.txt").write_text(" = Heading = \n Some words about a game .\n" * 20)
    result = amp.evaluate(out, tasks=["piqa"], ppl=["wikitext2"], seqlen=64, data_dir=small, progress=False)
    assert result["perplexity"]["wikitext2@64"] > 1 and result["tasks"]["piqa"]["n"] == 3


def test_a_uniform_group_prune_stays_a_plain_config(tmp_path, data_dir):
    src = save_tiny(make_tiny("mistral_gqa"), tmp_path / "dense")
    amp.prune_checkpoint(str(src), amp.PruneConfig(ratio=0.3, allocation="uniform", **TEXT_CALIB), tmp_path / "out",
                         data_dir=data_dir,
                         progress=False)
    assert per_layer.KEY not in json.loads((tmp_path / "out" / "config.json").read_text())


# ---- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,expected", [
    (["--allocation", "owl"], "invalid choice"), (["--heads", "single"], "invalid choice"),
    (["--allocation", "depth", "--min-keep", "0.95"], "min-keep"),
    (["--allocation", "depth", "--depth-range", "1"], "--depth-range"),
])
def test_bad_allocation_input(argv, expected, tiny_llama_dir, tmp_path, capsys, data_dir):
    out = tmp_path / "pruned"
    code, _, err = run_cli(capsys, "prune", tiny_llama_dir, "--ratio", 0.5, "--out", out, "--calib", "wikitext2",
                           "--data-dir", data_dir, "--nsamples", 4, "--seqlen", 32, "--quiet", *argv)
    assert_clean_failure(code, err, out)
    assert expected in err


@pytest.fixture
def hetero_dir(tmp_path):
    model = make_tiny("llama_gqa")
    amp.prune_(model, amp.PruneConfig(ratio=0.3, allocation="depth", heads="query"), random_calibration(),
               progress=False)
    assert per_layer.entries(model.config)
    return save_tiny(model, tmp_path / "hetero")


def test_per_layer_entries_that_disagree_with_the_tensors(hetero_dir, capsys):
    config = json.loads((hetero_dir / "config.json").read_text())
    config[per_layer.KEY][1]["intermediate_size"] += 3
    (hetero_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(amp.AmpError, match=r"layer 1: model\.layers\.1\.mlp\.\w+_proj\.weight is"):
        amp.load_pruned(hetero_dir)
    code, _, err = run_cli(capsys, "eval", hetero_dir, "--ppl", "none", "--tasks", "piqa", "--quiet")
    assert_clean_failure(code, err, None)
    assert "layer 1" in err


def test_a_transformers_too_old_for_per_layer_checkpoints(hetero_dir, monkeypatch):
    import transformers
    monkeypatch.setattr(transformers, "__version__", "4.40.0")
    with pytest.raises(amp.AmpError, match=r"needs transformers >= 4\.57.*found 4\.40\.0"):
        amp.load_pruned(hetero_dir)


def test_uniform_prune_from_30_percent_points_to_the_kl_allocation():
    hint = "consider the default allocation (kl"
    notes = {r: amp.prune_(make_tiny("llama_mha"), amp.PruneConfig(ratio=r, allocation="uniform"),
                           random_calibration(n=4), progress=False)["notes"] for r in (0.2, 0.3)}
    assert not any(hint in n for n in notes[0.2]) and any(hint in n for n in notes[0.3])
    default = amp.prune_(make_tiny("llama_mha"), amp.PruneConfig(ratio=0.3), random_calibration(n=12), progress=False)
    assert default["allocation"]["method"] == "kl" and not any(hint in n for n in default["notes"])


def test_auto_allocation_without_windows_to_hold_back_is_uniform_and_says_so():
    report = amp.prune_(make_tiny("llama_gqa"), amp.PruneConfig(ratio=0.3), random_calibration(n=8), progress=False)
    assert report["allocation"]["method"] == "uniform" and report["criterion"] == "obs"
    assert any("allocation auto: 8 calibration samples leave none to hold back" in n for n in report["notes"])
    with pytest.raises(amp.AmpError, match="holds back 8 calibration samples"):  # asked for by name: refused
        amp.prune_(make_tiny("llama_gqa"), amp.PruneConfig(ratio=0.3, allocation="kl"), random_calibration(n=8),
                   progress=False)
    assert amp.PruneConfig(ratio=0.3, criterion="magnitude").allocation == "uniform"


# ---- --multiple-of: widths that tile well ---------------------------------------------------------------


@pytest.mark.parametrize("multiple_of", [64, 128])
@pytest.mark.parametrize("allocation,heads", [("uniform", "group"), ("uniform", "query"), ("depth", "query")])
def test_multiple_of_rounds_widths_and_keeps_the_budget_to_the_rounding(multiple_of, allocation, heads):
    model = smollm2_shaped()
    report = amp.prune_(model, amp.PruneConfig(ratio=0.2, criterion="random", allocation=allocation, heads=heads,
                                               multiple_of=multiple_of), progress=False)
    d, layers = 64, report["layers"]
    for layer in layers:
        assert len(layer["kept_neurons"]) % multiple_of == 0
        assert (len(layer["kept_heads"]) * d) % multiple_of == 0
    # the achieved ratio is as close as the rounding allows: a step of multiple_of neurons (3 x 576 parameters
    # each) per layer; uniform layers all round alike (half a step each), per-layer budgets carry the remainder on
    step = multiple_of * 3 * 576 / report["params_before"]
    slack = len(layers) * step / 2 if allocation == "uniform" else step
    assert abs(report["ratio_achieved"] - 0.2) <= slack + 0.005
    assert report["allocation"]["multiple_of"] == multiple_of
    assert report["params_after"] == sum(p.numel() for p in model.parameters())


def test_multiple_of_prune_equals_masked_original(tmp_path, data_dir, capsys):
    original = make_tiny("llama_gqa")
    pruned = copy.deepcopy(original)
    report = amp.prune_(pruned, amp.PruneConfig(ratio=0.35, allocation="depth", heads="query", multiple_of=16,
                                                batch_size=3), random_calibration(), progress=False)
    assert all(len(e["kept_neurons"]) % 16 == 0 and len(e["kept_heads"]) * 8 % 16 == 0 for e in report["layers"])
    with torch.no_grad():
        torch.testing.assert_close(pruned(_ids()).logits, masked_reference(original, report)(_ids()).logits,
                                   rtol=1e-4, atol=1e-5)
    src = save_tiny(make_tiny("llama_gqa"), tmp_path / "dense")
    code, stdout, err = run_cli(capsys, "prune", src, "--ratio", 0.3, "--multiple-of", 32, "--out", tmp_path / "o",
                                "--calib", "wikitext2", "--nsamples", 4, "--seqlen", 32, "--data-dir", data_dir,
                                "--quiet")
    assert code == 0, err
    rep = json.loads((tmp_path / "o" / "amp_report.json").read_text())
    assert all(len(e["kept_neurons"]) % 32 == 0 for e in rep["layers"])
    code, _, err = run_cli(capsys, "prune", src, "--ratio", 0.3, "--multiple-of", 0, "--out", tmp_path / "bad",
                           "--quiet")
    assert_clean_failure(code, err, tmp_path / "bad")

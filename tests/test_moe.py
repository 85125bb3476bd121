"""Mixture-of-experts models (Mixtral, Qwen3-MoE): experts and expert neurons pruned exactly against the masked
original (removed experts at -inf in the router before the softmax and top-k, removed expert neurons zeroed at
the down projection, heads and dense neurons zeroed as for dense models), streamed from Hub checkpoints that store
every expert on its own, written back in that layout, and run everywhere the dense families run."""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import amp
from amp.arch import Geometry, spec_for
from test_cli import assert_clean_failure, run_cli
from tiny_models import MOE_FAMILIES, make_tiny, save_tiny

TEXT_CALIB = dict(calib="wikitext2", nsamples=4, seqlen=32, batch_size=3)


def _calibration(n=8, length=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 258, (length - i,), generator=g) for i in range(n)]


def _ids(b=2, t=13, seed=1):
    return torch.randint(2, 258, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=sorted(MOE_FAMILIES))
def moe_family(request):
    return request.param


def _masked_router(router, removed: list[int], renormalize: bool):
    """Routing with some experts removed: their logits at -inf before the softmax and the top-k (written out
    here from the families' definitions, independently of the engine)."""
    def forward(hidden_states):
        h = hidden_states.reshape(-1, router.weight.shape[1])
        logits = F.linear(h, router.weight)
        logits[:, removed] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, index = torch.topk(probs, router.top_k, dim=-1)
        if renormalize:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), index
    return forward


def masked_reference(original, report):
    ref = copy.deepcopy(original)
    spec, geom = spec_for(ref), Geometry.from_config(ref.config, spec_for(ref))
    renormalize = type(ref).__name__ == "MixtralForCausalLM" or bool(getattr(ref.config, "norm_topk_prob", False))
    with torch.no_grad():
        for layer, kept in zip(ref.model.layers, report["layers"]):
            gone_heads = sorted(set(range(geom.num_heads)) - set(kept["kept_heads"]))
            o = spec.get(layer, spec.o).weight.view(geom.hidden, geom.num_heads, geom.head_dim)
            o[:, gone_heads] = 0
            if "kept_neurons" in kept:  # a dense layer of a MoE model
                gone = sorted(set(range(geom.intermediate)) - set(kept["kept_neurons"]))
                spec.get(layer, spec.down).weight[:, gone] = 0
                continue
            router, experts = layer.mlp.gate, layer.mlp.experts
            removed = sorted(set(range(geom.num_experts)) - set(kept["kept_experts"]))
            router.forward = _masked_router(router, removed, renormalize)
            for e, neurons in zip(kept["kept_experts"], kept["kept_expert_neurons"]):
                gone = sorted(set(range(geom.expert_intermediate)) - set(neurons))
                experts.down_proj[e][:, gone] = 0
    return ref


@pytest.mark.parametrize("moe", ["auto", "experts", "neurons"])
@pytest.mark.parametrize("allocation,heads", [("uniform", "group"), ("depth", "query"), ("sensitivity", "group"),
                                              ("sensitivity", "query")])
def test_moe_pruning_equals_masked_original(moe_family, moe, allocation, heads):
    original = make_tiny(moe_family)
    pruned = copy.deepcopy(original)
    report = amp.prune_(pruned, amp.PruneConfig(ratio=0.3, allocation=allocation, heads=heads, moe=moe,
                                                criterion="amp", batch_size=3), _calibration(), progress=False)
    geom = Geometry.from_config(original.config, spec_for(original))
    sparse = [e for e in report["layers"] if "kept_experts" in e]
    assert sparse and report["params_after"] < report["params_before"]
    for entry in sparse:
        assert geom.top_k <= len(entry["kept_experts"]) <= geom.num_experts
        widths = {len(n) for n in entry["kept_expert_neurons"]}
        assert len(widths) == 1 and next(iter(widths)) % 8 == 0  # one width per layer, grouped_mm-aligned
        assert len(entry["kept_expert_neurons"]) == len(entry["kept_experts"])
        assert len(entry["expert_tokens"]) == geom.num_experts and sum(entry["expert_tokens"]) > 0
        if moe == "experts":
            assert widths == {geom.expert_intermediate}
        if moe == "neurons":
            assert len(entry["kept_experts"]) == geom.num_experts
    if moe != "neurons":
        assert any(len(e["kept_experts"]) < geom.num_experts for e in sparse), "no expert was removed"
    if moe != "experts":
        assert any(len(e["kept_expert_neurons"][0]) < geom.expert_intermediate for e in sparse)
    before, after = report["moe"]["active_params_per_token"]
    assert after < before < report["params_before"]
    with torch.no_grad():
        got = pruned(_ids()).logits
        want = masked_reference(original, report)(_ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_expert_scores_equal_a_direct_computation():
    """An expert's score is the mean over all tokens of ||w_e(t) y_e(t)||_1 (zero where not routed); an expert
    neuron's the mean |a_j| over the tokens routed to its expert; counted on the model's own routing."""
    model = make_tiny("mixtral_moe")
    samples = _calibration(n=4)
    layer0 = model.model.layers[0].mlp
    seen = []
    layer0.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).clone()))
    with torch.no_grad():
        for s in samples:
            model(s[None])
    x = torch.cat(seen)
    with torch.no_grad():
        _, weights, index = layer0.gate(x)
        experts = layer0.experts
        l1, tokens, neuron = torch.zeros(6), torch.zeros(6), torch.zeros(6, 40)
        for e in range(6):
            rows, pos = torch.where(index == e)
            gate, up = F.linear(x[rows], experts.gate_up_proj[e]).chunk(2, dim=-1)
            a = F.silu(gate) * up
            y = F.linear(a, experts.down_proj[e]) * weights[rows, pos, None]
            l1[e], tokens[e], neuron[e] = y.abs().sum(), len(rows), a.abs().sum(0)
    report = amp.prune_(copy.deepcopy(model), amp.PruneConfig(ratio=0.2, sequential=False, batch_size=2,
                                                              criterion="amp"), samples, progress=False)
    entry = report["layers"][0]
    assert entry["expert_tokens"] == tokens.long().tolist()
    torch.testing.assert_close(torch.tensor(entry["expert_scores"]), l1 / x.shape[0], rtol=1e-4, atol=1e-7)
    best = torch.argsort(-(neuron / tokens.clamp_min(1)[:, None]), dim=1, stable=True)
    for e, kept in zip(entry["kept_experts"], entry["kept_expert_neurons"]):
        assert kept == sorted(best[e, :len(kept)].tolist())


def test_hub_layout_streams_prunes_and_is_written_back(moe_family, tmp_path, data_dir):
    src = save_tiny(make_tiny(moe_family), tmp_path / "dense", "40KB")
    names = set()
    for shard in src.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            names |= set(f.keys())
    hub = [n for n in names if ".experts.0." in n]
    assert hub and not any(n.endswith("gate_up_proj") for n in names)  # what the Hub stores: one expert each
    config = amp.PruneConfig(ratio=0.3, allocation="depth", **TEXT_CALIB)
    streamed = amp.prune_checkpoint(str(src), config, tmp_path / "stream", data_dir=data_dir, progress=False)
    memory = amp.prune_checkpoint(str(src), dataclasses.replace(config, stream=False),
                                  tmp_path / "memory", data_dir=data_dir, progress=False)
    assert [(e["kept_heads"], e.get("kept_experts"), e.get("kept_expert_neurons")) for e in streamed["layers"]] == \
        [(e["kept_heads"], e.get("kept_experts"), e.get("kept_expert_neurons")) for e in memory["layers"]]
    written = set()
    for shard in (tmp_path / "stream").glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            written |= set(f.keys())
    assert any(".experts.0." in n for n in written) and not any("gate_up_proj" in n for n in written)
    saved = json.loads((tmp_path / "stream" / "config.json").read_text())
    if moe_family == "qwen3moe_moe":  # transformers 4.57 reads the expert count under this name
        assert saved["num_experts"] == saved["num_local_experts"] == 8
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    in_memory, _, _ = amp.load_pruned(tmp_path / "memory")
    assert sum(p.numel() for p in loaded.parameters()) == streamed["params_after"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, in_memory(_ids()).logits, rtol=1e-5, atol=1e-5)
        amp.accelerate_(loaded)  # MoE blocks keep the stock expert loop; attention goes through amp_gqa
        torch.testing.assert_close(loaded(_ids()).logits, in_memory(_ids()).logits, rtol=1e-5, atol=1e-5)


def test_cli_info_eval_and_recover_on_a_moe_result(tmp_path, data_dir, capsys):
    src = save_tiny(make_tiny("qwen3moe_moe"), tmp_path / "dense")
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(capsys, "prune", src, "--ratio", 0.3, "--out", out, "--moe", "auto",
                                "--calib", "wikitext2", "--nsamples", 4, "--seqlen", 32, "--data-dir", data_dir,
                                "--quiet")
    assert code == 0, err
    assert "active per token" in stdout and "experts" in stdout
    code, stdout, err = run_cli(capsys, "info", out)
    assert code == 0 and "experts" in stdout and "active per token" in stdout
    code, stdout, err = run_cli(capsys, "eval", out, "--tasks", "", "--ppl", "wikitext2", "--seqlen", 64,
                                "--max-windows", 2, "--data-dir", data_dir, "--quiet")
    assert code == 0, err
    assert "perplexity wikitext2@64" in stdout
    code, stdout, err = run_cli(capsys, "recover", out, "--out", tmp_path / "recovered", "--steps", 2,
                                "--batch-size", 2, "--seqlen", 32, "--max-records", 8, "--data-dir", data_dir,
                                "--quiet")
    assert code == 0, err
    report = json.loads((tmp_path / "recovered" / "amp_report.json").read_text())
    assert report["recovery"]["steps"] == 2 and "moe" in report
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "recovered") is not None


def test_a_budget_that_would_leave_fewer_experts_than_top_k_is_refused(tmp_path, capsys, data_dir):
    src = save_tiny(make_tiny("mixtral_moe"), tmp_path / "dense")
    code, _, err = run_cli(capsys, "prune", src, "--ratio", 0.75, "--moe", "experts", "--out", tmp_path / "out",
                           "--calib", "wikitext2", "--nsamples", 2, "--seqlen", 32, "--data-dir", data_dir,
                           "--allocation", "uniform", "--quiet")
    assert_clean_failure(code, err, tmp_path / "out")
    assert "num_experts_per_tok" in err


def test_baselines_without_an_expert_form_are_refused():
    with pytest.raises(amp.AmpError, match="mixture-of-experts"):
        amp.prune_(make_tiny("mixtral_moe"), amp.PruneConfig(ratio=0.2, criterion="wanda-sp"), _calibration(),
                   progress=False)


def test_refit_compensates_attention_and_says_experts_are_not(tmp_path):
    model = make_tiny("mixtral_moe")
    report = amp.prune_(model, amp.PruneConfig(ratio=0.3, compensate="refit", batch_size=4),
                        _calibration(n=12, length=40), progress=False)
    comp = report["compensation"]
    assert comp["mode"] == "refit" and "experts" in comp and "not compensated" in comp["experts"]
    assert comp["projections"] == ["o"]
    removed_heads = [e for e in report["layers"] if len(e["kept_heads"]) < 6]
    if removed_heads:
        assert comp["o_error_after"] <= comp["o_error_before"]
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).logits).all()

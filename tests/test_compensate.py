"""Compensation while pruning (bias, refit) and sequential calibration, each against an independent computation
from inputs captured on the dense (or partly pruned) model."""
import copy

import pytest
import torch

import amp
from amp.arch import Geometry, spec_for
from amp import AmpError
from conftest import random_calibration
from test_exactness import masked_reference
from test_scores import captured_inputs
from tiny_models import make_tiny


def _cols(kept_heads, d):
    return torch.tensor([h * d + j for h in kept_heads for j in range(d)])


def _ridge(x_kept, target, prior, lam, with_bias):
    """min ||[x_K (1)] W'^T - target||^2 + lam ||W' - prior||^2 (the bias column undamped), by lstsq."""
    n, k = x_kept.shape
    a = torch.cat([x_kept, torch.ones(n, 1, dtype=x_kept.dtype)], 1) if with_bias else x_kept
    reg = torch.eye(a.shape[1], dtype=a.dtype) * lam ** 0.5
    prior_t = prior.T
    if with_bias:
        reg[-1, -1] = 0
        prior_t = torch.cat([prior_t, torch.zeros(1, prior_t.shape[1], dtype=prior_t.dtype)])
    sol = torch.linalg.lstsq(torch.cat([a, reg]), torch.cat([target, reg @ prior_t])).solution
    return sol.T  # (out, k [+1])


@pytest.mark.parametrize("family,mode", [("llama_mha", "refit"), ("phi_mha", "refit"), ("llama_gqa", "bias+refit"),
                                         ("phi3_gqa", "refit")])
def test_refit_equals_lstsq_on_captured_inputs(family, mode):
    model = make_tiny(family)
    spec, geom = spec_for(model), Geometry.from_config(model.config)
    samples = random_calibration(n=8, lo=20, hi=40)
    o_in, down_in = captured_inputs(model, samples, spec.o), captured_inputs(model, samples, spec.down)
    dense = copy.deepcopy(model)
    damp = 0.05
    report = amp.prune_(model, amp.PruneConfig(ratio=0.4, compensate=mode, damp=damp, batch_size=3, sequential=False), samples,
                        progress=False)
    assert report["compensation"]["mode"] == mode
    with_bias = "bias" in mode
    for i, kept in enumerate(report["layers"]):
        d_layer, p_layer = dense.model.layers[i], model.model.layers[i]
        for key, x, cols in (("o", o_in[i].double(), _cols(kept["kept_heads"], geom.head_dim)),
                             ("down", down_in[i].double(), torch.tensor(kept["kept_neurons"]))):
            path = spec.o if key == "o" else spec.down
            w = spec.get(d_layer, path).weight.detach().double()
            if len(cols) == w.shape[1]:
                continue  # nothing removed: left as it is
            lam = damp * float((x * x).sum(0).mean())
            want = _ridge(x[:, cols], x @ w.T, w[:, cols], lam, with_bias)
            got = spec.get(p_layer, path).weight.detach().double()
            torch.testing.assert_close(got, want[:, :len(cols)], rtol=1e-3, atol=1e-5)
            if with_bias:
                b0 = spec.get(d_layer, path).bias
                b0 = torch.zeros(w.shape[0], dtype=torch.float64) if b0 is None else b0.detach().double()
                torch.testing.assert_close(spec.get(p_layer, path).bias.detach().double() - b0, want[:, -1],
                                           rtol=1e-3, atol=1e-5)
            # never a larger calibration reconstruction error than just dropping the columns
            y = x @ w.T
            err_none = (y - x[:, cols] @ w[:, cols].T).square().sum()
            shift = want[:, -1] if with_bias else 0
            err_refit = (y - x[:, cols] @ got.T - shift).square().sum()
            assert err_refit <= err_none * (1 + 1e-9)
            e = kept["compensation"][key]
            assert e["error_after"] <= e["error_before"] + 1e-9
            assert e["error_before"] == pytest.approx(float(err_none / y.square().sum()), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("family", ["llama_gqa", "phi_mha"])
def test_bias_keeps_output_on_calibration_mean(family):
    model = make_tiny(family)
    spec, geom = spec_for(model), Geometry.from_config(model.config)
    samples = random_calibration(n=6)
    o_in, down_in = captured_inputs(model, samples, spec.o), captured_inputs(model, samples, spec.down)
    dense = copy.deepcopy(model)
    report = amp.prune_(model, amp.PruneConfig(ratio=0.35, compensate="bias", batch_size=2, sequential=False), samples,
                        progress=False)
    assert report["compensation"]["mode"] == "bias"
    for i, kept in enumerate(report["layers"]):
        cols, neurons = _cols(kept["kept_heads"], geom.head_dim), torch.tensor(kept["kept_neurons"])
        mean_x, mean_a = o_in[i].mean(0), down_in[i].mean(0)
        with torch.no_grad():
            torch.testing.assert_close(spec.get(model.model.layers[i], spec.o)(mean_x[cols]),
                                       spec.get(dense.model.layers[i], spec.o)(mean_x), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(spec.get(model.model.layers[i], spec.down)(mean_a[neurons]),
                                       spec.get(dense.model.layers[i], spec.down)(mean_a), rtol=1e-4, atol=1e-5)


def _prefix_masked(original, report, upto):
    """The original model with the structures pruned from layers [0, upto) zeroed at their exits."""
    partial = {**report, "layers": report["layers"][:upto]}
    ref = masked_reference(original, partial)
    return ref


@pytest.mark.parametrize("family,allocation", [("llama_mha", "uniform"), ("phi3_gqa", "uniform"),
                                               ("llama_gqa", "depth"), ("gemma2_gqa", "uniform"),
                                               ("gemma3_gqa", "depth"), ("qwen3_gqa", "depth")])
def test_sequential_statistics_come_from_the_pruned_prefix(family, allocation):
    original = make_tiny(family)
    spec, geom = spec_for(original), Geometry.from_config(original.config)
    samples = random_calibration(n=6, lo=10, hi=30)
    pruned = copy.deepcopy(original)
    report = amp.prune_(pruned, amp.PruneConfig(ratio=0.35, sequential=True, compensate="none", batch_size=2,
                                                criterion="amp", allocation=allocation), samples, progress=False)
    assert report["compensation"]["sequential"]
    n_tokens = sum(len(s) for s in samples)
    differs = False
    for i, kept in enumerate(report["layers"]):
        ref = _prefix_masked(original, report, i)   # layers before i as pruned, layer i and after dense
        x = captured_inputs(ref, samples, spec.o)[i].view(n_tokens, geom.num_heads, geom.head_dim)
        w = spec.get(original.model.layers[i], spec.o).weight.detach().view(geom.hidden, geom.num_heads, -1)
        direct = torch.stack([(x[:, h] @ w[:, h].T).abs().sum(-1).mean() for h in range(geom.num_heads)])
        torch.testing.assert_close(torch.tensor(kept["head_scores"]), direct, rtol=1e-4, atol=1e-6)
        if i:
            dense_x = captured_inputs(original, samples, spec.o)[i].view(n_tokens, geom.num_heads, -1)
            differs |= not torch.allclose(dense_x, x)
    assert differs, "pruning the prefix should change later layers' inputs"
    # and the sequentially pruned model is still exactly its masked original
    ids = torch.randint(2, 258, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, _prefix_masked(original, report, 99)(ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_sequential_refit_fits_on_pruned_prefix_inputs():
    original = make_tiny("llama_mha")
    spec = spec_for(original)
    samples = random_calibration(n=8, lo=20, hi=40)
    pruned = copy.deepcopy(original)
    damp = 0.05
    report = amp.prune_(pruned, amp.PruneConfig(ratio=0.4, sequential=True, compensate="refit", damp=damp,
                                                batch_size=4), samples, progress=False)
    i = len(report["layers"]) - 1
    hybrid = copy.deepcopy(original)
    for j in range(i):                      # the pruned (refit) layers before i, the dense layer i
        hybrid.model.layers[j] = pruned.model.layers[j]
    x = captured_inputs(hybrid, samples, spec.down)[i].double()
    neurons = torch.tensor(report["layers"][i]["kept_neurons"])
    w = spec.get(original.model.layers[i], spec.down).weight.detach().double()
    lam = damp * float((x * x).sum(0).mean())
    want = _ridge(x[:, neurons], x @ w.T, w[:, neurons], lam, False)
    torch.testing.assert_close(spec.get(pruned.model.layers[i], spec.down).weight.detach().double(), want,
                               rtol=1e-3, atol=1e-5)


def test_compensation_report_warns_on_thin_calibration():
    model = make_tiny("llama_mha")
    report = amp.prune_(model, amp.PruneConfig(ratio=0.3, compensate="refit"), random_calibration(n=3),
                        progress=False)
    comp = report["compensation"]
    assert comp["tokens_per_channel"]["down"] < 10 and "overfit" in comp["warning"]
    assert any("overfit" in n for n in report["notes"])


def test_bad_compensation_inputs():
    with pytest.raises(AmpError, match="damp must be a positive"):
        amp.PruneConfig(ratio=0.2, compensate="refit", damp=0.0)
    with pytest.raises(AmpError, match="damp must be a positive"):
        amp.PruneConfig(ratio=0.2, damp=-1)
    with pytest.raises(AmpError, match="unknown --compensate"):
        amp.PruneConfig(ratio=0.2, compensate="obs")
    with pytest.raises(AmpError, match="--sequential"):
        amp.PruneConfig(ratio=0.2, criterion="magnitude", sequential=True)
    with pytest.raises(AmpError, match="cannot hold an output-projection bias"):
        amp.prune_(make_tiny("mistral_gqa"), amp.PruneConfig(ratio=0.3, compensate="bias"), random_calibration(),
                   progress=False)
    assert amp.PruneConfig(ratio=0.2, criterion="flap").compensate == "bias"


def test_auto_refits_only_with_enough_calibration_tokens():
    few = amp.prune_(make_tiny("llama_mha"), amp.PruneConfig(ratio=0.3), random_calibration(n=4), progress=False)
    assert few["compensation"]["mode"] == "none"
    assert any("--compensate auto: no refit" in n for n in few["notes"])
    many = random_calibration(n=48, lo=25, hi=40)   # > 10 tokens per neuron of the 96-wide down_proj
    rich = amp.prune_(make_tiny("llama_mha"), amp.PruneConfig(ratio=0.3), many, progress=False)
    assert rich["compensation"]["mode"] == "refit" and rich["compensation"]["tokens_per_channel"]["down"] >= 10
    assert "warning" not in rich["compensation"]
    data_free = amp.PruneConfig(ratio=0.3, criterion="magnitude")
    assert not data_free.needs_calibration and not data_free.auto_refit


def test_cli_prunes_with_refit_and_sequential_streamed(tiny_llama_dir, tmp_path, capsys, data_dir):
    from amp.cli import main
    out = tmp_path / "refit"
    code = main(["prune", str(tiny_llama_dir), "--ratio", "0.3", "--out", str(out), "--calib", "c4",
                 "--data-dir", str(data_dir), "--nsamples", "8", "--seqlen", "64", "--compensate", "refit",
                 "--sequential", "--damp", "0.1", "--allocation", "uniform", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "sequential statistics); compensation: refit, o_proj error" in printed
    import json
    comp = json.loads((out / "amp_report.json").read_text())["compensation"]
    assert comp["mode"] == "refit" and comp["sequential"] and comp["damp"] == 0.1
    assert comp["down_error_after"] < comp["down_error_before"]
    model, _, _ = amp.load_pruned(out)    # a plain checkpoint: the refit changes values, not shapes
    assert model.config.intermediate_size < 96
    assert main(["prune", str(tiny_llama_dir), "--ratio", "0.3", "--out", str(tmp_path / "x"), "--teacher",
                 str(tiny_llama_dir)]) == 2
    assert "add --recover" in capsys.readouterr().err


def test_calibration_windows_begin_as_the_tokenizer_begins_a_text(tmp_path, tokenizer):
    """A tokenizer that puts a BOS before every text (Gemma, LLaMA) gets it at the head of every calibration and
    held-back window, which keeps its length; one that puts nothing there (SmolLM2, this byte-level one) gets the
    windows it always had (issue 29: Gemma-3-270M without its BOS reads WikiText-2 at 41.05, with it 22.99)."""
    from tokenizers import processors
    from amp.io.calibration import load_calibration, text_prefix
    assert text_prefix(tokenizer) == []
    plain = load_calibration(tokenizer, "c4", 8, 64, 0, tmp_path, holdout=2)
    with_bos = copy.deepcopy(tokenizer)
    with_bos.add_special_tokens({"bos_token": "<bos>"})
    bos = with_bos.bos_token_id
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)])
    assert with_bos("hi")["input_ids"][0] == bos and text_prefix(with_bos) == [bos]
    cal = load_calibration(with_bos, "c4", 8, 64, 0, tmp_path, holdout=2)
    windows = cal.samples + cal.held_out
    assert len(cal.samples) == 8 and len(cal.held_out) == 2
    assert all(len(w) == 64 and int(w[0]) == bos and bos not in w[1:].tolist() for w in windows)
    assert all(len(w) == 64 and bos not in w.tolist() for w in plain.samples + plain.held_out)


def test_zoo_c4_unseen_text_is_text_no_calibration_window_came_from(data_dir, tokenizer):
    """The zoo's C4 perplexity on unseen documents (benchmarks/zoo/one.py, calibration.unseen_text) reads past the
    span the calibration draws its windows and held-back windows from (calibration.chars_read): no calibration
    window's text is in it."""
    from amp.io.calibration import chars_read, load_calibration
    from benchmarks.zoo.one import c4_unseen_ids
    cal = load_calibration(tokenizer, "c4", 64, 512, 0, data_dir, holdout=8)
    unseen = c4_unseen_ids(tokenizer, data_dir, 1024, 16)
    assert len(unseen) >= 16 * 1024
    text = tokenizer.decode(unseen.tolist())
    windows = cal.samples + cal.held_out
    assert len(windows) == 72
    assert not any(tokenizer.decode(w[k:k + 48].tolist()) in text for w in windows for k in (0, 200, 400))
    assert chars_read(64, 512) == 4 * 262_144   # the span the zoo's 64 x 512 windows come from
    # a row calibrated otherwise (zoo.table --calibration) is scored past the wider of the two spans, whichever
    # order they come in; 32 windows of 1,024 read the default's span, so such rows share its documents
    from amp.io.calibration import unseen_text
    from amp.quality.perplexity import tokenize_text
    from benchmarks.zoo.one import CALIBRATION
    wider = ("c4", 96, 512)
    past_wider = c4_unseen_ids(tokenizer, data_dir, 1024, 16, (CALIBRATION, wider))
    assert torch.equal(past_wider, c4_unseen_ids(tokenizer, data_dir, 1024, 16, (wider, CALIBRATION)))
    assert torch.equal(past_wider, tokenize_text(tokenizer, unseen_text(*wider, data_dir)[: 8 * 1024 * 16]))
    assert not torch.equal(past_wider[:1024], unseen[:1024])
    assert torch.equal(unseen, c4_unseen_ids(tokenizer, data_dir, 1024, 16, (CALIBRATION, ("c4", 32, 1024))))


def test_default_calibration_is_c4_windows_with_a_bundled_fallback(tmp_path, tokenizer):
    from amp.io.calibration import BUNDLED, load_calibration, resolve_source
    config = amp.PruneConfig(ratio=0.2)
    assert config.calib == "c4" and config.nsamples is None and config.compensate == "auto" and config.sequential
    assert not amp.PruneConfig(ratio=0.2, criterion="random").sequential   # no data, nothing to recalibrate
    assert resolve_source("c4", tmp_path) == BUNDLED["c4"]          # no data folder: the packaged sample
    cal = load_calibration(tokenizer, "c4", None, 512, 0, tmp_path)
    assert len(cal.samples) == 64 and all(len(s) == 512 for s in cal.samples)
    prompts = load_calibration(tokenizer, "alpaca", None, 512, 0, tmp_path)
    assert len(prompts.samples) == 128

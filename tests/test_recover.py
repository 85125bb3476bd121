"""Recovery (LoRA through peft, optional distillation): it learns, merges exactly, resumes exactly, and refuses bad
input with one line and nothing written."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import amp
from amp.cli import main
from amp import AmpError
from amp import RecoverConfig, recover_checkpoint, recover_model
from amp.recover.checkpoints import checkpoint_path
from conftest import random_calibration
from tiny_models import make_tiny, save_tiny, tiny_tokenizer


def _patterned(n=24, seed=0):
    """Learnable data: 24-token samples drawn from 8 of the 258 tokens (best loss ln 8 = 2.1, from ln 258)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 10, (24,), generator=g) for _ in range(n)]


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_recovery_lowers_training_loss_and_merge_is_exact():
    model = make_tiny("llama_gqa")
    with torch.no_grad():  # a random tiny model's logits are nearly flat (init std 0.02): give them range
        model.lm_head.weight.mul_(30)
    amp.prune_(model, amp.PruneConfig(ratio=0.3), random_calibration(), progress=False)
    config = RecoverConfig(steps=40, lr=1e-2, batch_size=4, lora_dropout=0.0, checkpoint_every=0)
    result = recover_model(model, None, config, samples=_patterned(), progress=False)
    assert result["loss_last"] < 0.5 * result["loss_first"]
    assert result["loss_last"] > 2.0          # not below the data's entropy (ln 8 = 2.08): a real loss
    assert result["merge_max_abs_diff"] < 1e-4
    assert result["tokens"] == 40 * 4 * 24 and result["steps"] == 40


def test_merged_model_equals_peft_model_and_reloads_without_peft(tmp_path):
    model = make_tiny("phi3_gqa")
    amp.prune_(model, amp.PruneConfig(ratio=0.3), random_calibration(), progress=False)
    config = RecoverConfig(steps=6, lr=5e-3, batch_size=4, checkpoint_every=0)
    partial = recover_model(model, None, config, samples=_patterned(), progress=False, stop_after=3)
    peft_model = partial["peft_model"].eval()
    ids = torch.randint(2, 258, (2, 12))
    with torch.no_grad():
        want = peft_model(ids).logits
        assert any(float(p.abs().sum()) > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
        merged = peft_model.merge_and_unload().eval()
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert not any("lora" in k for k in reloaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_self_distillation_of_an_unpruned_model_has_zero_kl():
    model = make_tiny("llama_mha")
    teacher = copy.deepcopy(model)
    config = RecoverConfig(steps=2, batch_size=4, kd_weight=1.0, checkpoint_every=0)
    result = recover_model(model, None, config, teacher=teacher, samples=_patterned(8), progress=False)
    assert result["history"][0]["kd"] == pytest.approx(0.0, abs=1e-6)
    assert result["history"][0]["lm"] > 1.0   # the student is not trivially right: only the KL is zero


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    base = make_tiny("qwen2_gqa")
    amp.prune_(base, amp.PruneConfig(ratio=0.3), random_calibration(), progress=False)
    config = RecoverConfig(steps=6, lr=5e-3, batch_size=4, checkpoint_every=3)
    straight = recover_model(copy.deepcopy(base), None, config, samples=_patterned(), progress=False)["model"]
    ckpt = tmp_path / "c" / "recover.pt"
    recover_model(copy.deepcopy(base), None, config, samples=_patterned(), progress=False, checkpoint=ckpt,
                  stop_after=4)  # "interrupted" after step 4; the checkpoint holds step 3
    assert torch.load(ckpt, weights_only=False)["step"] == 3
    resumed = recover_model(copy.deepcopy(base), None, config, samples=_patterned(), progress=False,
                            checkpoint=ckpt, resume=True)["model"]
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


def _folder(tmp_path, family="llama_gqa", allocation="uniform"):
    model = make_tiny(family)
    report = amp.prune_(model, amp.PruneConfig(ratio=0.3, allocation=allocation), random_calibration(),
                        progress=False)
    from amp.io.folders import save_pruned
    return save_pruned(model, tiny_tokenizer(), report, tmp_path / f"pruned_{family}_{allocation}")


def _data(tmp_path, rows=None):
    path = tmp_path / "data.jsonl"
    rows = rows or [{"instruction": f"Repeat {w}", "input": "", "output": f"{w} {w} {w}"}
                    for w in ("cat", "dog", "sun", "sky", "red", "blue", "one", "two")]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.mark.parametrize("allocation", ["uniform", "depth"])
def test_recover_folder_to_folder_loads_like_its_input(tmp_path, allocation):
    pruned = _folder(tmp_path, allocation=allocation)
    out = tmp_path / "recovered"
    code = main(["recover", str(pruned), "--out", str(out), "--data", str(_data(tmp_path)), "--steps", "4",
                 "--batch-size", "4", "--quiet"])
    assert code == 0
    report = json.loads((out / "amp_report.json").read_text())
    assert report["recovery"]["steps"] == 4 and report["recovery"]["tokens"] > 0
    assert report["layers"], "the prune report is kept"
    assert (out / "recovery_loss.png").stat().st_size > 0
    assert not checkpoint_path(out).parent.exists()
    before, _, _ = amp.load_pruned(pruned)
    after, _, _ = amp.load_pruned(out)
    assert [p.shape for p in before.parameters()] == [p.shape for p in after.parameters()]
    assert not any("lora" in k for k in after.state_dict())
    ids = torch.randint(2, 258, (1, 10))
    with torch.no_grad():
        assert not torch.allclose(before(ids).logits, after(ids).logits)


def test_prune_then_recover_in_one_command(tmp_path):
    dense = save_tiny(make_tiny("llama_gqa"), tmp_path / "dense")
    out = tmp_path / "out"
    code = main(["prune", str(dense), "--ratio", "0.3", "--out", str(out), "--calib", str(_data(tmp_path)),
                 "--nsamples", "8", "--recover", "--recover-steps", "3", "--recover-data", str(_data(tmp_path)),
                 "--teacher", str(dense), "--quiet"])
    assert code == 0
    report = json.loads((out / "amp_report.json").read_text())
    assert report["recovery"]["teacher"] and report["ratio_achieved"] > 0.25
    assert "kd" in json.loads((out / "recovery_log.json").read_text())[0]
    assert not checkpoint_path(out).parent.exists()
    amp.load_pruned(out)


def _fails(capsys, argv, pattern):
    capsys.readouterr()  # what the set-up printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "amp: error" in line]   # (loading bars may come first)
    assert len(errors) == 1 and pattern in errors[0] and err.endswith(errors[0].split("\r")[-1]), err


def test_bad_recovery_inputs(tmp_path, capsys):
    pruned = _folder(tmp_path)
    out = tmp_path / "out"
    data = str(_data(tmp_path))
    _fails(capsys, ["recover", str(tmp_path), "--out", str(out), "--data", data], "is not a model folder")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails(capsys, ["recover", str(pruned), "--out", str(out), "--data", str(empty)], "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    _fails(capsys, ["recover", str(pruned), "--out", str(out), "--data", str(bad)], "bad.jsonl:2")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "fine"}\n{"prompt": "no"}\n')
    _fails(capsys, ["recover", str(pruned), "--out", str(out), "--data", str(wrong)], "wrong.jsonl:2")
    _fails(capsys, ["recover", str(pruned), "--out", str(out), "--data", data, "--resume"], "no checkpoint")
    other = make_tiny("llama_gqa")
    other.resize_token_embeddings(300)
    teacher = save_tiny(other, tmp_path / "teacher")
    _fails(capsys, ["recover", str(pruned), "--out", str(out), "--data", data, "--teacher", str(teacher)],
           "vocabulary")
    _fails(capsys, ["prune", str(pruned), "--ratio", "0.2", "--out", str(out), "--compensate", "refit",
                    "--damp", "0"], "damp must be a positive")
    _fails(capsys, ["recover", str(pruned), "--out", str(out), "--data", data, "--steps", "0"], "--steps")
    assert not out.exists()


def test_interrupted_recovery_leaves_no_finished_folder_and_resumes(tmp_path, monkeypatch):
    pruned = _folder(tmp_path)
    out = tmp_path / "out"
    config = RecoverConfig(data=str(_data(tmp_path)), steps=6, batch_size=4, checkpoint_every=2)
    import amp.recover.train as rec
    real = rec.save_checkpoint
    calls = []

    def interrupt(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(rec, "save_checkpoint", interrupt)
    with pytest.raises(KeyboardInterrupt):
        recover_checkpoint(pruned, out, config, progress=False)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    assert torch.load(checkpoint_path(out), weights_only=False)["step"] == 4
    monkeypatch.setattr(rec, "save_checkpoint", real)
    with pytest.raises(AmpError, match="other settings.*lr"):
        recover_checkpoint(pruned, out, RecoverConfig(**{**config.__dict__, "lr": 1e-3}), progress=False,
                           resume=True)
    report = recover_checkpoint(pruned, out, config, progress=False, resume=True)
    assert report["recovery"]["steps"] == 6 and report["recovery"]["resumed"]

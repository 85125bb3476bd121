"""The CLI end to end on a tiny model folder, and every kind of bad input: one line, exit 2, nothing written."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from amp.cli import main


def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_failure(code, err, out_dir):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("amp: error: "), err
    if out_dir is not None:
        assert not out_dir.exists()
        assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}")]


def test_prune_and_info_on_a_tiny_folder(tiny_llama_dir, tmp_path, capsys, data_dir):
    out = tmp_path / "pruned"
    code, stdout, _ = run_cli(capsys, "prune", tiny_llama_dir, "--ratio", 0.3, "--out", out, "--calib", "wikitext2",
                              "--data-dir", data_dir, "--nsamples", 4, "--seqlen", 32, "--quiet")
    assert code == 0, stdout
    report = json.loads((out / "amp_report.json").read_text())
    assert report["calibration"] == {"source": "wikitext2", "samples": 4, "tokens": 128, "seqlen": 32, "seed": 0,
                                     "used": True, "file": str(data_dir / "text" / "wikitext2_test.txt")}
    assert set(report["phases"]) >= {"load", "calibrate", "slice", "write"}
    assert all(p["seconds"] >= 0 and p["peak_rss_mb"] > 0 for p in report["phases"].values())
    assert "ratio" in stdout and "->" in stdout
    code, stdout, _ = run_cli(capsys, "info", out)
    assert code == 0 and "pruned by AMP" in stdout and f"{report['params_after']:,}" in stdout
    # --overwrite replaces a finished folder; without it the folder is refused.
    code, _, err = run_cli(capsys, "prune", tiny_llama_dir, "--ratio", 0.2, "--out", out, "--criterion", "random",
                           "--quiet")
    assert code == 2 and "exists" in err
    code, _, _ = run_cli(capsys, "prune", tiny_llama_dir, "--ratio", 0.2, "--out", out, "--criterion", "random",
                         "--quiet", "--overwrite")
    assert code == 0 and json.loads((out / "amp_report.json").read_text())["criterion"] == "random"


def _not_causal(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    return folder


def _gpt2(tmp_path):
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(folder)
    return folder


def _calib_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


BAD = {
    "ratio_above_one": (lambda t, m: [m, "--ratio", 1.5], "between 0 and 1"),
    "ratio_zero": (lambda t, m: [m, "--ratio", 0], "between 0 and 1"),
    "ratio_empties_layers": (lambda t, m: [m, "--ratio", 0.97, "--criterion", "random"], "empty"),
    "unknown_criterion": (lambda t, m: [m, "--ratio", 0.2, "--criterion", "bogus"], "criterion"),
    "missing_model": (lambda t, m: [t / "nope", "--ratio", 0.2], "not found"),
    "not_causal_lm": (lambda t, m: [_not_causal(t), "--ratio", 0.2], "not a causal LM"),
    "unsupported_family": (lambda t, m: [_gpt2(t), "--ratio", 0.2], "LlamaForCausalLM"),
    "missing_calib_file": (lambda t, m: [m, "--ratio", 0.2, "--calib", t / "none.txt"], "does not exist"),
    "empty_calib_file": (lambda t, m: [m, "--ratio", 0.2, "--calib", _calib_file(t, "e.txt", "  \n")], "empty"),
    "short_calib_file": (lambda t, m: [m, "--ratio", 0.2, "--calib", _calib_file(t, "s.txt", "a few words"),
                                       "--seqlen", 64], "too short"),
    "bad_jsonl": (lambda t, m: [m, "--ratio", 0.2, "--calib", _calib_file(t, "b.jsonl", '{"text": "ok"}\n{oops\n')],
                  "b.jsonl:2"),
    "json_record_without_text": (lambda t, m: [m, "--ratio", 0.2, "--calib", _calib_file(
        t, "r.json", '[{"instruction": "a", "input": ""},\n {"prompt": "b"}]')], "r.json:2: record 2"),
    "mixed_record_kinds": (lambda t, m: [m, "--ratio", 0.2, "--calib", _calib_file(
        t, "m.jsonl", '{"instruction": "a", "input": ""}\n{"text": "b"}\n')], "m.jsonl:2"),
    "bad_json_names_line": (lambda t, m: [m, "--ratio", 0.2, "--calib", _calib_file(t, "j.json", '[\n{"x": 1},\n{oops\n')],
                            "j.json:3"),
    "cuda_without_cuda": (lambda t, m: [m, "--ratio", 0.2, "--device", "cuda"], "CUDA"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_error_nothing_written(case, tiny_llama_dir, tmp_path, capsys):
    if case == "cuda_without_cuda" and torch.cuda.is_available():
        pytest.fail("this check needs a machine without CUDA; run it on the CPU CI")
    make_args, expected = BAD[case]
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "prune", *make_args(tmp_path, tiny_llama_dir), "--out", out, "--quiet")
    assert_clean_failure(code, err, out)
    assert expected in err, err


def test_existing_output_refused_before_any_work(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "prune", tiny_llama_dir, "--ratio", 0.2, "--out", out, "--quiet")
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_real_process_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "amp.cli", "prune", str(tmp_path / "missing"), "--ratio", "0.2",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("amp: error:") and len(proc.stderr.strip().splitlines()) == 1

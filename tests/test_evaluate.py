"""`amp eval`: perplexity against a direct computation, zero-shot through lm-eval on tiny fixture files of all
seven tasks (an independent log-likelihood computation checks the wiring), and its bad inputs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import amp
from amp.quality.perplexity import perplexity
from test_cli import _not_causal, assert_clean_failure, run_cli
from tiny_models import make_tiny, save_tiny

ROWS = {
    "boolq": [{"question": "is the sky blue", "passage": "The sky is blue.", "idx": 0, "label": 1},
              {"question": "is fire cold", "passage": "Fire is hot.", "idx": 1, "label": 0}],
    "piqa": [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
             {"goal": "Dry hands", "sol1": "use water", "sol2": "use a towel", "label": 1},
             {"goal": "Cut bread", "sol1": "use a knife", "sol2": "use a sock", "label": 0}],
    "hellaswag": [{"ind": 0, "activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he",
                   "ctx": "A man cracks an egg. he", "endings": ["fries it.", "sings.", "runs.", "sleeps."],
                   "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"}],
    "winogrande": [{"qID": "a", "sentence": "Tom gave Ann a book because _ was kind.", "option1": "Tom",
                    "option2": "Ann", "answer": "1"}],
    "arc_easy": [{"id": "q1", "question": "What is ice?", "choices": {"text": ["frozen water", "hot air"],
                                                                      "label": ["A", "B"]}, "answerKey": "A"},
                 {"id": "q2", "question": "Sun is a?", "choices": {"text": ["star", "rock", "tree"],
                                                                   "label": ["A", "B", "C"]}, "answerKey": "A"}],
    "arc_challenge": [{"id": "c1", "question": "Why rain?", "choices": {"text": ["clouds", "dogs"],
                                                                       "label": ["1", "2"]}, "answerKey": "1"}],
    "openbookqa": [{"id": "o1", "question_stem": "Plants need", "choices": {"text": ["light", "metal", "ice", "tar"],
                                                                          "label": ["A", "B", "C", "D"]},
                    "answerKey": "A"}],
}


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "tasks").mkdir()
    (root / "text").mkdir()
    for task, rows in ROWS.items():
        (root / "tasks" / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "text" / "wikitext2_test.txt").write_text(" = Valkyria = \n The game began development in 2010 .\n" * 6)
    (root / "text" / "c4_validation_2k.jsonl").write_text(
        "".join(json.dumps({"text": f"Document {i} talks about gardens and weather."}) + "\n" for i in range(8)))
    return root


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(make_tiny("llama_gqa"), tmp_path_factory.mktemp("tiny_eval"))


def test_perplexity_equals_exp_mean_nll():
    model = make_tiny("phi_mha")
    ids = torch.randint(2, 258, (70,), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, ids, seqlen=16)
    windows = ids[:64].view(4, 16)
    with torch.no_grad():
        logits = model(windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert got["windows"] == 4 and got["tokens"] == 60
    assert math.isclose(got["perplexity"], math.exp(float(nll)), rel_tol=1e-5)


def test_perplexity_windows_begin_as_the_tokenizer_begins_a_text():
    """With a prefix (a BOS) every window is the prefix and the next text tokens, and every text token is scored,
    the first one from the prefix alone: a direct computation window by window."""
    model = make_tiny("phi_mha")
    ids = torch.randint(2, 258, (70,), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, ids, seqlen=16, prefix=[1])
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for w in range(4):  # 70 text tokens give 4 windows of 15
            text = ids[15 * w:15 * (w + 1)]
            logits = model(torch.cat([torch.tensor([1]), text])[None]).logits[0]
            nll += float(F.cross_entropy(logits[:-1], text, reduction="sum"))
            tokens += len(text)
    assert got["windows"] == 4 and got["tokens"] == tokens == 60
    assert math.isclose(got["perplexity"], math.exp(nll / tokens), rel_tol=1e-5)


def _choice_logprob(model, tok, context, continuation):
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_all_seven_tasks_end_to_end(eval_data, tiny_folder, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "eval", tiny_folder, "--data-dir", eval_data, "--seqlen", 32,
                                "--json", out_json, "--baseline", tiny_folder, "--quiet", "--batch-size", 2)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert set(result["tasks"]) == set(ROWS)
    for task, scores in result["tasks"].items():
        assert scores["n"] == len(ROWS[task])
        assert 0.0 <= scores["acc"] <= 1.0
        assert (scores["acc_norm"] is None) == (task in ("boolq", "winogrande"))
        for metric, bits in scores["rows"].items():  # per-row outcomes, for paired comparisons
            assert len(bits) == scores["n"] and bits.count("1") / len(bits) == pytest.approx(scores[metric])
    assert set(result["perplexity"]) == {"wikitext2@32", "c4@32"}
    # Same model as its own baseline: every delta is zero, and both averages exist.
    assert result["averages"]["seven_task"]["value"] == result["baseline"]["averages"]["seven_task"]["value"]
    assert result["averages"]["five_task"]["value"] is not None
    assert "| piqa (n=3) | acc_norm % |" in stdout and "+0.00" in stdout

    # An independent computation of piqa's accuracy: the tiny model's own log-likelihoods of each solution.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_folder), AutoTokenizer.from_pretrained(tiny_folder)
    outcomes = ""
    for row in ROWS["piqa"]:
        lp = [_choice_logprob(model, tok, f"Question: {row['goal']}\nAnswer:", f" {s}") for s in (row["sol1"], row["sol2"])]
        outcomes += str(int(lp.index(max(lp)) == row["label"]))
    assert result["tasks"]["piqa"]["acc"] == pytest.approx(outcomes.count("1") / 3)
    assert result["tasks"]["piqa"]["rows"]["acc"] == outcomes


def test_limit_and_default_task_discovery(eval_data, tiny_folder, tmp_path):
    (tmp_path / "tasks").mkdir()
    for task in ("piqa", "arc_easy"):
        (tmp_path / "tasks" / f"{task}.jsonl").write_text((eval_data / "tasks" / f"{task}.jsonl").read_text())
    result = amp.evaluate(tiny_folder, ppl=[], data_dir=tmp_path, limit=1, batch_size=2, progress=False)
    assert set(result["tasks"]) == {"piqa", "arc_easy"} and all(s["n"] == 1 for s in result["tasks"].values())
    assert set(result["skipped_tasks"]) == {"boolq", "hellaswag", "winogrande", "arc_challenge", "openbookqa"}
    assert result["averages"]["seven_task"]["value"] is None


def _broken(eval_data, tmp_path, task, text):
    root = tmp_path / f"broken_{task}"
    (root / "tasks").mkdir(parents=True)
    (root / "tasks" / f"{task}.jsonl").write_text(text)
    return root


@pytest.mark.parametrize("case", ["unknown_task", "missing_file", "bad_json", "missing_field", "missing_model",
                                  "no_config", "not_causal", "unknown_corpus"])
def test_eval_bad_input(case, eval_data, tiny_folder, tmp_path, capsys):
    args = {
        "unknown_task": ([tiny_folder, "--tasks", "piqa,nonsense", "--data-dir", eval_data], "nonsense"),
        "missing_file": ([tiny_folder, "--tasks", "hellaswag", "--data-dir", tmp_path], "hellaswag.jsonl"),
        "bad_json": ([tiny_folder, "--tasks", "piqa", "--data-dir",
                      _broken(eval_data, tmp_path, "piqa", '{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n{x\n')],
                     "piqa.jsonl:2"),
        "missing_field": ([tiny_folder, "--tasks", "openbookqa", "--data-dir",
                           _broken(eval_data, tmp_path, "openbookqa", '{"id": "1", "question_stem": "q"}\n')],
                          "openbookqa.jsonl:1"),
        "missing_model": ([tmp_path / "nowhere", "--data-dir", eval_data], "missing"),
        "no_config": ([eval_data, "--data-dir", eval_data], "no config.json"),
        "not_causal": ([_not_causal(tmp_path), "--data-dir", eval_data], "not a causal LM"),
        "unknown_corpus": ([tiny_folder, "--ppl", "ptb", "--data-dir", eval_data], "ptb"),
    }
    argv, expected = args[case]
    code, _, err = run_cli(capsys, "eval", *argv, "--quiet")
    assert_clean_failure(code, err, None)
    assert expected in err
    if case == "missing_file":
        assert "question_stem" not in err and "endings" in err  # names the expected format


def test_missing_corpus_is_skipped_by_default_and_refused_when_asked_for(eval_data, tiny_folder, tmp_path, capsys):
    """A data folder with tasks/ but no text/: the default perplexity corpora are skipped with a note; an
    explicit --ppl wikitext2 still fails clearly."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "piqa.jsonl").write_text((eval_data / "tasks" / "piqa.jsonl").read_text())
    code, out, _ = run_cli(capsys, "eval", tiny_folder, "--tasks", "piqa", "--data-dir", tmp_path, "--quiet")
    assert code == 0
    assert "perplexity on wikitext2 skipped" in out and "perplexity on c4 skipped" in out and "piqa" in out
    code, _, err = run_cli(capsys, "eval", tiny_folder, "--tasks", "piqa", "--ppl", "wikitext2",
                           "--data-dir", tmp_path, "--quiet")
    assert_clean_failure(code, err, None)
    assert "wikitext2_test.txt is missing" in err


def test_tasks_none_is_perplexity_only_as_ppl_none_is_tasks_only(eval_data, tiny_folder, capsys, tmp_path):
    code, out, err = run_cli(capsys, "eval", tiny_folder, "--tasks", "none", "--ppl", "wikitext2", "--seqlen", 64,
                             "--max-windows", 2, "--data-dir", eval_data, "--quiet", "--json", tmp_path / "r.json")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["tasks"] == {} and "wikitext2@64" in result["perplexity"]


@pytest.mark.parametrize("result_line", [True, False])
def test_vllm_worker_exit_after_its_result(result_line, eval_data, tiny_folder, tmp_path):
    """vLLM's engine threads can abort the worker's interpreter at shutdown ("terminate called without an active
    exception") after the whole result line is out: that result stands, with a note; without the line it fails with
    the runtime's last words."""
    from amp.common.errors import AmpError
    from amp.quality.on_vllm import evaluate_on_vllm
    fake = tmp_path / "python"
    line = 'echo \'RESULT {"tasks": {}, "perplexity": {}, "notes": []}\'\n' if result_line else ""
    fake.write_text(f"#!/bin/sh\n{line}echo 'terminate called without an active exception' >&2\nexit 134\n")
    fake.chmod(0o755)
    args = (tiny_folder, [], {}, 16, eval_data, None, None)
    if result_line:
        result = evaluate_on_vllm(*args, vllm_python=str(fake), progress=False)
        assert result["backend"]["name"] == "vllm" and result["notes"] == [
            "vLLM exited with code 134 after writing its results (shutdown)"]
    else:
        with pytest.raises(AmpError, match="terminate called without an active exception"):
            evaluate_on_vllm(*args, vllm_python=str(fake), progress=False)

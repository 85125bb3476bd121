"""Zero-shot accuracy through lm-eval (lm-evaluation-harness): its own task definitions and prompts, pointed at
local files in the Hugging Face row format, the model handed over in memory. Nothing reaches the network."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import AmpError
from ..io.calibration import read_jsonl


@dataclass(frozen=True)
class TaskFile:
    file: str                      # under <data-dir>/tasks/
    split: str                     # the split lm-eval scores for this task
    fields: tuple[str, ...]        # fields every row must have
    metric: str                    # the metric the averages use


# The seven commonsense tasks pruning papers report. Averages use acc_norm where lm-eval defines it (length-
# normalised, the usual choice for multi-token answers) and acc for boolq and winogrande (acc only).
TASKS = {
    "boolq": TaskFile("boolq.jsonl", "validation", ("question", "passage", "label"), "acc"),
    "piqa": TaskFile("piqa.jsonl", "validation", ("goal", "sol1", "sol2", "label"), "acc_norm"),
    "hellaswag": TaskFile("hellaswag.jsonl", "validation",
                          ("activity_label", "ctx_a", "ctx_b", "ctx", "endings", "label"), "acc_norm"),
    "winogrande": TaskFile("winogrande.jsonl", "validation", ("sentence", "option1", "option2", "answer"), "acc"),
    "arc_easy": TaskFile("arc_easy.jsonl", "test", ("question", "choices", "answerKey"), "acc_norm"),
    "arc_challenge": TaskFile("arc_challenge.jsonl", "test", ("question", "choices", "answerKey"), "acc_norm"),
    "openbookqa": TaskFile("openbookqa.jsonl", "test", ("question_stem", "choices", "answerKey"), "acc_norm"),
}
SEVEN = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
FIVE = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")


def task_path(task: str, data_dir: Path) -> Path:
    return Path(data_dir) / "tasks" / TASKS[task].file


def check_task_file(task: str, data_dir: Path) -> int:
    """Validates a task file row by row; returns its row count. Errors name the file (and line)."""
    spec = TASKS[task]
    path = task_path(task, data_dir)
    expected = f"one JSON object per line with fields {', '.join(spec.fields)} (Hugging Face {task} rows)"
    if not path.is_file():
        raise AmpError(f"task {task}: data file {path} is missing; expected {expected}")
    rows = read_jsonl(path, f"; expected {expected}")
    for n, row in rows:
        missing = [k for k in spec.fields if not isinstance(row, dict) or k not in row]
        if missing:
            raise AmpError(f"{path}:{n}: malformed row, missing {', '.join(missing)}; expected {expected}")
    if not rows:
        raise AmpError(f"task {task}: {path} has no rows; expected {expected}")
    return len(rows)


def _task_config(task_manager, task: str, data_dir: Path) -> dict:
    """lm-eval's own config for the task, with its data source replaced by the local file."""
    from lm_eval.tasks._yaml_loader import load_yaml
    entry = task_manager._entry(task)  # noqa: SLF001 - the registry lookup lm-eval itself uses
    if entry is None or entry.yaml_path is None:
        raise AmpError(f"lm-eval does not define the task {task}")
    split = TASKS[task].split
    config = load_yaml(entry.yaml_path, resolve_func=True)
    for key in ("tag", "group"):
        config.pop(key, None)
    config.update(task=task, dataset_path="json", dataset_name=None,
                  dataset_kwargs={"data_files": {split: str(task_path(task, data_dir))}},
                  training_split=None, validation_split=split if split == "validation" else None,
                  test_split=split if split == "test" else None, fewshot_split=None)
    return config


def run_zero_shot(model, tokenizer, tasks: list[str], data_dir: Path, limit: int | None = None,
                  batch_size: int = 8, device: str = "cpu") -> dict:
    """{task: {"acc", "acc_norm" (None where undefined), "n", "rows"}} as fractions; "rows" holds, per metric,
    each evaluated row's 0/1 outcome as a string in row order, so that two models evaluated on the same rows can be
    compared row by row (benchmarks/quality_paired.py)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise AmpError(f"unknown task {', '.join(unknown)}; known: {', '.join(SEVEN)}")
    for t in tasks:
        check_task_file(t, data_dir)
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise AmpError("zero-shot evaluation needs lm-eval: pip install lm-eval") from None
    manager = TaskManager(verbosity="ERROR")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = simple_evaluate(model=lm, tasks=[_task_config(manager, t, data_dir) for t in tasks], limit=limit,
                          task_manager=manager, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    results = {}
    for t in tasks:
        r = out["results"][t]
        n = out.get("n-samples", {}).get(t, {}).get("effective")
        results[t] = {"acc": r.get("acc,none"), "acc_norm": r.get("acc_norm,none"), "n": n,
                      "rows": row_outcomes(out.get("samples", {}).get(t, []))}
    return results


def row_outcomes(samples: list[dict]) -> dict[str, str]:
    """{metric: "0110..."} over lm-eval's logged samples, ordered by row (doc_id)."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return {m: "".join("1" if s[m] else "0" for s in ordered)
            for m in ("acc", "acc_norm") if ordered and all(m in s for s in ordered)}

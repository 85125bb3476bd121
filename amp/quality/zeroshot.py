"""Zero-shot accuracy through lm-eval (lm-evaluation-harness): its own task definitions and prompts, pointed at
local files in the Hugging Face row format, the model handed over in memory. Nothing reaches the network."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import AmpError
from ..io.calibration import read_jsonl
from .vllm_worker import row_outcomes, summarize, task_config  # noqa: F401 - row_outcomes is part of this API


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
    configs = []
    for t in tasks:
        try:
            configs.append(task_config(manager, t, TASKS[t].split, str(task_path(t, data_dir))))
        except ValueError as e:
            raise AmpError(str(e)) from None
    out = simple_evaluate(model=lm, tasks=configs, limit=limit, task_manager=manager, log_samples=True,
                          bootstrap_iters=0, verbosity="ERROR")
    return summarize(out, tasks)


def task_files(tasks: list[str], data_dir: Path) -> list[tuple[str, str, str]]:
    """(task, split, file) per task: what a worker in another environment needs to build the same configs."""
    return [(t, TASKS[t].split, str(task_path(t, data_dir))) for t in tasks]

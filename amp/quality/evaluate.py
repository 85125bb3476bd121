"""`amp eval`: perplexity (perplexity.py) and zero-shot accuracy through lm-eval (zeroshot.py) of one model folder,
as the JSON that `amp eval --json` writes, with the averages pruning papers report; in process through
transformers, or through vLLM (on_vllm.py)."""
from __future__ import annotations

import time
from pathlib import Path

from ..common.errors import AmpError
from ..io.calibration import default_data_dir
from ..io.loading import load_causal_lm
from ..runtime.fused import accelerate_
from . import zeroshot
from .on_vllm import evaluate_on_vllm
from ..io.calibration import text_prefix
from .perplexity import CORPORA, DEFAULT_MAX_WINDOWS, corpus_text, perplexity, tokenize_text


def evaluate(model_dir, tasks: list[str] | None = None, ppl: list[str] | tuple | None = None,
             seqlen: int = 2048, data_dir=None, limit: int | None = None, batch_size: int = 8,
             device: str = "cpu", max_windows: int | None = None, progress: bool = True,
             accelerate: bool = False, backend: str = "transformers", vllm: dict | None = None) -> dict:
    """Perplexity and zero-shot accuracy of one model folder, as the JSON that `amp eval --json` writes;
    `accelerate`: through the fused attention and MLP (amp.accelerate_). `backend` "vllm": the same through vLLM
    (on_vllm.py; `vllm`: its options, tensor_parallel_size, data_parallel_size, dtype, vllm_python)."""
    if backend not in ("transformers", "vllm"):
        raise AmpError(f"unknown --backend {backend!r} (choose transformers or vllm)")
    if backend == "vllm" and accelerate:
        raise AmpError("--accelerate runs amp's fused layers in transformers; vLLM runs its own kernels")
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if data_dir is None:
        raise AmpError("no data folder: pass --data-dir (holding text/ and tasks/) or set AMP_DATA_DIR")
    if seqlen < 2:
        raise AmpError(f"--seqlen must be at least 2, got {seqlen}")
    skipped = {}
    if tasks is None:  # the default: every one of the seven whose file is present, the rest said so
        tasks = [t for t in zeroshot.SEVEN if zeroshot.task_path(t, data_dir).is_file()]
        skipped = {t: f"{zeroshot.task_path(t, data_dir)} not present"
                   for t in zeroshot.SEVEN if t not in tasks}
    unknown = [t for t in tasks if t not in zeroshot.TASKS]
    if unknown:
        raise AmpError(f"unknown task {', '.join(unknown)}; known: {', '.join(zeroshot.SEVEN)}")
    for t in tasks:
        zeroshot.check_task_file(t, data_dir)
    skipped_corpora = {}
    if ppl is None:  # the default: both corpora where present, a missing one skipped and said so
        ppl = [name for name in CORPORA if (data_dir / CORPORA[name]).is_file()]
        skipped_corpora = {name: f"{data_dir / CORPORA[name]} not present" for name in CORPORA if name not in ppl}
    texts = {name: corpus_text(name, data_dir) for name in ppl}   # check every input before the long work
    if backend == "vllm":
        result = evaluate_on_vllm(model_dir, tasks, texts, seqlen, data_dir, limit, max_windows, progress=progress,
                                  **(vllm or {}))
        result["skipped_tasks"], result["skipped_corpora"], result["accelerated"] = skipped, skipped_corpora, False
        result["averages"] = averages(result)
        return result
    model, tokenizer = load_causal_lm(model_dir, device=device)
    if accelerate:
        accelerate_(model)
    result = evaluate_model(model, tokenizer, str(model_dir), tasks, texts, seqlen, data_dir, limit, batch_size,
                            device, max_windows, progress, skipped)
    result["skipped_corpora"] = skipped_corpora
    result["accelerated"] = accelerate
    return result


def evaluate_model(model, tokenizer, name: str, tasks: list[str], texts: dict[str, str], seqlen: int,
                   data_dir: Path, limit: int | None, batch_size: int, device: str, max_windows: int | None,
                   progress: bool, skipped: dict | None = None) -> dict:
    """`evaluate` for a model already in memory (inputs already checked); texts: corpus name -> text."""
    result = {"model": name, "parameters": sum(p.numel() for p in model.parameters()),
              "tasks": {}, "perplexity": {}, "perplexity_tokens": {}, "limit": limit, "skipped_tasks": skipped or {},
              "metric": {t: zeroshot.TASKS[t].metric for t in tasks}, "seconds": {}}
    for name, text in texts.items():
        start = time.perf_counter()
        windows = max_windows if max_windows is not None else DEFAULT_MAX_WINDOWS[name]
        r = perplexity(model, tokenize_text(tokenizer, text), seqlen, windows, batch_size=1, device=device,
                       progress=progress, prefix=text_prefix(tokenizer))
        key = f"{name}@{seqlen}"
        result["perplexity"][key] = r["perplexity"]
        result["perplexity_tokens"][key] = r["tokens"]
        result["seconds"][f"ppl_{key}"] = round(time.perf_counter() - start, 2)
    if tasks:
        start = time.perf_counter()
        result["tasks"] = zeroshot.run_zero_shot(model, tokenizer, tasks, data_dir, limit, batch_size, device)
        result["seconds"]["zero_shot"] = round(time.perf_counter() - start, 2)
    result["averages"] = averages(result)
    return result


def averages(result: dict) -> dict:
    """The seven- and five-task averages (each task's own metric); None where a task is missing."""
    FIVE, SEVEN, TASKS = zeroshot.FIVE, zeroshot.SEVEN, zeroshot.TASKS
    out = {}
    for name, group in (("seven_task", SEVEN), ("five_task", FIVE)):
        got = [result["tasks"][t][TASKS[t].metric] for t in group if t in result["tasks"]]
        missing = [t for t in group if t not in result["tasks"]]
        out[name] = {"value": sum(got) / len(got) if got and not missing else None, "missing": missing,
                     "metrics": {t: TASKS[t].metric for t in group}}
    done = [t for t in SEVEN if t in result["tasks"]]
    if done:  # whatever was evaluated, named, so that partial suites still compare like with like
        out["evaluated"] = {"value": sum(result["tasks"][t][TASKS[t].metric] for t in done) / len(done),
                            "missing": [], "tasks": done, "metrics": {t: TASKS[t].metric for t in done}}
    return out

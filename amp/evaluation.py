"""Quality measures of a (pruned) model: perplexity on WikiText-2 / C4 (non-overlapping windows, exp of the
mean token NLL) and zero-shot accuracy through lm-eval (zeroshot.py); `evaluate` runs both for a folder."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import read_jsonl
from .errors import AmpError

CORPORA = {"wikitext2": "text/wikitext2_test.txt", "c4": "text/c4_validation_2k.jsonl"}
# C4 is large: papers (SparseGPT and after) score its first 256 windows.
DEFAULT_MAX_WINDOWS = {"wikitext2": None, "c4": 256}


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
               batch_size: int = 1, device: str = "cpu", progress: bool = False) -> dict:
    """exp of the mean next-token NLL over non-overlapping windows of `seqlen` (a trailing partial window
    is dropped); returns {"perplexity", "tokens" (scored), "windows"}."""
    n = len(token_ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise AmpError(f"need at least {seqlen} tokens for one perplexity window, got {len(token_ids)}")
    windows = token_ids[: n * seqlen].view(n, seqlen)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    return {"perplexity": math.exp(total_nll / total_tokens), "tokens": total_tokens, "windows": n}


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def corpus_text(name: str, data_dir: Path) -> str:
    if name not in CORPORA:
        raise AmpError(f"unknown perplexity corpus {name!r}; known: {', '.join(CORPORA)}")
    path = Path(data_dir) / CORPORA[name]
    if not path.is_file():
        raise AmpError(f"perplexity corpus {name}: {path} is missing")
    if path.suffix == ".jsonl":
        docs = []
        for n, row in read_jsonl(path, "; expected {\"text\": ...} rows"):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise AmpError(f"{path}:{n}: malformed row; expected {{\"text\": ...}} rows")
            docs.append(row["text"])
        return "\n\n".join(docs)
    return path.read_text(encoding="utf-8")


def load_causal_lm(folder, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Any causal LM folder (pruned or not): (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise AmpError(f"model folder {folder} is missing or has no config.json")
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise AmpError(f"{folder} is not a causal LM (architectures: {archs or 'none'})")
    from transformers import AutoConfig

    from .heterogeneous import check_tensors
    check_tensors(folder, AutoConfig.from_pretrained(folder, local_files_only=True))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise AmpError(f"could not load {folder}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), tokenizer


def evaluate(model_dir, tasks: list[str] | None = None, ppl: list[str] | tuple | None = None,
             seqlen: int = 2048, data_dir=None, limit: int | None = None, batch_size: int = 8,
             device: str = "cpu", max_windows: int | None = None, progress: bool = True,
             accelerate: bool = False) -> dict:
    """Perplexity and zero-shot accuracy of one model folder, as the JSON that `amp eval --json` writes;
    `accelerate`: through the fused attention and MLP (amp.accelerate_)."""
    from . import zeroshot
    from .data import default_data_dir
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
    model, tokenizer = load_causal_lm(model_dir, device=device)
    if accelerate:
        from .inference import accelerate_
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
    from . import zeroshot
    result = {"model": name, "parameters": sum(p.numel() for p in model.parameters()),
              "tasks": {}, "perplexity": {}, "perplexity_tokens": {}, "limit": limit, "skipped_tasks": skipped or {},
              "metric": {t: zeroshot.TASKS[t].metric for t in tasks}, "seconds": {}}
    for name, text in texts.items():
        start = time.perf_counter()
        windows = max_windows if max_windows is not None else DEFAULT_MAX_WINDOWS[name]
        r = perplexity(model, tokenize_text(tokenizer, text), seqlen, windows, batch_size=1, device=device,
                       progress=progress)
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
    from .zeroshot import FIVE, SEVEN, TASKS
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

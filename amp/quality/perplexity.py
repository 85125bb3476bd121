"""Perplexity as pruning papers measure it: non-overlapping windows of `seqlen` tokens of WikiText-2 or C4 (C4: its
first 256 windows, as SparseGPT does), exp of the mean next-token NLL. Each window begins as the tokenizer begins
a text (its BOS where it adds one, as lm-eval's rolling windows do): Gemma without it is another model."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..common.errors import AmpError
from ..io.calibration import read_jsonl

CORPORA = {"wikitext2": "text/wikitext2_test.txt", "c4": "text/c4_validation_2k.jsonl"}
# C4 is large: papers (SparseGPT and after) score its first 256 windows.
DEFAULT_MAX_WINDOWS = {"wikitext2": None, "c4": 256}


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
               batch_size: int = 1, device: str = "cpu", progress: bool = False, prefix: list[int] = ()) -> dict:
    """exp of the mean next-token NLL over non-overlapping windows of `seqlen` tokens (a trailing partial window
    is dropped); each window begins with `prefix` (what the tokenizer puts before a text, calibration.text_prefix:
    a BOS where the model expects one) and every text token after it is scored. Returns {"perplexity", "tokens"
    (scored), "windows"}."""
    windows = perplexity_windows(token_ids, seqlen, max_windows, prefix)
    start = max(len(prefix) - 1, 0)  # the first scored position predicts the first text token
    total_nll, total_tokens = 0.0, 0
    for first in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = windows[first:first + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, start:-1].reshape(-1, logits.shape[-1]), batch[:, start + 1:].reshape(-1),
                              reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, start + 1:].numel()
    return {"perplexity": math.exp(total_nll / total_tokens), "tokens": total_tokens, "windows": len(windows)}


def perplexity_windows(token_ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                       prefix: list[int] = ()) -> torch.Tensor:
    """(n, seqlen) windows: `prefix`, then the next seqlen - len(prefix) tokens of the text, consecutive."""
    span = seqlen - len(prefix)
    n = len(token_ids) // span if span > 0 else 0
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise AmpError(f"need at least {span} tokens for one perplexity window, got {len(token_ids)}")
    windows = token_ids[: n * span].view(n, span)
    if prefix:
        windows = torch.cat([torch.tensor(list(prefix), dtype=torch.long).expand(n, len(prefix)), windows], 1)
    return windows


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

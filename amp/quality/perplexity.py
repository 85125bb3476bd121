"""Perplexity as pruning papers measure it: non-overlapping windows of `seqlen` tokens of WikiText-2 or C4 (C4: its
first 256 windows, as SparseGPT does), exp of the mean next-token NLL."""
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

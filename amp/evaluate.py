"""Quality measures of a (pruned) model. Perplexity: non-overlapping windows, exp(mean token NLL)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
               batch_size: int = 1, device: str = "cpu", progress: bool = False) -> dict:
    """exp of the mean next-token NLL over non-overlapping windows of `seqlen` (a trailing partial window
    is dropped); returns {"perplexity", "tokens" (scored), "windows"}."""
    n = len(token_ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"need at least {seqlen} tokens for one window, got {len(token_ids)}")
    windows = token_ids[: n * seqlen].view(n, seqlen)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc="perplexity", disable=not progress):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    return {"perplexity": math.exp(total_nll / total_tokens), "tokens": total_tokens, "windows": n}


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

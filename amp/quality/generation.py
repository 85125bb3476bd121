"""`amp generate`: greedy continuation of a prompt by a model folder, with its speed (prefill and decode apart)."""
from __future__ import annotations

import time

import torch

from ..common.errors import AmpError
from ..io.loading import load_causal_lm
from ..runtime.fused import accelerate_


@torch.no_grad()
def generate_text(folder, prompt: str, max_new_tokens: int = 64, accelerate: bool = False, device: str = "cpu",
                  dtype: str = "auto") -> dict:
    """{"text", "new_tokens", "prompt_tokens", "seconds", "tokens_per_s", "prefill_s", "path"}."""
    if not prompt.strip():
        raise AmpError("the prompt is empty")
    if max_new_tokens < 1:
        raise AmpError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if device == "cuda" and not torch.cuda.is_available():
        raise AmpError("--device cuda was asked for, but this machine has no CUDA device")
    model, tokenizer = load_causal_lm(folder, dtype=dtype, device=device)
    if accelerate:
        accelerate_(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    model(ids, use_cache=False)  # the prompt alone, to split prefill from decode in the figures
    sync()
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    sync()
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new),
            "prompt_tokens": ids.shape[1], "seconds": seconds, "tokens_per_s": len(new) / seconds,
            "prefill_s": prefill, "path": "fused (amp.accelerate_)" if accelerate else "stock transformers"}

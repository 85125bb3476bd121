"""Recovery data: Alpaca records as prompt + response (the calibration prompt format), text rows or a text file's
paragraphs, tokenized one sample per record, and each epoch's length-grouped batches in an order fixed by the seed."""
from __future__ import annotations

import random

import torch

from ..common.errors import AmpError
from ..io.calibration import pad_right, read_records, resolve_source


def training_texts(source: str, data_dir=None) -> list[str]:
    """Alpaca records as prompt + response (the calibration prompt format), text rows, or a text file's
    paragraphs."""
    path = resolve_source(source, data_dir)
    texts, _ = read_records(path, with_response=True)
    if path.suffix not in (".json", ".jsonl"):
        texts = [p for p in texts[0].split("\n\n") if p.strip()]
    if not any(t.strip() for t in texts):
        raise AmpError(f"{path}: the recovery data file is empty" if not texts else f"{path}: every record is empty")
    return texts


def tokenize(texts: list[str], tokenizer, seqlen: int) -> list[torch.Tensor]:
    """One sample per record: its tokens (truncated to seqlen) and the end-of-sequence token."""
    eos = tokenizer.eos_token_id
    samples = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if eos is not None:
            ids = ids + [eos]
        ids = ids[:seqlen]
        if len(ids) >= 2:
            samples.append(torch.tensor(ids, dtype=torch.long))
    return samples


def epoch_batches(samples: list[torch.Tensor], batch_size: int, seed: int, epoch: int, pad_id: int):
    """The batches of one epoch, in an order fixed by (seed, epoch): (input_ids, attention_mask). Records of
    similar length are batched together (shuffled, then sorted by length within chunks of 64 batches, and the
    batches shuffled), as transformers' group_by_length does: right padding to the longest record of a random
    batch would triple the compute on Alpaca, whose records run from 20 to 256 tokens."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(samples)))
    rng.shuffle(order)
    usable = len(order) - len(order) % batch_size if len(order) >= batch_size else len(order)
    order = order[:usable]
    chunk = 64 * batch_size
    order = [i for start in range(0, len(order), chunk)
             for i in sorted(order[start:start + chunk], key=lambda i: -len(samples[i]))]
    groups = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    rng.shuffle(groups)
    return [pad_right([samples[i] for i in group], pad_id) for group in groups]

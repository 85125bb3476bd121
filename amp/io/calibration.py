"""Calibration data: Alpaca prompts as the paper formats them, or text corpora cut into fixed windows; and the
right-padded batches that calibration and recovery both run.

Sources: `alpaca`, `wikitext2`, `c4` (looked up in the data folder: --data-dir, $AMP_DATA_DIR, or the
repository's ../shared/data; `alpaca` and `c4` fall back to the samples bundled in the package: 256 Alpaca
records, and the first 506 documents (1.1 M characters) of the C4 validation subset), or a user's file:
.txt (plain text), .json (a list of Alpaca records), .jsonl (rows with `text`, or Alpaca records).
Sampling is deterministic for a seed.
"""
from __future__ import annotations

import bisect
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..common.errors import AmpError

RESOURCES = Path(__file__).resolve().parents[1] / "resources"
BUNDLED = {"alpaca": RESOURCES / "alpaca_sample.json", "c4": RESOURCES / "c4_sample.jsonl"}
# Default sample counts: Alpaca prompts are short (about 22 tokens each), text corpora are cut into windows.
DEFAULT_PROMPTS, DEFAULT_WINDOWS = 128, 64
_CORPUS_FILES = {"alpaca": "text/alpaca_5000.json", "wikitext2": "text/wikitext2_test.txt",
                 "c4": "text/c4_validation_2k.jsonl"}


@dataclass
class Calibration:
    name: str                    # what the report calls it
    samples: list[torch.Tensor]  # 1-D token id tensors
    file: str | None = None      # where the text came from
    held_out: list[torch.Tensor] = field(default_factory=list)  # windows kept apart from the samples (kl)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.samples)


def default_data_dir() -> Path | None:
    env = os.environ.get("AMP_DATA_DIR")
    if env:
        return Path(env)
    guess = Path(__file__).resolve().parents[3] / "shared" / "data"
    return guess if guess.is_dir() else None


def resolve_source(source: str, data_dir: str | os.PathLike | None = None) -> Path:
    if source in _CORPUS_FILES:
        base = Path(data_dir) if data_dir else default_data_dir()
        path = base / _CORPUS_FILES[source] if base else None
        if path is not None and path.is_file():
            return path
        if source in BUNDLED:
            return BUNDLED[source]
        raise AmpError(f"calibration set {source!r} not found: expected {_CORPUS_FILES[source]} under "
                       f"{base or 'a data folder'} (set --data-dir or AMP_DATA_DIR)")
    path = Path(source)
    if not path.is_file():
        raise AmpError(f"calibration file {source} does not exist (or use alpaca, wikitext2, c4)")
    return path


def alpaca_prompt(record: dict) -> str:
    """The paper's format: Instruction / Input / Response, the Input line only when there is one."""
    text = f"Instruction: {record.get('instruction', '').strip()}\n"
    if record.get("input", "").strip():
        text += f"Input: {record['input'].strip()}\n"
    return text + "Response:"


def read_jsonl(path: Path, expected: str = "") -> list[tuple[int, object]]:
    """(line number, parsed row) for every non-blank line; a bad line is an error naming file and line."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise AmpError(f"{path}:{n}: not valid JSON ({e.msg}){expected}") from None
    return rows


def read_records(path: Path, with_response: bool = False) -> tuple[list[str], bool]:
    """(texts, are_alpaca) of a data file, for calibration and recovery alike. `.json`: a list of records;
    `.jsonl`: one record per line; any other file: plain text (one text). A record is Alpaca (`instruction`,
    `input`: the prompt as the paper formats it, and with `with_response` its `output` after it) or a row with
    `text`, all of one kind. A bad record is named by file:line (`.jsonl`) or file:record number (`.json`)."""
    try:
        if path.suffix == ".json":
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise AmpError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rows, list):
                raise AmpError(f"{path}: expected a JSON list of records")
            numbered, where = list(enumerate(rows, 1)), "record"
        elif path.suffix == ".jsonl":
            numbered, where = read_jsonl(path), "line"
        else:
            return [path.read_text(encoding="utf-8")], False
    except UnicodeDecodeError:
        raise AmpError(f"{path}: not UTF-8 text") from None
    texts, kind = [], None
    for n, row in numbered:
        if isinstance(row, dict) and isinstance(row.get("instruction"), str):
            this = "Alpaca"
            texts.append(alpaca_prompt(row) + (f" {str(row.get('output', '')).strip()}" if with_response else ""))
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            this = "text"
            texts.append(row["text"])
        else:
            raise AmpError(f"{path}:{n}: {where} {n} has neither Alpaca 'instruction' fields nor a 'text' field")
        if kind is not None and this != kind:
            raise AmpError(f"{path}:{n}: {where} {n} is a {this} record among {kind} records; use one kind per file")
        kind = this
    return texts, kind == "Alpaca"


def text_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before every text it encodes: a BOS for Gemma, LLaMA, Mistral; none for
    SmolLM2 or Qwen. A window cut from the middle of a corpus is given them, because every input the model meets
    in use begins with them: without its BOS Gemma-3-270M reads WikiText-2 at perplexity 41.05, with it 22.99, and
    a prune calibrated on windows without it fits the pruned model to inputs nobody gives it (issue 29)."""
    probe = "a"
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k]
    return []


def load_calibration(tokenizer, source: str = "c4", nsamples: int | None = None, seqlen: int = 512, seed: int = 0,
                     data_dir: str | os.PathLike | None = None, holdout: int = 0) -> Calibration:
    """`nsamples` prompts (default 128) of a prompt set, or windows of `seqlen` tokens (default 64) of a text.
    `holdout`: as many more samples again, disjoint from those (other prompts; windows that overlap none of the
    calibration windows), drawn after them, so that the calibration samples are the same with or without."""
    path = resolve_source(source, data_dir)
    texts, is_prompts = read_records(path)
    if nsamples is None:
        nsamples = DEFAULT_PROMPTS if is_prompts else DEFAULT_WINDOWS
    rng = random.Random(seed)
    name = source if source in _CORPUS_FILES else str(path)
    if is_prompts:
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise AmpError(f"calibration file {path} has no prompts")
        picks = rng.sample(texts, nsamples) if nsamples <= len(texts) else [rng.choice(texts) for _ in range(nsamples)]
        encode = lambda t: torch.tensor(tokenizer(t, add_special_tokens=True)["input_ids"][:seqlen],  # noqa: E731
                                        dtype=torch.long)
        samples = [encode(t) for t in picks]
        held = []
        if holdout:
            rest = sorted(set(texts) - set(picks))
            if len(rest) < holdout:
                raise AmpError(f"calibration file {path} has {len(rest)} prompts beyond the {nsamples} calibration "
                               f"samples, fewer than the {holdout} to hold back")
            held = [encode(t) for t in rng.sample(rest, holdout)]
        return Calibration(name, [s for s in samples if len(s) > 0], str(path), [s for s in held if len(s) > 0])
    # Text corpus: concatenate, tokenize once (only as much as needed) and cut random windows of seqlen tokens,
    # each beginning with what the tokenizer puts before a text (text_prefix).
    prefix = torch.tensor(text_prefix(tokenizer), dtype=torch.long)
    span = seqlen - len(prefix)
    if span < 1:
        raise AmpError(f"--seqlen {seqlen} leaves no room for text after the tokenizer's {len(prefix)} leading tokens")
    joined = _joined(texts)
    if not joined.strip():
        raise AmpError(f"calibration file {path} is empty")
    ids = torch.tensor(tokenizer(joined[: chars_read(nsamples, seqlen)], add_special_tokens=False)["input_ids"],
                       dtype=torch.long)
    if len(ids) < span:
        raise AmpError(f"calibration file {path} holds {len(ids)} tokens, too short for one window of {seqlen}")
    starts = [rng.randrange(0, len(ids) - span + 1) for _ in range(nsamples)]
    held = _disjoint_windows(rng, len(ids), span, starts, holdout, path) if holdout else []
    window = lambda s: torch.cat([prefix, ids[s:s + span]])  # noqa: E731
    return Calibration(name, [window(s) for s in starts], str(path), [window(s) for s in held])


def _joined(texts: list[str]) -> str:
    """A text corpus's documents as the calibration reads them: the non-empty ones, a blank line between."""
    return "\n\n".join(t for t in texts if t.strip())


def chars_read(nsamples: int, seqlen: int) -> int:
    """How many leading characters of a text corpus the calibration tokenizes and draws its windows (and held-back
    windows) from: plenty for nsamples windows, bounded work. What lies beyond is text no prune saw."""
    return 4 * max(200_000, 8 * nsamples * seqlen)


def unseen_text(source: str, nsamples: int, seqlen: int, data_dir: str | os.PathLike | None = None) -> str:
    """The text corpus's documents that begin after the span a calibration of nsamples windows of seqlen reads
    (chars_read): its own domain, on text no window or held-back window came from."""
    joined = _joined(read_records(resolve_source(source, data_dir))[0])
    return joined[joined.index("\n\n", chars_read(nsamples, seqlen)) + 2:]


def _disjoint_windows(rng: random.Random, length: int, seqlen: int, taken: list[int], count: int, path) -> list[int]:
    """`count` window starts whose windows overlap none of `taken`'s (nor each other)."""
    used = sorted(taken)
    out = []
    for _ in range(1000 * count):
        if len(out) == count:
            break
        s = rng.randrange(0, length - seqlen + 1)
        i = bisect.bisect_left(used, s)
        if (i < len(used) and used[i] < s + seqlen) or (i > 0 and used[i - 1] + seqlen > s):
            continue
        bisect.insort(used, s)
        out.append(s)
    if len(out) < count:
        raise AmpError(f"calibration file {path} is too short to hold back {count} windows of {seqlen} tokens apart "
                       f"from the {len(taken)} calibration windows; use fewer samples or a smaller --holdout")
    return out


def make_batches(samples: list[torch.Tensor], batch_size: int, pad_id: int):
    """Right-padded batches (longest first, to waste little on padding): (input_ids, attention_mask)."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]))
    return [pad_right([samples[i] for i in order[start:start + batch_size]], pad_id)
            for start in range(0, len(order), batch_size)]


def pad_right(group: list[torch.Tensor], pad_id: int):
    """One right-padded batch of 1-D token tensors: (input_ids, attention_mask)."""
    width = max(len(s) for s in group)
    ids = torch.full((len(group), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(group), width), dtype=torch.long)
    for row, s in enumerate(group):
        ids[row, :len(s)] = s
        mask[row, :len(s)] = 1
    return ids, mask

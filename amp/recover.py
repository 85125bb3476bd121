"""Recovery after pruning: LoRA fine-tuning (peft) on instruction data, optionally distilled from the dense model.

The AMP paper's recipe is the default: LoRA rank 8 on every attention and MLP projection, Alpaca records in the
calibration prompt format followed by their response, language-model loss on all tokens. With a teacher, the
loss is (1 - w) * LM + w * T^2 * KL(teacher_T || student_T) on the logits (Minitron-style distillation).

The training loop is written here rather than through transformers' Trainer: the distillation loss, a token
budget, bit-exact resume (optimizer, schedule, data position and RNG in one checkpoint file) and the report's
figures are a few lines each, and Trainer would add its own checkpoint layout and logging on top.
The adapters are merged into the weights at the end (peft's merge_and_unload), so the result is a plain model
(or a heterogeneous one, exactly as its input) that loads without peft.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import AmpError


@dataclass(frozen=True)
class RecoverConfig:
    data: str = "alpaca"             # alpaca | path to .json / .jsonl (Alpaca records or {text}) / .txt
    steps: int | None = None         # optimizer steps; or
    epochs: float | None = None      # passes over the data; or
    tokens: int | None = None        # a training-token budget (what the benchmarks fix); default: 2 epochs
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lr: float = 1e-4
    warmup: float = 0.05             # share of the steps with a linearly rising learning rate
    seqlen: int = 256                # records are truncated to this many tokens
    batch_size: int = 8
    kd_weight: float = 0.5           # with a teacher: weight of the KL term (the LM loss gets 1 - w)
    temperature: float = 1.0
    max_records: int | None = None   # the first N records of the (shuffled) data
    checkpoint_every: int = 50       # steps between checkpoints (0: never)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        given = [k for k in ("steps", "epochs", "tokens") if getattr(self, k) is not None]
        if len(given) > 1:
            raise AmpError(f"give at most one of --steps, --epochs and --tokens (got {', '.join(given)})")
        for name in ("steps", "tokens", "lora_r", "seqlen", "batch_size", "max_records"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AmpError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.epochs is not None and not self.epochs > 0:
            raise AmpError(f"--epochs must be positive, got {self.epochs}")
        if not self.lr > 0:
            raise AmpError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.kd_weight <= 1:
            raise AmpError(f"--kd-weight must lie in [0, 1], got {self.kd_weight}")
        if not self.temperature > 0:
            raise AmpError(f"--temperature must be positive, got {self.temperature}")
        if self.checkpoint_every < 0:
            raise AmpError(f"--checkpoint-every must be 0 or more, got {self.checkpoint_every}")


# ---------------------------------------------------------------- data

def training_texts(source: str, data_dir=None) -> list[str]:
    """Alpaca records as prompt + response (the calibration prompt format), text rows, or a text file's
    paragraphs."""
    from .data import read_records, resolve_source
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
    from .pipeline import pad_right
    groups = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    rng.shuffle(groups)
    return [pad_right([samples[i] for i in group], pad_id) for group in groups]


# ---------------------------------------------------------------- losses

def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over the valid positions."""
    valid = mask[:, 1:].bool()
    return F.cross_entropy(logits[:, :-1][valid].float(), ids[:, 1:][valid])


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), averaged over the valid positions that predict a next token."""
    valid = mask[:, 1:].bool()
    s = F.log_softmax(student[:, :-1][valid].float() / temperature, dim=-1)
    t = F.log_softmax(teacher[:, :-1][valid].float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


# ---------------------------------------------------------------- the model

def lora_targets(model) -> list[str]:
    """The leaf names of every prunable projection of the model's family (attention and MLP)."""
    from .arch import spec_for
    spec = spec_for(model)
    paths = [spec.q, spec.k, spec.v, spec.qkv, spec.o, spec.gate_up, *spec.mlp_in, spec.down]
    return sorted({p.rsplit(".", 1)[-1] for p in paths if p})


def check_teacher(student, teacher, student_tok, teacher_tok) -> None:
    s_vocab, t_vocab = student.config.vocab_size, teacher.config.vocab_size
    if s_vocab != t_vocab:
        raise AmpError(f"the teacher's vocabulary ({t_vocab} tokens) differs from the pruned model's ({s_vocab}): "
                       "distillation compares logits token by token and needs the same tokenizer")
    if student_tok is not None and teacher_tok is not None and student_tok.get_vocab() != teacher_tok.get_vocab():
        raise AmpError("the teacher's tokenizer differs from the pruned model's (same size, different tokens): "
                       "distillation needs the same tokenizer")


def _schedule(total: int, warmup: float):
    ramp = max(1, round(warmup * total))
    return lambda step: (step + 1) / ramp if step < ramp else max(0.0, (total - step) / max(1, total - ramp))


def _total_steps(config: RecoverConfig, samples, batches_per_epoch: int) -> int:
    if config.steps is not None:
        return config.steps
    if config.tokens is not None:
        per_batch = sum(len(s) for s in samples) / len(samples) * min(config.batch_size, len(samples))
        return max(1, math.ceil(config.tokens / per_batch))
    return max(1, math.ceil((config.epochs if config.epochs is not None else 2.0) * batches_per_epoch))


# ---------------------------------------------------------------- checkpoints

def _trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, history: list, config: RecoverConfig,
                    tokens: int) -> None:
    """One file, written beside and renamed into place: an interruption never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"adapters": _trainable_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "history": history, "tokens": tokens,
                "config": asdict(config), "rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, optimizer, scheduler, config: RecoverConfig) -> tuple[int, list, int]:
    if not path.is_file():
        raise AmpError(f"--resume: no checkpoint at {path} (run without --resume to start afresh)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = {k: v for k, v in state["config"].items() if k not in ("device", "checkpoint_every")}
    now = {k: v for k, v in asdict(config).items() if k not in ("device", "checkpoint_every")}
    if saved != now:
        changed = ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in now if saved.get(k) != now[k])
        raise AmpError(f"--resume: the checkpoint at {path} was made with other settings ({changed})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["adapters"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    random.setstate(state["python_rng"])
    return state["step"], state["history"], state["tokens"]


# ---------------------------------------------------------------- training

def recover_model(model, tokenizer, config: RecoverConfig, teacher=None, data_dir=None, progress: bool = True,
                  checkpoint: Path | None = None, resume: bool = False, samples: list[torch.Tensor] | None = None,
                  stop_after: int | None = None):
    """Fine-tunes `model` in place with LoRA and merges the adapters; returns the run's figures.
    `checkpoint`: a file written every config.checkpoint_every steps; `resume`: start from it.
    `samples`: token tensors instead of config.data; `stop_after`: stop (unmerged, as an interruption would)
    after this many steps, for tests of resume."""
    from peft import LoraConfig, get_peft_model

    from .profiling import PhaseTimer
    device = torch.device(config.device)
    if samples is None:
        texts = training_texts(config.data, data_dir)
        if config.max_records:
            rng = random.Random(config.seed)
            texts = rng.sample(texts, min(config.max_records, len(texts)))
        samples = tokenize(texts, tokenizer, config.seqlen)
    if not samples:
        raise AmpError(f"recovery data {config.data}: no record holds two or more tokens")
    pad_id = (tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else
              (getattr(model.config, "pad_token_id", None) or 0))
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=lora_targets(model), bias="none", task_type="CAUSAL_LM")
    model.to(device)
    peft_model = get_peft_model(model, lora)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    per_epoch = len(epoch_batches(samples, config.batch_size, config.seed, 0, pad_id))
    total = _total_steps(config, samples, per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, config.warmup))
    step, history, tokens = 0, [], 0
    if resume:
        step, history, tokens = load_checkpoint(checkpoint, peft_model, optimizer, scheduler, config)
    if teacher is not None:
        teacher.to(device).eval()
    timer = PhaseTimer(config.device)
    start = time.perf_counter()
    peft_model.train()
    bar = tqdm(total=total, initial=step, desc="recovering", unit="step", disable=not progress)
    batches: dict[int, list] = {}
    with timer.phase("train"):
        while step < total and (stop_after is None or step < stop_after):
            epoch, position = divmod(step, per_epoch)
            if epoch not in batches:
                batches = {epoch: epoch_batches(samples, config.batch_size, config.seed, epoch, pad_id)}
            ids, mask = batches[epoch][position]
            ids, mask = ids.to(device), mask.to(device)
            logits = peft_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            lm = lm_loss(logits, ids, mask)
            loss, kd = lm, None
            if teacher is not None and config.kd_weight > 0:
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
                kd = kd_loss(logits, t_logits, mask, config.temperature)
                loss = (1 - config.kd_weight) * lm + config.kd_weight * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            tokens += int(mask.sum())
            history.append({"step": step, "loss": float(loss.detach()), "lm": float(lm.detach()),
                            **({"kd": float(kd.detach())} if kd is not None else {}), "lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(loss=f"{_running(history):.3f}")
            if checkpoint is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
                save_checkpoint(checkpoint, peft_model, optimizer, scheduler, step, history, config, tokens)
    bar.close()
    if step < total:  # stopped early (a test's interruption): leave the adapters unmerged
        return {"steps": step, "stopped": True, "peft_model": peft_model}
    peft_model.eval()
    probe_ids, probe_mask = (t.to(device) for t in epoch_batches(samples, config.batch_size, config.seed, 0,
                                                                 pad_id)[0])
    with torch.no_grad():
        before = peft_model(input_ids=probe_ids, attention_mask=probe_mask, use_cache=False).logits.float()
    merged = peft_model.merge_and_unload()
    merged.eval()
    with torch.no_grad():  # the merge is checked, not assumed: the saved model must be the trained one
        after = merged(input_ids=probe_ids, attention_mask=probe_mask, use_cache=False).logits.float()
    valid = probe_mask.bool()
    merge_diff = float((after - before)[valid].abs().max())
    seconds = time.perf_counter() - start
    phase = timer.report()["train"]
    return {"steps": step, "total_steps": total, "epochs": round(step / per_epoch, 3), "tokens": tokens,
            "records": len(samples), "batch_size": config.batch_size, "seqlen": config.seqlen,
            "lora_r": config.lora_r, "lr": config.lr, "trainable_params": sum(p.numel() for p in trainable),
            "teacher": teacher is not None, "kd_weight": config.kd_weight if teacher is not None else 0.0,
            "temperature": config.temperature,
            "loss_first": _mean([h["loss"] for h in history[:10]]),
            "loss_last": _mean([h["loss"] for h in history[-10:]]),
            "lm_first": _mean([h["lm"] for h in history[:10]]), "lm_last": _mean([h["lm"] for h in history[-10:]]),
            "merge_max_abs_diff": merge_diff,
            "seconds": round(seconds, 1), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
            "peak_rss_mb": phase.get("peak_rss_mb"), "peak_cuda_mb": phase.get("peak_cuda_mb"),
            "history": history, "model": merged}


def _running(history: list, n: int = 20) -> float:
    return _mean([h["loss"] for h in history[-n:]])


def _mean(values: list) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def plot_loss(history: list, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], alpha=0.35, label="loss (per step)")
    window = max(1, len(history) // 20)
    smooth = [_mean([h["loss"] for h in history[max(0, i - window + 1):i + 1]]) for i in range(len(history))]
    ax.plot(steps, smooth, label=f"loss (mean of {window})")
    if any("kd" in h for h in history):
        ax.plot(steps, [h["lm"] for h in history], alpha=0.5, label="language-model loss")
        ax.plot(steps, [h.get("kd", float("nan")) for h in history], alpha=0.5, label="KL to the teacher")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- folder to folder

def checkpoint_path(out) -> Path:
    """Checkpoints live beside the output folder (which appears only when the run is complete)."""
    out = Path(out)
    return out.parent / f"{out.name}.checkpoint" / "recover.pt"


def recover_checkpoint(pruned_dir, out, config: RecoverConfig, teacher: str | None = None, *, data_dir=None,
                       overwrite: bool = False, resume: bool = False, progress: bool = True,
                       dtype: str = "auto") -> dict:
    """`amp recover`: LoRA (and distillation) on the model in `pruned_dir`, merged and written to `out` in the
    input's own dtype and format, with the prune report extended by the run's figures and a loss curve."""
    import json
    import shutil

    from . import checkpoint as ckpt_io
    from . import models
    from .api import load_pruned
    folder = Path(pruned_dir)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise AmpError(f"{pruned_dir} is not a model folder (no config.json and safetensors weights)")
    ckpt_io.check_output(out, overwrite)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise AmpError("--device cuda was asked for, but this machine has no CUDA device")
    texts = training_texts(config.data, data_dir)           # a bad data file fails before any model is read
    if resume and not checkpoint_path(out).is_file():
        raise AmpError(f"--resume: no checkpoint at {checkpoint_path(out)} (run without --resume to start afresh)")
    saved_config = json.loads((folder / "config.json").read_text())
    stored = saved_config.get("dtype") or saved_config.get("torch_dtype") or "float32"
    train_dtype = dtype if dtype != "auto" else ("bfloat16" if config.device == "cuda" else "float32")
    model, tokenizer, report = load_pruned(folder, train_dtype, "cpu")
    if tokenizer is None:
        raise AmpError(f"{pruned_dir} has no tokenizer; recovery tokenizes its data with the model's own")
    teacher_model = None
    if teacher is not None:
        teacher_model, teacher_tok, _ = models.load_model(teacher, train_dtype)
        check_teacher(model, teacher_model, tokenizer, teacher_tok)
    if config.max_records:
        texts = random.Random(config.seed).sample(texts, min(config.max_records, len(texts)))
    samples = tokenize(texts, tokenizer, config.seqlen)
    checkpoint = checkpoint_path(out)
    result = recover_model(model, tokenizer, config, teacher_model, progress=progress, checkpoint=checkpoint,
                           resume=resume, samples=samples)
    merged, history = result.pop("model"), result.pop("history")
    merged.to("cpu", getattr(torch, stored) if isinstance(stored, str) and hasattr(torch, stored) else torch.float32)
    report = dict(report or {})
    report["recovery"] = {**result, "data": config.data, "teacher": teacher, "device": config.device,
                          "train_dtype": train_dtype, "saved_dtype": stored, "lora_alpha": config.lora_alpha,
                          "lora_dropout": config.lora_dropout, "warmup": config.warmup, "seed": config.seed,
                          "input": str(folder), "resumed": resume}
    with ckpt_io.staged_folder(out, overwrite) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "recovery_log.json").write_text(json.dumps(history))
        plot_loss(history, tmp / "recovery_loss.png",
                  f"recovery of {folder.name}: {result['steps']} steps, {result['tokens']:,} tokens")
        (tmp / ckpt_io.REPORT_NAME).write_text(json.dumps(report, indent=2))
    shutil.rmtree(checkpoint.parent, ignore_errors=True)
    return report

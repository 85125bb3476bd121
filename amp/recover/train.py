"""Recovery after pruning: LoRA fine-tuning (peft) on instruction data, optionally distilled from the dense model.

The AMP paper's recipe is the default: LoRA rank 8 on every attention and MLP projection, Alpaca records in the
calibration prompt format followed by their response, language-model loss on all tokens. With a teacher, the
loss is (1 - w) * LM + w * T^2 * KL(teacher_T || student_T) on the logits (Minitron-style distillation).

The training loop is written here rather than through transformers' Trainer: the distillation loss, a token
budget, bit-exact resume (optimizer, schedule, data position and RNG in one checkpoint file) and the report's
figures are a few lines each, and Trainer would add its own checkpoint layout and logging on top.
The adapters are merged into the weights at the end (peft's merge_and_unload), so the result is a plain model
(or a per-layer one, exactly as its input) that loads without peft. Folder to folder: run.py.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..arch import spec_for
from ..common.errors import AmpError
from ..common.profiling import PhaseTimer
from .checkpoints import load_checkpoint, save_checkpoint
from .config import RecoverConfig
from .data import epoch_batches, tokenize, training_texts


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


def lora_targets(model) -> str:
    """peft's target_modules: a pattern for every prunable projection of the model's family (attention and MLP),
    by its path inside a decoder layer. A mixture-of-experts model adapts its attention only: its experts are 3-D
    parameters that peft wraps only without LoRA dropout, and under transformers 5 peft maps the MLP names
    (gate_proj / up_proj / down_proj) onto the experts' fused parameters wherever they appear, so the experts and
    any dense MLP layers stay frozen."""
    import re
    spec = spec_for(model)
    paths = [spec.q, spec.k, spec.v, spec.qkv, spec.o]
    if spec.moe is None:
        paths += [spec.gate_up, *spec.mlp_in, spec.down]
    return r"^.*layers\.\d+\.(" + "|".join(sorted(re.escape(p) for p in paths if p)) + ")$"


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


def recover_model(model, tokenizer, config: RecoverConfig, teacher=None, data_dir=None, progress: bool = True,
                  checkpoint: Path | None = None, resume: bool = False, samples: list[torch.Tensor] | None = None,
                  stop_after: int | None = None):
    """Fine-tunes `model` in place with LoRA and merges the adapters; returns the run's figures.
    `checkpoint`: a file written every config.checkpoint_every steps; `resume`: start from it.
    `samples`: token tensors instead of config.data; `stop_after`: stop (unmerged, as an interruption would)
    after this many steps, for tests of resume."""
    from peft import LoraConfig, get_peft_model

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
            "loss_first": mean_of([h["loss"] for h in history[:10]]),
            "loss_last": mean_of([h["loss"] for h in history[-10:]]),
            "lm_first": mean_of([h["lm"] for h in history[:10]]), "lm_last": mean_of([h["lm"] for h in history[-10:]]),
            "merge_max_abs_diff": merge_diff,
            "seconds": round(seconds, 1), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
            "peak_rss_mb": phase.get("peak_rss_mb"), "peak_cuda_mb": phase.get("peak_cuda_mb"),
            "history": history, "model": merged}


def _running(history: list, n: int = 20) -> float:
    return mean_of([h["loss"] for h in history[-n:]])


def mean_of(values: list) -> float:
    return float(sum(values) / len(values)) if values else float("nan")

"""Recovery after pruning: LoRA fine-tuning (peft) on instruction data, optionally distilled from the dense model.

The AMP paper's recipe is the default: LoRA rank 8 on every attention and MLP projection, Alpaca records in the
calibration prompt format followed by their response, language-model loss on all tokens. With a teacher, the
loss is (1 - w) * LM + w * T^2 * KL(teacher_T || student_T) on the logits (Minitron-style distillation).

The training loop is written here rather than through transformers' Trainer: the distillation loss, a token
budget, bit-exact resume (optimizer, schedule, data position and RNG in one checkpoint file) and the report's
figures are a few lines each, and Trainer would add its own checkpoint layout and logging on top. accelerate runs
under it (distributed.py): one process, DDP or FSDP, with the same global batches whatever the process count.
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
from .distributed import Processes, start, trainable_state


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, tokens: int | None = None) -> torch.Tensor:
    """Next-token cross entropy summed over the valid positions, divided by `tokens` (default: their count, the
    mean). With several processes `tokens` is the global batch's count, so the ranks' terms add up to its mean."""
    valid = mask[:, 1:].bool()
    total = F.cross_entropy(logits[:, :-1][valid].float(), ids[:, 1:][valid], reduction="sum")
    return total / (int(valid.sum()) if tokens is None else tokens)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float,
            tokens: int | None = None) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), summed over the valid positions that predict a next token and divided by
    `tokens` (default: their count), as lm_loss."""
    valid = mask[:, 1:].bool()
    s = F.log_softmax(student[:, :-1][valid].float() / temperature, dim=-1)
    t = F.log_softmax(teacher[:, :-1][valid].float() / temperature, dim=-1)
    total = F.kl_div(s, t, log_target=True, reduction="sum")
    return total / (int(valid.sum()) if tokens is None else tokens) * temperature ** 2


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
                  stop_after: int | None = None, processes: Processes | None = None, reload_base=None):
    """Fine-tunes `model` with LoRA and merges the adapters; returns the run's figures, with the merged model
    under "model" on rank 0 (None on the other ranks).
    `checkpoint`: a file written every config.checkpoint_every steps; `resume`: start from it.
    `samples`: token tensors instead of config.data; `stop_after`: stop (unmerged, as an interruption would)
    after this many steps, for tests of resume. `processes`: the run's distributed.start() (default: started here
    from config.strategy); `reload_base`: under FSDP, a function returning the unsharded base model on the CPU
    (rank 0 merges the gathered adapters into it)."""
    from peft import LoraConfig, get_peft_model

    if samples is None:
        texts = training_texts(config.data, data_dir)
        if config.max_records:
            rng = random.Random(config.seed)
            texts = rng.sample(texts, min(config.max_records, len(texts)))
        samples = tokenize(texts, tokenizer, config.seqlen)
    if not samples:
        raise AmpError(f"recovery data {config.data}: no record holds two or more tokens")
    processes = processes or start(config.strategy, config.device, _is_bf16(model))
    if processes.strategy == "fsdp" and reload_base is None:
        raise AmpError("recovery under FSDP merges on rank 0 into a freshly loaded base model: pass reload_base "
                       "(amp recover does)")
    acc, main = processes.accelerator, processes.is_main
    pad_id = (tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else
              (getattr(model.config, "pad_token_id", None) or 0))
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=lora_targets(model), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=0.0)
    per_epoch = len(epoch_batches(samples, config.batch_size, config.seed, 0, pad_id))
    total = _total_steps(config, samples, per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, config.warmup))
    processes.wrap_layers(peft_model, teacher)
    peft_model, optimizer = acc.prepare(peft_model, optimizer)
    units = processes.shard_units(peft_model)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    step, history, tokens, resumed_from = 0, [], 0, None
    if resume:
        step, history, tokens, resumed_from = load_checkpoint(checkpoint, processes, peft_model, optimizer,
                                                              scheduler, config)
    if teacher is not None:
        teacher.requires_grad_(False)
        if processes.strategy == "fsdp" and config.shard_teacher:
            teacher = processes.shard(teacher)
        else:
            teacher.to(processes.device)
        teacher.eval()
    timer = PhaseTimer(processes.device.type)
    start_time = time.perf_counter()
    peft_model.train()
    bar = tqdm(total=total, initial=step, desc="recovering", unit="step", disable=not progress or not main)
    batches: dict[int, list] = {}
    with timer.phase("train"):
        while step < total and (stop_after is None or step < stop_after):
            epoch, position = divmod(step, per_epoch)
            if epoch not in batches:
                batches = {epoch: epoch_batches(samples, config.batch_size, config.seed, epoch, pad_id)}
            global_ids, global_mask = batches[epoch][position]
            n_tokens = int(global_mask[:, 1:].sum())           # positions that predict a token, all ranks
            ids, mask = (t.to(processes.device) for t in processes.rows(global_ids, global_mask))
            logits = peft_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            lm = lm_loss(logits, ids, mask, n_tokens)
            loss, kd = lm, None
            if teacher is not None and config.kd_weight > 0:
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
                kd = kd_loss(logits, t_logits, mask, config.temperature, n_tokens)
                loss = (1 - config.kd_weight) * lm + config.kd_weight * kd
            optimizer.zero_grad(set_to_none=True)
            # DDP and FSDP average gradients over the ranks; each rank's loss is its share of the global mean
            acc.backward(loss * processes.world)
            acc.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            tokens += int(global_mask.sum())
            loss_v, lm_v, kd_v = processes.sum([float(loss.detach()), float(lm.detach()),
                                                float(kd.detach()) if kd is not None else 0.0])
            history.append({"step": step, "loss": loss_v, "lm": lm_v, **({"kd": kd_v} if kd is not None else {}),
                            "lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(loss=f"{_running(history):.3f}")
            if checkpoint is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
                save_checkpoint(checkpoint, processes, peft_model, optimizer, scheduler, step, history, config,
                                tokens)
    bar.close()
    if step < total:  # stopped early (a test's interruption): leave the adapters unmerged
        return {"steps": step, "stopped": True, "peft_model": peft_model}
    seconds = time.perf_counter() - start_time
    phase = timer.report()["train"]
    ranks = processes.gather({"rank": processes.rank, "peak_rss_mb": phase.get("peak_rss_mb"),
                              "peak_cuda_mb": phase.get("peak_cuda_mb")})
    probe = _probe(epoch_batches(samples, config.batch_size, config.seed, 0, pad_id)[0])
    merged, merge_diff = _merge(processes, peft_model, lora, probe, reload_base)
    processes.barrier()
    return {"steps": step, "total_steps": total, "epochs": round(step / per_epoch, 3), "tokens": tokens,
            "records": len(samples), "batch_size": config.batch_size, "seqlen": config.seqlen,
            "lora_r": config.lora_r, "lr": config.lr, "trainable_params": sum(p.numel() for p in trainable),  # a DTensor counts whole
            "teacher": teacher is not None, "kd_weight": config.kd_weight if teacher is not None else 0.0,
            "temperature": config.temperature,
            "loss_first": mean_of([h["loss"] for h in history[:10]]),
            "loss_last": mean_of([h["loss"] for h in history[-10:]]),
            "lm_first": mean_of([h["lm"] for h in history[:10]]), "lm_last": mean_of([h["lm"] for h in history[-10:]]),
            "merge_max_abs_diff": merge_diff,
            "seconds": round(seconds, 1), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
            "peak_rss_mb": phase.get("peak_rss_mb"), "peak_cuda_mb": phase.get("peak_cuda_mb"),
            "world_size": processes.world, "strategy": processes.strategy, "fsdp_units": units,
            "teacher_fsdp_units": processes.shard_units(teacher) if teacher is not None else None,
            "teacher_placement": None if teacher is None else
            ("sharded" if processes.strategy == "fsdp" and config.shard_teacher else "each rank"),
            "ranks": ranks, "resumed_from_world_size": resumed_from,
            **({"note": f"resumed from a checkpoint of {resumed_from} processes with {processes.world}: the same "
                        "global batches from the same step, but not bit-exact (sums over ranks in another order, "
                        "LoRA dropout drawn per rank)"} if resumed_from not in (None, processes.world) else {}),
            "history": history, "model": merged}


def _is_bf16(model) -> bool:
    return next(model.parameters()).dtype == torch.bfloat16


def _probe(batch, rows: int = 2, length: int = 64):
    """A few rows of the first batch, cut short: what the merge check runs (on rank 0, on the CPU under FSDP)."""
    ids, mask = batch
    return ids[:rows, :length], mask[:rows, :length]


@torch.no_grad()
def _merge(processes: Processes, peft_model, lora, probe, reload_base):
    """(merged model on rank 0 or None, largest logit difference between the adapted and the merged model on the
    probe). Single and DDP merge the trained model in place; FSDP gathers the adapters to rank 0 and merges them
    into the base model reloaded there (its weights are frozen, so the copy on disk is the trained base)."""
    from peft import get_peft_model
    if processes.strategy == "fsdp":
        adapters, _ = trainable_state(processes, peft_model)
        if not processes.is_main:
            return None, None
        model = get_peft_model(reload_base(), lora)
        missing = [k for k in adapters if k not in model.state_dict()]
        if missing:
            raise AmpError(f"the gathered adapters do not fit the reloaded base model (e.g. {missing[0]})")
        model.load_state_dict(adapters, strict=False)
        device = torch.device("cpu")
    else:
        if not processes.is_main:
            return None, None
        model = processes.accelerator.unwrap_model(peft_model)
        device = processes.device
    model.eval()
    ids, mask = (t.to(device) for t in probe)
    before = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    merged = model.merge_and_unload()
    merged.eval()
    after = merged(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    return merged, float((after - before)[mask.bool()].abs().max())


def _running(history: list, n: int = 20) -> float:
    return mean_of([h["loss"] for h in history[-n:]])


def mean_of(values: list) -> float:
    return float(sum(values) / len(values)) if values else float("nan")

"""`amp recover`, folder to folder: the pruned model loaded in its training dtype, fine-tuned (train.py), merged and
saved in the input's own dtype and format, with the prune report extended by the run's figures and a loss curve."""
from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path

import torch

from ..common.errors import AmpError
from ..io import folders, models
from ..io.loading import load_pruned
from ..runtime import per_layer
from .checkpoints import checkpoint_path
from .config import RecoverConfig
from .data import tokenize, training_texts
from .distributed import Processes, start
from .train import check_teacher, mean_of, recover_model


def plot_loss(history: list, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], alpha=0.35, label="loss (per step)")
    window = max(1, len(history) // 20)
    smooth = [mean_of([h["loss"] for h in history[max(0, i - window + 1):i + 1]]) for i in range(len(history))]
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
def recover_checkpoint(pruned_dir, out, config: RecoverConfig, teacher: str | None = None, *, data_dir=None,
                       overwrite: bool = False, resume: bool = False, progress: bool = True,
                       dtype: str = "auto", processes: Processes | None = None) -> dict:
    """`amp recover`: LoRA (and distillation) on the model in `pruned_dir`, merged and written to `out` in the
    input's own dtype and format, with the prune report extended by the run's figures and a loss curve.
    In one process or under a launcher (distributed.py); rank 0 writes, every rank returns the report."""
    folder = Path(pruned_dir)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise AmpError(f"{pruned_dir} is not a model folder (no config.json and safetensors weights)")
    folders.check_output(out, overwrite)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise AmpError("--device cuda was asked for, but this machine has no CUDA device")
    texts = training_texts(config.data, data_dir)           # a bad data file fails before any model is read
    if resume and not checkpoint_path(out).is_file():
        raise AmpError(f"--resume: no checkpoint at {checkpoint_path(out)} (run without --resume to start afresh)")
    saved_config = json.loads((folder / "config.json").read_text())
    stored = saved_config.get("dtype") or saved_config.get("torch_dtype") or "float32"
    train_dtype = dtype if dtype != "auto" else ("bfloat16" if config.device == "cuda" else "float32")
    processes = processes or start(config.strategy, config.device, train_dtype == "bfloat16")
    # under FSDP only local rank 0 reads the weights; the others build the model on the meta device
    model, tokenizer, report = load_pruned(folder, train_dtype, None)
    if tokenizer is None:
        raise AmpError(f"{pruned_dir} has no tokenizer; recovery tokenizes its data with the model's own")
    teacher_model = None
    if teacher is not None:
        whole = processes.full_load() if not config.shard_teacher else contextlib.nullcontext()
        with whole:
            teacher_model, teacher_tok, _ = models.load_model(teacher, train_dtype)
        check_teacher(model, teacher_model, tokenizer, teacher_tok)
    if config.max_records:
        texts = random.Random(config.seed).sample(texts, min(config.max_records, len(texts)))
    samples = tokenize(texts, tokenizer, config.seqlen)
    checkpoint = checkpoint_path(out)
    result = recover_model(model, tokenizer, config, teacher_model, progress=progress, checkpoint=checkpoint,
                           resume=resume, samples=samples, processes=processes,
                           reload_base=lambda: load_pruned(folder, train_dtype, "cpu")[0])
    merged, history = result.pop("model"), result.pop("history")
    report = dict(report or {})
    report["recovery"] = {**result, "data": config.data, "teacher": teacher, "device": config.device,
                          "train_dtype": train_dtype, "saved_dtype": stored, "lora_alpha": config.lora_alpha,
                          "lora_dropout": config.lora_dropout, "warmup": config.warmup, "seed": config.seed,
                          "input": str(folder), "resumed": resume}
    if processes.is_main:
        merged.to("cpu", getattr(torch, stored) if isinstance(stored, str) and hasattr(torch, stored)
                  else torch.float32)
        with folders.staged_folder(out, overwrite) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            per_layer.write_standalone(tmp)  # a per-layer result stays loadable in plain transformers
            tokenizer.save_pretrained(tmp)
            (tmp / "recovery_log.json").write_text(json.dumps(history))
            plot_loss(history, tmp / "recovery_loss.png",
                      f"recovery of {folder.name}: {result['steps']} steps, {result['tokens']:,} tokens"
                      + (f", {processes.world} processes ({processes.strategy})" if processes.world > 1 else ""))
            (tmp / folders.REPORT_NAME).write_text(json.dumps(report, indent=2))
        shutil.rmtree(checkpoint.parent, ignore_errors=True)
    processes.barrier()
    return report

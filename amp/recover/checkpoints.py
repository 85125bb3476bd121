"""Recovery checkpoints: the adapters, optimizer, schedule, data position and random state in one file beside the
output folder, written through a temporary name, so that `--resume` continues bit-exactly."""
from __future__ import annotations

import os
import random
from dataclasses import asdict
from pathlib import Path

import torch

from ..common.errors import AmpError
from .config import RecoverConfig


def checkpoint_path(out) -> Path:
    """Checkpoints live beside the output folder (which appears only when the run is complete)."""
    out = Path(out)
    return out.parent / f"{out.name}.checkpoint" / "recover.pt"


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

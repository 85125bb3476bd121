"""Recovery checkpoints: the adapters, optimizer, schedule, data position and every rank's random state in one file
beside the output folder, written by rank 0 through a temporary name, so that `--resume` continues bit-exactly.

Adapters and optimizer state are stored whole (gathered from the shards under FSDP) and keyed by parameter name,
so a checkpoint does not depend on the strategy or the process count: a run resumes with another count at the same
step and global batch, but not bit-exactly (sums over ranks run in another order, and LoRA dropout masks are
drawn per rank), which the report says."""
from __future__ import annotations

import os
import random
from dataclasses import asdict
from pathlib import Path

import torch

from ..common.errors import AmpError
from .config import RecoverConfig
from .distributed import Processes, load_trainable_state, trainable_state

# Settings a resume may change: where and how it runs, not what it computes.
RUNTIME_SETTINGS = ("device", "checkpoint_every", "strategy", "shard_teacher")


def checkpoint_path(out) -> Path:
    """Checkpoints live beside the output folder (which appears only when the run is complete)."""
    out = Path(out)
    return out.parent / f"{out.name}.checkpoint" / "recover.pt"


def save_checkpoint(path: Path, processes: Processes, model, optimizer, scheduler, step: int, history: list,
                    config: RecoverConfig, tokens: int) -> None:
    """One file, written beside and renamed into place: an interruption never leaves half a checkpoint."""
    adapters, optim = trainable_state(processes, model, optimizer)
    rng = processes.gather(torch.get_rng_state())
    if processes.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"adapters": adapters, "optimizer": optim, "scheduler": scheduler.state_dict(), "step": step,
                    "history": history, "tokens": tokens, "config": asdict(config), "world_size": processes.world,
                    "rng": rng, "python_rng": random.getstate()}, tmp)
        os.replace(tmp, path)
    processes.barrier()


def load_checkpoint(path: Path, processes: Processes, model, optimizer, scheduler,
                    config: RecoverConfig) -> tuple[int, list, int, int]:
    """(step, history, tokens, the process count the checkpoint was written with), after restoring the state."""
    if not path.is_file():
        raise AmpError(f"--resume: no checkpoint at {path} (run without --resume to start afresh)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = {k: v for k, v in state["config"].items() if k not in RUNTIME_SETTINGS}
    now = {k: v for k, v in asdict(config).items() if k not in RUNTIME_SETTINGS}
    if saved != now:
        changed = ", ".join(f"{k} {saved.get(k)} -> {now[k]}" for k in now if saved.get(k) != now[k])
        raise AmpError(f"--resume: the checkpoint at {path} was made with other settings ({changed})")
    load_trainable_state(processes, model, optimizer, state["adapters"], state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    # the same count: every rank continues its own stream; another count: every rank takes rank 0's
    torch.set_rng_state(rng[processes.rank] if len(rng) == processes.world else rng[0])
    random.setstate(state["python_rng"])
    return state["step"], state["history"], state["tokens"], int(state.get("world_size", 1))

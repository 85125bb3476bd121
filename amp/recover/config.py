"""RecoverConfig: every knob of a recovery run, validated once (the CLI's recovery flags map onto it)."""
from __future__ import annotations

from dataclasses import dataclass

from ..common.errors import AmpError


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
    strategy: str = "auto"           # auto | single | ddp | fsdp (distributed.py); auto follows the launcher
    shard_teacher: bool = True       # under FSDP: shard the teacher like the student (else a whole copy per rank)

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
        if not 0 <= self.lora_dropout < 1:
            raise AmpError(f"--lora-dropout must lie in [0, 1), got {self.lora_dropout}")
        if not self.lr > 0:
            raise AmpError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.kd_weight <= 1:
            raise AmpError(f"--kd-weight must lie in [0, 1], got {self.kd_weight}")
        if not self.temperature > 0:
            raise AmpError(f"--temperature must be positive, got {self.temperature}")
        if self.strategy not in ("auto", "single", "ddp", "fsdp"):
            raise AmpError(f"unknown --strategy {self.strategy!r} (choose from auto, single, ddp, fsdp)")
        if self.checkpoint_every < 0:
            raise AmpError(f"--checkpoint-every must be 0 or more, got {self.checkpoint_every}")

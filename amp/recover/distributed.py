"""Recovery across processes: accelerate under the project's own training loop.

One process (`single`), data-parallel (`ddp`) or fully sharded (`fsdp`, torch's FSDP2 through accelerate's plugin:
each decoder layer a shard unit, bf16 mixed precision when training in bf16). Launched as usual:
`accelerate launch --num_processes N -m amp.cli recover ...` or `torchrun --nproc_per_node N -m amp.cli recover ...`;
`--strategy auto` takes FSDP when accelerate's config asks for it (ACCELERATE_USE_FSDP), DDP otherwise.

What this module owns and the loop does not: the strategy and the Accelerator, the split of every global batch
into per-rank rows (the global batch, its order and its padding do not depend on the process count, so a loss
curve and a checkpoint mean the same with 1 or N processes), the sums across ranks, and full (unsharded) state
dicts of the trainable parameters and the optimizer for checkpoints and the merge.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..common.errors import AmpError

STRATEGIES = ("auto", "single", "ddp", "fsdp")
LAUNCH_HINT = ("launch several with `accelerate launch --num_processes N -m amp.cli recover ...` or "
               "`torchrun --nproc_per_node N -m amp.cli recover ...`")


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launched_world() -> tuple[int, int]:
    """(rank, world size) as the launcher (torchrun, accelerate launch) set them; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return launched_world()[0] == 0


def resolve_strategy(asked: str, world: int) -> str:
    if asked not in STRATEGIES:
        raise AmpError(f"unknown --strategy {asked!r} (choose from {', '.join(STRATEGIES)})")
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise AmpError("DeepSpeed is not supported by amp recover: its engine owns the optimizer and checkpoints "
                       "that this loop keeps for bit-exact resume; use FSDP (--strategy fsdp, or "
                       "distributed_type: FSDP in the accelerate config)")
    if asked == "auto":
        if world == 1:
            return "single"
        return "fsdp" if _flag("ACCELERATE_USE_FSDP") else "ddp"
    if asked == "single" and world > 1:
        raise AmpError(f"--strategy single, but {world} processes were launched")
    if asked in ("ddp", "fsdp") and world == 1:
        raise AmpError(f"--strategy {asked} needs several processes: {LAUNCH_HINT}")
    return asked


@dataclass
class Processes:
    """The Accelerator and what the loop asks of it."""
    accelerator: object
    strategy: str
    world: int
    rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def wrap_layers(self, *models) -> None:
        """FSDP's shard unit: the decoder-layer classes of these models (every family, per-layer models too: their
        layers are the family's own class)."""
        if self.strategy != "fsdp":
            return
        names = sorted({type(layer).__name__ for m in models if m is not None for layer in decoder_layers(m)})
        self.accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = names

    def shard(self, model):
        """A model FSDP shards without an optimizer (the teacher): accelerate's own FSDP2 preparation, which
        `Accelerator.prepare_model` skips for FSDP2 (it shards only beside an optimizer); the weights that local
        rank 0 read reach the other ranks here."""
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model
        return fsdp2_prepare_model(self.accelerator, model)

    def shard_units(self, model) -> int | None:
        """How many modules FSDP shards separately (None when it does not shard)."""
        if self.strategy != "fsdp":
            return None
        from torch.distributed.fsdp import FSDPModule
        return sum(isinstance(m, FSDPModule) for m in model.modules())

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (every rank gets them)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """One object from every rank, in rank order (every rank gets the list)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def rows(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of a global batch (contiguous, equal counts)."""
        if self.world == 1:
            return ids, mask
        n = ids.shape[0]
        if n % self.world:
            raise AmpError(f"a global batch of {n} records does not split over {self.world} processes: give "
                           f"--batch-size a multiple of {self.world} (and at least that many records)")
        per = n // self.world
        return ids[self.rank * per:(self.rank + 1) * per], mask[self.rank * per:(self.rank + 1) * per]

    @contextlib.contextmanager
    def full_load(self):
        """Loads inside this context read every weight on every rank (a teacher kept whole on each rank), instead
        of transformers' FSDP loading (weights on local rank 0 only, sent to the others while sharding)."""
        saved = os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
        try:
            yield
        finally:
            if saved is not None:
                os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = saved


def decoder_layers(model) -> list:
    base = model
    for attr in ("base_model", "model"):  # peft wrapper, then the CausalLM's trunk
        while hasattr(base, attr) and not hasattr(base, "layers"):
            nxt = getattr(base, attr)
            if nxt is base:
                break
            base = nxt
    layers = getattr(base, "layers", None)
    if layers is None:
        raise AmpError(f"{type(model).__name__}: no decoder layers found to shard")
    return list(layers)


def start(asked: str, device: str, bf16: bool, timeout_hours: float = 0.5) -> Processes:
    """The Accelerator for this run. FSDP loads the model on local rank 0 only (every other rank builds it on the
    meta device and receives its shard from rank 0), so N processes on one node need the host memory of one model,
    not N. `timeout_hours`: how long a collective may wait (a prune before recovery keeps the other ranks waiting)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs
    rank, world = launched_world()
    strategy = resolve_strategy(asked, world)
    if device == "cuda" and not torch.cuda.is_available():
        raise AmpError("--device cuda was asked for, but this machine has no CUDA device")
    plugin = None
    if strategy == "fsdp":
        os.environ["ACCELERATE_USE_FSDP"] = "true"              # transformers' loaders read these two
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                auto_wrap_policy="transformer_based_wrap",
                                                cpu_ram_efficient_loading=True, state_dict_type="FULL_STATE_DICT")
    kwargs = [InitProcessGroupKwargs(timeout=timedelta(hours=timeout_hours))] if world > 1 else []
    if world == 1:
        # accelerate keeps one state per process; a second run in the same process (an API user, the tests) may
        # want another device, which the first run's state would silently override
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(True)
    acc = Accelerator(cpu=device == "cpu", fsdp_plugin=plugin, kwargs_handlers=kwargs,
                      mixed_precision="bf16" if strategy == "fsdp" and bf16 else "no",
                      step_scheduler_with_optimizer=False)
    if strategy == "fsdp" and acc.distributed_type != DistributedType.FSDP:
        # accelerate switches FSDP on only for accelerator devices; the sharding itself (torch's fully_shard
        # over gloo) runs on CPUs, which is how this path is tested on a machine without a GPU.
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    return Processes(acc, strategy, world, acc.process_index)


# ---------------------------------------------------------------- full state dicts (checkpoints, the merge)
def _options(processes: Processes, **extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, ignore_frozen_params=True,
                            cpu_offload=processes.world > 1, **extra)


def trainable_state(processes: Processes, model, optimizer=None):
    """(adapters, optimizer state) as full tensors keyed by parameter name, independent of the strategy and the
    process count; with several processes only rank 0 receives them (the others get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    if optimizer is None:
        return get_model_state_dict(model, options=_options(processes)), None
    return get_state_dict(model, optimizer, options=_options(processes))


def load_trainable_state(processes: Processes, model, optimizer, adapters: dict, optim: dict) -> None:
    """The inverse of trainable_state on every rank (each reads the full state and keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, optimizer, model_state_dict=adapters, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False))

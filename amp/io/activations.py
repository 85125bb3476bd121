"""Where the calibration hidden states live between layers: on the device when they fit, else in host memory,
else in a memory-mapped file in the staging folder. Each batch's input is read, run through the layer, and its
output written back into the same slot, so the store never holds more than one set of activations."""
from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import torch

from ..common.errors import AmpError

OFFLOAD_MODES = ("auto", "device", "host", "disk")


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what the kernel can give without swapping); a guess elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def choose_offload(mode: str, activation_bytes: int, device: torch.device, layer_bytes: int) -> tuple[str, str]:
    """(where, why). Automatic: the device if the activations take at most half of what is free there after
    room for two layers; host memory if they take at most half of what is available; else disk."""
    gib = activation_bytes / 2**30
    if mode not in OFFLOAD_MODES:
        raise AmpError(f"unknown --offload {mode!r}; choose one of {', '.join(OFFLOAD_MODES)}")
    if mode != "auto":
        if mode == "device" and device.type == "cpu":
            return "host", "forced to the device, which is the CPU: host memory"
        return mode, f"forced with --offload {mode}"
    host_free = host_available_bytes()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        room = free - 2 * layer_bytes
        if activation_bytes <= room / 2:
            return "device", f"{gib:.2f} GiB of activations fit in half of the {room / 2**30:.1f} GiB free on " \
                             f"{device} after two layers"
        why = f"{gib:.2f} GiB of activations exceed half of the {max(room, 0) / 2**30:.1f} GiB free on {device}"
    else:
        why = "the device is the CPU"
    if activation_bytes <= host_free / 2:
        return "host", f"{why}; they fit in half of the {host_free / 2**30:.1f} GiB of available host memory"
    return "disk", f"{why}; {gib:.2f} GiB exceed half of the {host_free / 2**30:.1f} GiB of available host " \
                   "memory, so they are memory-mapped from the staging folder"


class ActivationStore:
    """One slot per calibration batch, shapes fixed at construction (nothing is allocated twice): `put` stores
    a batch (the captured layer inputs, then each layer's outputs), `get` hands it to the device."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, where: str, device: torch.device,
                 folder: Path | None = None):
        self.where, self.device, self.dtype = where, device, dtype
        numels = [math.prod(s) for s in shapes]
        self.nbytes = sum(numels) * torch.empty((), dtype=dtype).element_size()
        self.path = None
        if where == "device":
            self.slots: list[torch.Tensor | None] = [None] * len(shapes)
        elif where == "host":
            pin = device.type == "cuda"
            self.slots = [torch.empty(s, dtype=dtype, pin_memory=pin) for s in shapes]
        elif where == "disk":
            if folder is None:
                raise AmpError("--offload disk needs a staging folder (prune_checkpoint provides one)")
            # a name of its own: the calibration store and the kl allocation's per-layer inputs can both be on disk
            self.path = Path(folder) / f"activations-{uuid.uuid4().hex}.bin"
            flat = torch.from_file(str(self.path), shared=True, size=max(sum(numels), 1), dtype=dtype)
            self.slots, start = [], 0
            for shape, n in zip(shapes, numels):
                self.slots.append(flat[start:start + n].view(shape))
                start += n
        else:
            raise AmpError(f"unknown activation store {where!r}")

    def __len__(self) -> int:
        return len(self.slots)

    def get(self, b: int) -> torch.Tensor:
        return self.slots[b] if self.where == "device" else self.slots[b].to(self.device, non_blocking=True)

    def put(self, b: int, tensor: torch.Tensor) -> None:
        if self.where == "device":
            self.slots[b] = tensor.to(self.device, self.dtype)
        else:
            self.slots[b].copy_(tensor)

    def close(self) -> None:
        self.slots = []
        if self.path is not None and self.path.exists():
            os.remove(self.path)

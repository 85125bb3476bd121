"""Tensor names on disk against names in memory, for mixture-of-experts families.

transformers >= 5 fuses a MoE layer's experts into two 3-D tensors when it loads (`{experts}.gate_up_proj`
(E, 2I, hidden): every expert's gate rows then its up rows; `{experts}.down_proj` (E, hidden, I)) and keeps the
router under the in-memory block name (Mixtral: `block_sparse_moe.` on disk becomes `mlp.`), while Hub
checkpoints store every expert on its own (`{disk_block}.experts.{e}.{gate|up|down}.weight`). Streaming reads the
checkpoint's own names and assembles the fused tensors one layer at a time; the shard sink writes the layout the
input had (per-expert for a Hub checkpoint), so the output loads in transformers 4.57 (which keeps experts as a
ModuleList) and 5.x alike, and in the user's other tools.
"""
from __future__ import annotations

import re

import torch

from ..arch import ArchSpec


class Layout:
    """Translation for one model: `disk(name, shape)` gives the (disk name, shape) pairs a memory tensor is stored
    as; `assemble` builds a memory tensor from disk tensors; `split` cuts one into its disk tensors. A family
    without experts, or a checkpoint already stored fused, translates nothing."""

    def __init__(self, spec: ArchSpec, disk_names=()):
        self.spec, self.moe = spec, spec.moe
        names = set(disk_names)
        self.active = self.moe is not None and not any(n.endswith(".gate_up_proj") for n in names)
        if self.active:
            block = re.escape(self.moe.router.rsplit(".", 1)[0])  # the block in memory ("mlp")
            experts = re.escape(self.moe.experts)
            self._router = re.compile(rf"^(.*layers\.\d+\.){re.escape(self.moe.router)}\.weight$")
            self._gate_up = re.compile(rf"^(.*layers\.\d+\.){experts}\.gate_up_proj$")
            self._down = re.compile(rf"^(.*layers\.\d+\.){experts}\.down_proj$")
            self._block = block

    def _expert(self, prefix: str, e: int, which: str) -> str:
        return f"{prefix}{self.moe.disk_block}.experts.{e}.{which}.weight"

    def disk(self, name: str, shape: tuple) -> list[tuple[str, tuple]]:
        if not self.active:
            return [(name, tuple(shape))]
        if m := self._router.match(name):
            return [(f"{m.group(1)}{self.moe.disk_block}.gate.weight", tuple(shape))]
        if m := self._gate_up.match(name):
            experts, rows, hidden = shape
            width = rows // 2
            return [(self._expert(m.group(1), e, w), (width, hidden))
                    for e in range(experts) for w in (self.moe.disk_gate, self.moe.disk_up)]
        if m := self._down.match(name):
            experts, hidden, width = shape
            return [(self._expert(m.group(1), e, self.moe.disk_down), (hidden, width)) for e in range(experts)]
        return [(name, tuple(shape))]

    def assemble(self, name: str, shape: tuple, read) -> torch.Tensor:
        """The memory tensor `name` of `shape`, built from `read(disk_name)`."""
        parts = self.disk(name, shape)
        if len(parts) == 1 and parts[0][0] == name:
            return read(name)
        if not (self._gate_up.match(name) or self._down.match(name)):
            return read(parts[0][0])
        # one fused tensor, filled expert by expert: host memory holds it and one expert's piece, never a list
        out = None
        for i, (disk, piece_shape) in enumerate(parts):
            piece = read(disk)
            if out is None:
                out = torch.empty(shape, dtype=piece.dtype)
            if self._gate_up.match(name):
                e, half = divmod(i, 2)
                out[e, half * piece_shape[0]:(half + 1) * piece_shape[0]] = piece
            else:
                out[i] = piece
            del piece
        return out

    def split(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        parts = self.disk(name, tuple(tensor.shape))
        if len(parts) == 1:
            return [(parts[0][0], tensor)]
        if self._gate_up.match(name):
            width = tensor.shape[1] // 2
            pieces = [piece for e in range(tensor.shape[0]) for piece in (tensor[e, :width], tensor[e, width:])]
        else:
            pieces = [tensor[e] for e in range(tensor.shape[0])]
        return [(n, t.contiguous()) for (n, _), t in zip(parts, pieces)]


def add_legacy_keys(folder, spec: ArchSpec) -> None:
    """config.json also under the names older transformers read (transformers 5 writes Qwen3-MoE's expert count
    as num_local_experts; 4.57 reads num_experts and would build 128 experts), so the output loads in both."""
    import json
    from pathlib import Path
    legacy = spec.moe.legacy_keys if spec.moe is not None else {}
    if not legacy:
        return
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    changed = False
    for old, new in legacy.items():
        if new in config and config.get(old) != config[new]:
            config[old] = config[new]
            changed = True
    if changed:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

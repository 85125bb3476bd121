"""A finished model folder as the exporters read it: its config, each layer's sizes and head map (from
`amp_per_layer`, or the global sizes with the even map), and its tensors one at a time (a 70B export never holds
the model)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..arch import spec_for_class
from ..common.errors import AmpError
from ..io.safetensors_io import Checkpoint
from ..runtime import per_layer


@dataclass(frozen=True)
class LayerShape:
    heads: int
    kv_heads: int
    intermediate: int
    head_map: tuple[int, ...]


class ExportSource:
    def __init__(self, folder, supported: tuple[str, ...], what: str, why: str = ""):
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise AmpError(f"{self.folder} is not a model folder (no config.json): give a folder amp prune wrote, or "
                           "a plain model folder")
        try:
            self.config = json.loads((self.folder / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise AmpError(f"{self.folder}/config.json is not valid JSON ({e.msg})") from None
        arch = (self.config.get("architectures") or ["?"])[0]
        spec_for_class(arch)  # an unsupported or refused family: its one-line error
        if arch not in supported:
            raise AmpError(f"{what} cannot express {arch}{': ' + why if why else ''}; exportable: "
                           f"{', '.join(supported)}")
        self.architecture = arch
        self.checkpoint = Checkpoint(self.folder)
        c = self.config
        self.hidden = c["hidden_size"]
        self.heads = c["num_attention_heads"]
        self.kv_heads = c.get("num_key_value_heads") or self.heads
        self.head_dim = c.get("head_dim") or self.hidden // self.heads
        self.layers_count = c["num_hidden_layers"]
        entries = c.get(per_layer.KEY)
        if entries:
            self.layers = [LayerShape(e["num_attention_heads"], e["num_key_value_heads"],
                                      e.get("intermediate_size", c["intermediate_size"]), tuple(e["head_map"]))
                           for e in entries]
        else:
            group = self.heads // self.kv_heads
            self.layers = [LayerShape(self.heads, self.kv_heads, c["intermediate_size"],
                                      tuple(h // group for h in range(self.heads)))] * self.layers_count
        self.per_layer = bool(entries)
        self.dense_heads = max(self.heads, max(s.heads for s in self.layers))
        self.tied = bool(c.get("tie_word_embeddings", False))

    def read(self, name: str):
        return self.checkpoint.read(name)

    def has(self, name: str) -> bool:
        return name in self.checkpoint.tensors

    def storage_dtype(self):
        return self.checkpoint.storage_dtype()

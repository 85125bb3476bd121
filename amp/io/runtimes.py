"""Pythons of the outside runtimes the engine hands work to (vLLM for `amp eval --backend vllm`, llama.cpp's
quantizer for the quantized GGUF exports): each lives in its own environment, since their pins differ from ours."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from ..common.errors import AmpError
from .models import cache_dir


def runtime_python(given: str | None, env_var: str, flag: str, module: str, runtime: str, missing: str) -> str:
    """A Python interpreter that imports `module`: the one named (by `flag`, else by the environment variable
    `env_var`), this one if it has the module, else the environment `python -m benchmarks.serve_check --install
    --runtimes RUNTIME` made under $AMP_CACHE_DIR/runtimes; `missing` is the error when there is none."""
    for candidate in (given, os.environ.get(env_var)):
        if candidate:
            if not Path(candidate).is_file():
                raise AmpError(f"{flag} {candidate}: no such interpreter")
            return candidate
    if importlib.util.find_spec(module) is not None:
        return sys.executable
    cached = cache_dir() / "runtimes" / runtime / "bin" / "python"
    if cached.is_file():
        return str(cached)
    raise AmpError(missing)

"""Quantized GGUF: the export written at 16 bits, then requantized by llama.cpp's own quantizer
(`llama_model_quantize`, the function behind `llama-quantize`), so that each tensor gets the type llama.cpp itself
chooses for the file type (Q4_K_M mixes Q4_K, Q6_K and the fallbacks below) and the file is what users would
have made from the f16 export by hand.

llama.cpp quantizes a weight row in blocks (32 values; 256 for the K-quants). A row whose length is not a multiple
falls back to a larger type (Q4_K -> Q5_0, Q6_K -> Q8_0) or, below a multiple of 32, to F16; ffn_down's rows are a
pruned layer's kept MLP width, which the engine keeps at such multiples (--mlp-multiple-of). The report names every
tensor's type and the 2-D weights left unquantized.

The quantizer runs in a Python that imports llama_cpp (llama-cpp-python): --llama-cpp-python, AMP_LLAMA_CPP_PYTHON,
this Python, or the runtime environment `python -m benchmarks.serve_check --install --runtimes llamacpp` makes.
It is not a dependency of the engine (a compiled llama.cpp of its own); the other GGUF types need none of it.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from ..common.errors import AmpError
from ..io.runtimes import runtime_python

# file type -> llama.cpp's llama_ftype (llama.h): what `llama-quantize` takes by name
FTYPES = {"q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q4_k_m": 15, "q4_0": 2}
UNQUANTIZED = ("F32", "F16", "BF16")
_QUANTIZE = """
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def find_python(given: str | None = None) -> str:
    """A Python interpreter that imports llama_cpp."""
    return runtime_python(given, "AMP_LLAMA_CPP_PYTHON", "--llama-cpp-python", "llama_cpp", "llamacpp",
                          "a quantized GGUF needs llama.cpp's quantizer from llama-cpp-python: pip install "
                          "llama-cpp-python (or python -m benchmarks.serve_check --install --runtimes llamacpp), or "
                          "name a Python that has it with --llama-cpp-python")


def quantize(source: Path, out: Path, ftype: str, python: str) -> None:
    """`source` (a 16- or 32-bit GGUF) quantized to `ftype` into `out` by llama.cpp."""
    if ftype not in FTYPES:
        raise AmpError(f"unknown GGUF quantization {ftype!r}; choose one of {', '.join(FTYPES)}")
    done = subprocess.run([python, "-c", _QUANTIZE, str(source), str(out), str(FTYPES[ftype])], capture_output=True,
                          text=True)
    if done.returncode != 0 or not out.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise AmpError(f"llama.cpp could not quantize {source.name} to {ftype.upper()}: {last}")


def tensor_types(path: Path, quantized: bool = True) -> dict:
    """What a GGUF file holds: every tensor's type, the bytes per type, and (in a quantized file) the 2-D weights
    left unquantized."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    tensors, by_type = {}, {}
    unquantized = []
    for t in reader.tensors:
        kind = t.tensor_type.name
        tensors[t.name] = kind
        entry = by_type.setdefault(kind, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += int(t.n_bytes)
        if quantized and kind in UNQUANTIZED and len([d for d in t.shape if d > 1]) == 2:
            unquantized.append(t.name)
    return {"file_bytes": path.stat().st_size, "types": by_type, "unquantized_weights": unquantized,
            "tensors": tensors}

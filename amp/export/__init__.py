"""Writing a finished model (pruned, per-layer, recovered or plain) in the forms serving engines load: DeciLM
`block_configs` for vLLM, SGLang and TensorRT-LLM (decilm.py), GGUF `deci` for llama.cpp (gguf.py). One layer at a
time, into a staged folder renamed into place when complete; what a format cannot express is padded exactly
(padding.py) and its cost reported in `export_report.json`. A new format is one file here and one FORMATS entry."""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..common.errors import AmpError
from ..io import folders
from . import decilm, gguf, vllm
from .source import ExportSource

FORMATS = {"decilm": (decilm, "DeciLM block_configs (vLLM, SGLang, TensorRT-LLM)"),
           "gguf": (gguf, "GGUF (llama.cpp)"),
           "vllm": (vllm, "vLLM (a plain checkpoint, DeciLM, or the amp-vllm plugin's per-layer form)")}
MATERIAL = 0.01   # padding above this share of the pruned model's parameters is named in a note
REPORT = "export_report.json"


def export_checkpoint(folder, fmt: str, out, *, overwrite: bool = False, progress: bool = True,
                      dtype: str | None = None, llama_cpp_python: str | None = None,
                      against_dense: bool = False) -> dict:
    """Exports the model folder `folder` as `fmt` into `out`; returns (and writes) the export report. GGUF:
    `dtype` (f16, or a quantization through llama.cpp found by `llama_cpp_python`), and with `against_dense` the
    dense model the folder was pruned from exported the same way, its file size beside this one's."""
    if fmt not in FORMATS:
        raise AmpError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    module, what = FORMATS[fmt]
    folders.check_output(out, overwrite)
    source = ExportSource(folder, module.SUPPORTED, what, getattr(module, "WHY", ""))
    module.check(source)
    options = {"dtype": dtype, "llama_cpp_python": llama_cpp_python} if fmt == "gguf" else {}
    options = {k: v for k, v in options.items() if v}
    if against_dense and fmt != "gguf":
        raise AmpError("--against-dense compares GGUF file sizes; it needs --format gguf")
    dense = _dense_folder(source) if against_dense else None
    start = time.perf_counter()

    def bar(items, desc):
        return tqdm(items, desc=desc, unit="layer", disable=not progress)
    with folders.staged_folder(out, overwrite) as tmp:
        result = module.export(source, Path(tmp), bar, **options)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                     "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja"):
            if (source.folder / name).is_file() and fmt == "decilm":
                (Path(tmp) / name).write_bytes((source.folder / name).read_bytes())
        report = _report(source, fmt, result, time.perf_counter() - start)
        if dense is not None:
            report["dense"] = _dense_size(dense, Path(tmp), module, bar, options)
            report["size_vs_dense"] = round(report["gguf"]["file_bytes"] / report["dense"]["file_bytes"], 4)
        (Path(tmp) / REPORT).write_text(json.dumps(report, indent=2))
    return report


def _dense_folder(source: ExportSource) -> Path:
    report = folders.read_report(source.folder) or {}
    dense = Path(report.get("model_path", ""))
    if not report.get("model_path") or not (dense / "config.json").is_file():
        raise AmpError(f"--against-dense: {source.folder} names no dense model that is here (amp_report.json's "
                       f"model_path: {report.get('model_path', 'none')})")
    return dense


def _dense_size(dense: Path, tmp: Path, module, bar, options: dict) -> dict:
    """The dense model exported the same way beside the export (then removed): its size and tensor types."""
    import shutil
    source = ExportSource(dense, module.SUPPORTED, "the dense model")
    module.check(source)
    work = tmp / ".dense"
    work.mkdir()
    try:
        result = module.export(source, work, bar, **options)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    held = result["gguf"]
    return {"folder": str(dense), "file_bytes": held["file_bytes"], "types": held["types"],
            "unquantized_weights": held["unquantized_weights"]}


def _report(source: ExportSource, fmt: str, result: dict, seconds: float) -> dict:
    layers = result["layers"]
    params = sum(_numel(info.shape) for info in source.checkpoint.tensors.values())
    added = sum(entry["params_added"] for entry in layers)
    report = {"format": fmt, "source": str(source.folder), "architecture": source.architecture,
              "seconds": round(seconds, 2), "params_source": params, "params_added_by_padding": added,
              "padding_share": round(added / max(params, 1), 5),
              "zero_query_heads": sum(e["zero_query_heads"] for e in layers),
              "added_kv_heads": sum(e["added_kv_heads"] for e in layers),
              "zero_neurons": sum(e.get("padded_neurons", 0) for e in layers),
              # whole model: attention FLOPs per token and KV cache of the export over the pruned model's
              "attention_flops_ratio": _ratio(layers, "query_heads", "zero_query_heads"),
              "kv_cache_ratio": _ratio(layers, "kv_heads", "added_kv_heads"),
              "layers": layers, "notes": list(result.get("notes", []))}
    if report["padding_share"] > MATERIAL:
        report["notes"].append(
            f"padding adds {added:,} parameters ({report['padding_share']:.1%} of the pruned model): "
            f"{padded_structures(report)}, which the runtime computes for nothing; the output is unchanged (zero "
            "o_proj and down_proj columns)")
    report.update({k: v for k, v in result.items() if k not in ("layers", "notes")})
    return report


def padded_structures(report: dict) -> str:
    """What an export padded in, every kind named: "2 zero query heads, 0 added KV heads and 1,536 zero MLP
    neurons" (neurons counted over all layers; a mixture's: per expert)."""
    return (f"{report['zero_query_heads']} zero query heads, {report['added_kv_heads']} added KV heads and "
            f"{report.get('zero_neurons', 0):,} zero MLP neurons")


def _ratio(layers: list, written: str, padded: str) -> float:
    total = sum(e[written] for e in layers)
    return round(total / max(total - sum(e[padded] for e in layers), 1), 4)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


GGUF_DTYPES = gguf.DTYPES

__all__ = ["FORMATS", "GGUF_DTYPES", "export_checkpoint", "REPORT"]

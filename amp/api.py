"""The Python API: prune a model in place, or a whole checkpoint from folder to folder."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from . import allocate, checkpoint, data, heterogeneous, models
from .config import TORCH_DTYPES, PruneConfig
from .errors import AmpError
from .pipeline import prune_layers
from .profiling import PhaseTimer
from .safetensors_io import Checkpoint, parse_size
from .stream import ModelSink, ModelSource, SafetensorsSource, ShardSink, resolve_compute_dtype


def _check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise AmpError("--device cuda was asked for, but this machine has no CUDA device")


def prune_(model, config: PruneConfig, calibration=None, *, progress: bool = True,
           timer: PhaseTimer | None = None, pad_id: int | None = None, probe=None) -> dict:
    """Prunes `model` (a supported HF causal LM on the host) in place and returns the report.

    `calibration`: a `data.Calibration`, a list of 1-D token-id tensors, or None for data-free criteria.
    """
    _check_device(config.device)
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None) or 0
    return _prune(ModelSource(model), ModelSink(model), config, calibration, pad_id, timer, progress, None, probe)


def _prune(source, sink, config: PruneConfig, calibration, pad_id: int, timer, progress: bool, staging,
           probe=None) -> dict:
    """The one prune behind prune_ and prune_checkpoint (in memory or streamed), and its report."""
    timer = timer or PhaseTimer(config.device)
    samples = calibration.samples if isinstance(calibration, data.Calibration) else calibration
    before = allocate.total_params(source.model)
    result = prune_layers(source, sink, config, samples, pad_id=pad_id, timer=timer, progress=progress,
                          staging=staging, probe=probe)
    after = result["params_after"]
    plan, g0, g1 = result["plan"], result["geometry_before"], result["geometry_after"]
    varies = "per layer" if heterogeneous.entries(result["target_config"]) else None
    return {
        "model_class": type(source.model).__name__,
        "criterion": config.criterion,
        "ratio_target": plan.target_ratio,
        "ratio_achieved": (before - after) / before,
        "iteration": config.iteration,
        "params_before": before,
        "params_after": after,
        "per_layer": {
            "heads": [g0.num_heads, varies or g1.num_heads], "kv_heads": [g0.num_kv_heads, varies or g1.num_kv_heads],
            "neurons": [g0.intermediate, varies or g1.intermediate], "head_dim": g0.head_dim,
            "attention_unit": "kv_group" if g0.is_gqa else "head",
            "attention_units_removed": plan.attn_units_removed,
            "attention_units_removed_ideal": plan.ideal_attn_units_removed,
            "params_removed": plan.params_removed_per_layer,
        },
        "notes": _notes(plan, g0, config) + result["notes"],
        "allocation": result["allocation"],
        "compensation": result["compensation"],
        "calibration": {
            "source": calibration.name if isinstance(calibration, data.Calibration) else
            ("token tensors" if samples else None),
            "file": calibration.file if isinstance(calibration, data.Calibration) else None,
            "samples": len(samples) if samples else 0, "tokens": result["calibration_tokens"],
            "seqlen": config.seqlen, "seed": config.seed, "used": config.needs_calibration,
        },
        "device": config.device, "seed": config.seed,
        "dtype": {"stored": result["storage_dtype"], "computed": result["compute_dtype"],
                  "why": result["compute_dtype_why"]},
        "memory": {
            "streamed": source.streamed,
            "checkpoint_bytes": source.size_bytes,
            "bytes_read": source.bytes_read,
            "bytes_written": sink.bytes_written,
            "offload": result["offload"],
        },
        "phases": timer.report(),
        "layers": result["layers"],
    }


def prune_checkpoint(model_name: str | None, config: PruneConfig, out, *, overwrite: bool = False,
                     data_dir=None, progress: bool = True, probe=None, recover=None, teacher: str | None = None
                     ) -> dict:
    """Prunes MODEL into the folder `out` (with amp_report.json). Safetensors checkpoints stream by default:
    one layer at a time is read, pruned and written into output shards, so neither host nor device memory has
    to hold the model. Every input is checked before the heavy work; `out` appears only when complete.
    `recover` (a RecoverConfig): then fine-tune the pruned model (distilled from `teacher`, "input" for the
    model being pruned) into `out`; the pruned model waits beside it in OUT.checkpoint/pruned, so that an
    interrupted recovery resumes with `amp recover OUT.checkpoint/pruned --out OUT --resume`."""
    _check_device(config.device)
    checkpoint.check_output(out, overwrite)
    if recover is not None:
        from .recover import checkpoint_path, recover_checkpoint, training_texts
        training_texts(recover.data, data_dir)  # a bad recovery data file fails before the prune
        stage = checkpoint_path(out).parent / "pruned"
        pruned = prune_checkpoint(model_name, config, stage, overwrite=True, data_dir=data_dir,
                                  progress=progress, probe=probe)
        teacher = pruned["model_path"] if teacher == "input" else teacher
        return recover_checkpoint(stage, out, recover, teacher, data_dir=data_dir, overwrite=overwrite,
                                  progress=progress)
    timer = PhaseTimer(config.device)
    started = time.perf_counter()
    with timer.phase("load"):
        folder = models.resolve_model(model_name)
        models.check_architecture(folder)
        ckpt = Checkpoint(folder) if config.stream else None  # headers, index, shards: checked here
        storage = None if config.dtype == "auto" else TORCH_DTYPES[config.dtype]
        if ckpt is not None:  # a dtype nothing can compute with is refused before any heavy work
            resolve_compute_dtype(storage or ckpt.storage_dtype(), torch.device(config.device),
                                  TORCH_DTYPES.get(config.compute_dtype))
        tokenizer = models.load_tokenizer(folder)
    calibration = None
    if config.needs_calibration:
        with timer.phase("calibration_data"):
            calibration = data.load_calibration(tokenizer, config.calib, config.nsamples, config.seqlen,
                                                config.seed, data_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    with checkpoint.staged_folder(out, overwrite) as tmp:
        if config.stream:
            with timer.phase("load"):
                source = SafetensorsSource(folder, ckpt, storage)
            sink = ShardSink(tmp, ckpt, source.storage_dtype, parse_size(config.max_shard_size))
            try:
                report = _prune(source, sink, config, calibration, pad_id, timer, progress, tmp, probe)
            finally:
                sink.close()
        else:
            with timer.phase("load"):
                model, _, _ = models.load_model(str(folder), config.dtype)
            report = _prune(ModelSource(model), ModelSink(model), config, calibration, pad_id, timer, progress, tmp,
                            probe)
            with timer.phase("write"):
                model.save_pretrained(tmp, safe_serialization=True, max_shard_size=config.max_shard_size)
                report["memory"]["bytes_written"] = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        with timer.phase("write"):
            tokenizer.save_pretrained(tmp)
        report["model"] = model_name or models.DEFAULT_MODEL
        report["model_path"] = str(folder)
        report["versions"] = _versions()
        report["phases"] = timer.report()
        report["wall_seconds"] = round(time.perf_counter() - started, 3)
        (tmp / checkpoint.REPORT_NAME).write_text(json.dumps(report, indent=2))
    return report


def load_pruned(folder, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer, report) of a folder that `amp prune` wrote; plain transformers loads it too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise AmpError(f"{folder} is not a model folder")
    from transformers import AutoConfig
    heterogeneous.check_tensors(folder, AutoConfig.from_pretrained(folder, local_files_only=True))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=models.DTYPES[dtype], local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True) \
        if (folder / "tokenizer_config.json").is_file() else None
    return model.to(device).eval(), tokenizer, checkpoint.read_report(folder)


DEPTH_PAYS_FROM = 0.3  # measured: depth allocation ties uniform at 10 %, is within noise at 20 %, wins at 30 %


def _notes(plan, geom, config) -> list[str]:
    notes = []
    if not config.single_pass:
        return [f"per-layer allocation {config.allocation} with {config.heads} heads: every layer has its own "
                "sizes (amp_report.json 'layers'); a checkpoint with differing layers loads after `import amp`"]
    if plan.target_ratio >= DEPTH_PAYS_FROM - 1e-9 and config.criterion == "amp":
        notes.append(f"at {plan.target_ratio:.0%}, consider --allocation depth: on SmolLM2 at 30 % it gave 1.44x "
                     "lower perplexity and 2.4 points more four-task accuracy (paired, beyond noise) than uniform; "
                     "its checkpoint loads after `import amp` (benchmarks/results/quality_paired_gaps.md)")
    if plan.attn_units_removed != plan.ideal_attn_units_removed:
        notes.append(f"the budget asked for {plan.ideal_attn_units_removed} attention units per layer; "
                     f"{plan.attn_units_removed} were removed so that the config stays loadable by the "
                     "installed transformers (or the MLP can absorb the rest); the MLP absorbed the difference")
    if geom.is_gqa and plan.attn_units_removed == 0:
        notes.append(f"grouped-query attention: a KV group holds {geom.group_size} query heads and "
                     f"{100 / geom.num_kv_heads:.0f}% of a layer's attention; this budget removed no whole group, "
                     "so only MLP neurons were pruned")
    return notes


def _versions() -> dict:
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}

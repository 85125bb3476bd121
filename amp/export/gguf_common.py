"""What every GGUF writer here shares: tensors in the export dtype, llama.cpp's rotary row order for the `llama` /
`deci` graphs, and the tokenizer carried over (copied from the GGUF file the model was dequantized from, else built
from tokenizer.json for byte-level BPE tokenizers)."""
from __future__ import annotations

import json

import numpy as np
import torch

from ..common.errors import AmpError
from ..io.models import gguf_origin
from .source import ExportSource


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from Hugging Face's rotate-half order to llama.cpp's interleaved order."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _array(t: torch.Tensor, dtype: str):
    """(numpy array, raw GGML type or None) of a tensor in the export dtype (1-D tensors: f32)."""
    import gguf
    t = t.detach().cpu()
    if t.dim() == 1 or dtype == "f32":
        return t.float().numpy(), None
    if dtype == "f16":
        return t.half().numpy(), None
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16


def _info(shape: tuple, dtype: str):
    """(numpy dtype, bytes, raw GGML type or None) of a tensor of `shape` as _array would write it."""
    import gguf
    n = 1
    for x in shape:
        n *= x
    if len(shape) == 1 or dtype == "f32":
        return np.float32, 4 * n, None
    if dtype == "f16":
        return np.float16, 2 * n, None
    return np.uint16, 2 * n, gguf.GGMLQuantizationType.BF16


def _add_tokenizer(writer, source: ExportSource) -> str | None:
    """Copies the tokenizer metadata of the GGUF the model came from, else builds it from tokenizer.json; returns
    a note when the pre-tokenizer had to be guessed."""
    import gguf
    origin = gguf_origin(source.folder)
    if origin is not None:
        reader = gguf.GGUFReader(str(origin))
        for key, field in reader.fields.items():
            if not key.startswith("tokenizer."):
                continue
            value = field.contents()
            if field.types[0] == gguf.GGUFValueType.ARRAY:
                writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=field.types[-1])
            else:
                writer.add_key_value(key, value, field.types[0])
        return None
    path = source.folder / "tokenizer.json"
    if not path.is_file():
        raise AmpError(f"{source.folder} has no tokenizer.json (and did not come from a GGUF file): the GGUF export "
                       "needs the tokenizer to carry over")
    spec = json.loads(path.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise AmpError(f"{path}: a {model.get('type')} tokenizer; this GGUF export carries byte-level BPE tokenizers "
                       "(and any tokenizer of a model dequantized from GGUF); convert it with llama.cpp's "
                       "convert_hf_to_gguf.py instead")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    size = max(source.config["vocab_size"], max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        t = added.get(text)
        types[i] = (gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED) if t else \
            gguf.TokenType.NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(source.folder, load_merges=True, n_vocab=size)
    special.add_to_gguf(writer, quiet=True)
    if not special.merges:  # a byte-level vocabulary without merges: llama.cpp still wants the (empty) list
        writer.add_token_merges([])
    return ("the tokenizer was rebuilt from tokenizer.json with llama.cpp's default BPE pre-tokenizer; check that "
            "llama.cpp splits text as transformers does (llama.cpp's convert_hf_to_gguf.py names the exact one)")

"""DeciLM / nemotron-nas configuration, written beside every `amp export --format decilm` checkpoint (loaded by
serving engines with trust_remote_code: vLLM, SGLang, TensorRT-LLM). `block_configs` holds one entry per decoder
layer; the loaders read `block_configs[i].attention.n_heads_in_group` (KV heads = num_attention_heads /
n_heads_in_group), `.attention.no_op`, `.ffn.intermediate_size` and `.ffn.no_op` as attributes."""
from transformers import PretrainedConfig


class _Section:
    """A block's attention or ffn entry with attribute access (and back to a dict for saving)."""

    def __init__(self, values: dict):
        self.__dict__.update(values)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class BlockConfig:
    def __init__(self, entry):
        entry = entry.to_dict() if isinstance(entry, BlockConfig) else dict(entry)
        self.attention = _Section(entry.get("attention", {}))
        self.ffn = _Section(entry.get("ffn", {}))

    def to_dict(self) -> dict:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [BlockConfig(b) for b in (block_configs or [])]
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out

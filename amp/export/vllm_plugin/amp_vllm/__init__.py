"""vLLM plugin for AMP per-layer results: a heterogeneous variant of each family the AMP engine prunes, which
reuses vLLM's own model class and builds every decoder layer from that layer's sizes (query heads, KV heads, MLP
width; for mixtures of experts the experts kept and their width), read from the checkpoint's `amp_per_layer`.

`amp export PRUNED --format vllm --out DIR` writes such a checkpoint (architectures "Amp<Family>ForCausalLM");
install this package into vLLM's environment (`pip install --no-deps <path to this folder>`) and `vllm serve DIR`.
vLLM runs `register` in every process through the `vllm.general_plugins` entry point."""

# architecture name in config.json -> "module:class" (imported lazily by vLLM, in the process that needs it)
ARCHITECTURES = {
    "AmpLlamaForCausalLM": "amp_vllm.llama:AmpLlamaForCausalLM",
    "AmpMistralForCausalLM": "amp_vllm.llama:AmpMistralForCausalLM",
    "AmpQwen2ForCausalLM": "amp_vllm.qwen2:AmpQwen2ForCausalLM",
    "AmpQwen3ForCausalLM": "amp_vllm.qwen3:AmpQwen3ForCausalLM",
    "AmpGemma2ForCausalLM": "amp_vllm.gemma2:AmpGemma2ForCausalLM",
    "AmpGemma3ForCausalLM": "amp_vllm.gemma3:AmpGemma3ForCausalLM",
    "AmpPhi3ForCausalLM": "amp_vllm.phi3:AmpPhi3ForCausalLM",
    "AmpMixtralForCausalLM": "amp_vllm.mixtral:AmpMixtralForCausalLM",
    "AmpQwen3MoeForCausalLM": "amp_vllm.qwen3_moe:AmpQwen3MoeForCausalLM",
}


def register() -> None:
    """Registers every variant with vLLM's model registry (by name: nothing is imported until a model needs it)."""
    from vllm import ModelRegistry
    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)

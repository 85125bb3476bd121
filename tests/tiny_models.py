"""Tiny random configs (2-4 layers) of every supported family, GQA and MHA variants."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM,
                          Phi3Config, Phi3ForCausalLM, PhiConfig, PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

VOCAB = 258  # byte-level tokenizer below: <pad>, <eos>, 256 bytes
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, max_position_embeddings=128,
               pad_token_id=0, eos_token_id=1, bos_token_id=1)

FAMILIES = {
    "llama_gqa": (LlamaForCausalLM, LlamaConfig, dict(num_hidden_layers=2, num_attention_heads=8,
                                                        num_key_value_heads=4, head_dim=8)),
    "llama_mha": (LlamaForCausalLM, LlamaConfig, dict(num_hidden_layers=3, num_attention_heads=6, hidden_size=60,
                                                        num_key_value_heads=6, tie_word_embeddings=True)),
    "mistral_gqa": (MistralForCausalLM, MistralConfig, dict(num_hidden_layers=2, num_attention_heads=8,
                                                              num_key_value_heads=2, head_dim=8,
                                                              sliding_window=None)),
    "qwen2_gqa": (Qwen2ForCausalLM, Qwen2Config, dict(num_hidden_layers=2, num_attention_heads=6,
                                                        num_key_value_heads=3, use_sliding_window=False)),
    "phi_mha": (PhiForCausalLM, PhiConfig, dict(num_hidden_layers=2, num_attention_heads=4,
                                                  partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0,
                                                  attention_dropout=0.0)),
    "phi3_gqa": (Phi3ForCausalLM, Phi3Config, dict(num_hidden_layers=4, num_attention_heads=8,
                                                     num_key_value_heads=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                                     attention_dropout=0.0, pad_token_id=0)),
    # head_dim given explicitly and not hidden / heads (6 x 16 = 96 on a 64 hidden), q_norm / k_norm per head
    "qwen3_gqa": (Qwen3ForCausalLM, Qwen3Config, dict(num_hidden_layers=2, num_attention_heads=6,
                                                        num_key_value_heads=3, head_dim=16)),
    # sliding-window layers (window 8, shorter than the calibration samples) alternating with global ones,
    # attention soft-capping, query_pre_attn_scalar, GeGLU, head_dim 12 (8 x 12 = 96 on a 48 hidden, which transformers 5 lets
    # lose a KV group: 48 % 6 == 0)
    "gemma2_gqa": (Gemma2ForCausalLM, Gemma2Config, dict(num_hidden_layers=4, num_attention_heads=8,
                                                           num_key_value_heads=4, head_dim=12, sliding_window=8,
                                                           hidden_size=48,
                                                           query_pre_attn_scalar=20, attn_logit_softcapping=5.0,
                                                           final_logit_softcapping=8.0)),
    # Gemma 3: per-kind rotary tables (local base 10k, global 1M), q_norm / k_norm, sliding and global layers
    "gemma3_gqa": (Gemma3ForCausalLM, Gemma3TextConfig, dict(num_hidden_layers=4, num_attention_heads=8,
                                                               num_key_value_heads=4, head_dim=16, sliding_window=8,
                                                               hidden_size=48,
                                                               query_pre_attn_scalar=16,
                                                               layer_types=["sliding_attention", "full_attention",
                                                                            "sliding_attention", "full_attention"])),
}


# Mixture-of-experts families (their MLPs are experts, so they get tests of their own: tests/test_moe.py).
MOE_FAMILIES = {
    # every layer sparse: 6 experts of 40, top-2 (renormalized), 6 query heads on 2 KV heads
    "mixtral_moe": (MixtralForCausalLM, MixtralConfig, dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=6,
                                                          num_key_value_heads=2, intermediate_size=40,
                                                          num_local_experts=6, num_experts_per_tok=2,
                                                          router_jitter_noise=0.0, sliding_window=None)),
    # layer 1 dense (mlp_only_layers), the others 8 experts of 24, top-2 NOT renormalized; q_norm / k_norm
    "qwen3moe_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig, dict(num_hidden_layers=3, hidden_size=48,
                                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                             intermediate_size=64, moe_intermediate_size=24,
                                                             num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1],
                                                             norm_topk_prob=False)),
}


def make_tiny(name: str, seed: int = 0) -> torch.nn.Module:
    cls, config_cls, extra = FAMILIES[name] if name in FAMILIES else MOE_FAMILIES[name]
    config = config_cls(**{**_COMMON, **extra})
    torch.manual_seed(seed)
    model = cls(config).eval()
    # Random biases and norm weights too, so that slicing them wrongly cannot go unnoticed.
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if name_.endswith("bias") or "norm" in name_:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_tokenizer():
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def save_tiny(model, folder, shard: str | None = None):
    """`model` and the byte-level tokenizer saved as a model folder (sharded when `shard` is a size)."""
    model.save_pretrained(folder, max_shard_size=shard or "5GB")
    tiny_tokenizer().save_pretrained(folder)
    return folder

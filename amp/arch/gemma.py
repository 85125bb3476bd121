"""Gemma 2 and Gemma 3 (text): GeGLU MLP (`gelu_pytorch_tanh` gate, read from `hidden_activation`), head_dim given
explicitly (256 or 128), RMSNorms before AND after attention and the MLP, scaled embeddings, alternating
sliding-window and global layers (`layer_types`; Gemma 3 gives each kind its own rotary tables), and
`query_pre_attn_scalar` in place of head_dim for the attention scale; Gemma 2 soft-caps attention logits, and
Gemma 3 normalizes q and k per head (q_norm / k_norm over head_dim, kept whole).

The AMP head score stays what the head writes through o_proj. With the post-attention norm, that output is
rescaled by the layer's RMS over all heads before it reaches the residual stream, so the score ranks heads by
their share of the block's output, not by their exact contribution to the residual (removing a head changes the
scale of the others' output a little); masked-original exactness holds all the same.

The Gram-based paths (structured OBS, the refit, the KL allocation's curves) measure the error where the residual
stream sees it: after the post-norms (ArchSpec.post_norms). Measured before them, a few tokens whose MLP output is
hundreds of times the typical one (and which the norm scales back) dominate the Gram, and the error and the
allocation follow those tokens (issue 29: 3 of 4 query heads removed in 10 of 18 layers of Gemma-3-270M, the MLPs
of layers 8-15 untouched)."""
from .base import ArchSpec

POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")

GEMMA2 = ArchSpec(family="gemma2", classes=("Gemma2ForCausalLM",), act_key="hidden_activation",
                  hf=(("gemma2", "Gemma2DecoderLayer", "Gemma2Model"),), post_norms=POST_NORMS)
GEMMA3 = ArchSpec(family="gemma3", classes=("Gemma3ForCausalLM",), act_key="hidden_activation",
                  hf=(("gemma3", "Gemma3DecoderLayer", "Gemma3TextModel"),), post_norms=POST_NORMS)

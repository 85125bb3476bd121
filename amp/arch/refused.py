"""Families the engine cannot prune exactly, and why (a one-line error names the reason)."""

REFUSED = {
    "Olmo2ForCausalLM": "OLMo-2 normalizes q and k over all heads together (q_norm / k_norm over "
                        "num_heads x head_dim), so removing a head changes every other head's output; structured "
                        "head pruning cannot be exact there",
    "Olmo3ForCausalLM": "OLMo-3 normalizes q and k over all heads together (as OLMo-2 does), so removing a head "
                        "changes every other head's output; structured head pruning cannot be exact there",
}

"""Runs in Torch-Pruning's own environment (benchmarks/peers.py makes it, with the transformers it was tested
with): the settings of its LLM example (examples/LLMs/prune_llm.py: GroupNormImportance p=2, MetaPruner, local
pruning of hidden channels, attention heads (head dims kept, so RoPE is untouched) and MLP channels with one ratio,
round_to=4, lm_head ignored; its GroupNormImportance is called GroupMagnitudeImportance in 1.6.1), eager attention, no cache, on the CPU. The ratio is searched (bisection) so that the
pruned model has the parameter count asked for; saves it with save_pretrained.
    python torch_pruning_prune.py JOB.json   (JOB: model, out, params)"""
import json
import os
import shutil
import sys
import time

import torch
import torch_pruning as tp
from transformers import AutoModelForCausalLM

job = json.loads(open(sys.argv[1]).read())


def prune(ratio):
    model = AutoModelForCausalLM.from_pretrained(job["model"], torch_dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    model.config.use_cache = False
    cfg = model.config
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = cfg.num_key_value_heads
            num_heads[m.v_proj] = cfg.num_key_value_heads
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=torch.tensor([[1, 2, 3, 4]]), importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=num_heads,
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, round_to=4)
    for group in pruner.step(interactive=True):
        group.prune()
    # the example's bookkeeping: sizes back into the modules and the config
    cfg.hidden_size = model.lm_head.in_features
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            heads = m.q_proj.out_features // m.head_dim
            cfg.num_attention_heads = heads
            cfg.num_key_value_heads = m.k_proj.out_features // m.head_dim
            m.num_key_value_groups = heads // cfg.num_key_value_heads
        elif name.endswith("mlp"):
            cfg.intermediate_size = m.gate_proj.out_features
    cfg.head_dim = model.model.layers[0].self_attn.head_dim
    # a tied lm_head becomes a parameter of its own when pruned (the same columns go from both): count it once,
    # as the saved model (tied again on load) has it
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    if tied:
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    return model, sum(p.numel() for n, p in model.named_parameters() if not (tied and n == "lm_head.weight"))


start = time.perf_counter()
lo, hi, best = 0.0, 0.6, None
for _ in range(14):  # bisection on the ratio: parameters fall as it grows
    mid = (lo + hi) / 2
    model, params = prune(mid)
    if best is None or abs(params - job["params"]) < abs(best[1] - job["params"]):
        best = (mid, params, model)
    if params > job["params"]:
        lo = mid
    else:
        hi = mid
ratio, params, model = best
with torch.no_grad():  # it must still run
    model(torch.tensor([[1, 2, 3]]))
model.save_pretrained(job["out"], safe_serialization=True)
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
    if os.path.isfile(os.path.join(job["model"], name)):  # as written by this project's transformers: copied as is
        shutil.copyfile(os.path.join(job["model"], name), os.path.join(job["out"], name))
print("RESULT " + json.dumps({"seconds": time.perf_counter() - start, "params": params,
                              "settings": {"pruning_ratio": ratio, "importance": "GroupMagnitudeImportance(p=2, mean)",
                                           "round_to": 4, "hidden_size": model.config.hidden_size,
                                           "heads": model.config.num_attention_heads,
                                           "kv_heads": model.config.num_key_value_heads,
                                           "intermediate_size": model.config.intermediate_size}}))

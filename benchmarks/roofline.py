"""An honest projection (roofline arithmetic, marked as estimates) of what the kernels and a whole prune cost on an
A100 and an H100, beside the stock operations they replace, with the CPU times this machine measures for the
same prune phases on one LLaMA-2-7B-shaped layer.

    python -m benchmarks.roofline [--tokens 2048] [--name roofline]

Per kernel and shape: FLOPs, the bytes it moves (each input read once, each output written once, unless a tile
must be re-read), arithmetic intensity, and the projected time max(FLOPs / peak, bytes / bandwidth) at the
published peaks; the stock counterpart (cuBLAS GEMM, SDPA, unfused torch) gets the same arithmetic. For a prune of
LLaMA-3-70B with the default recipe (64 x 512 C4 tokens, sequential, refit): FLOPs per phase (observe, Gram
accumulation, solve, sequential pass) and projected minutes on one H100. Nothing here was measured on a GPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import RESULTS, record

# Published dense peaks: bf16 tensor cores, fp32 (no TF32), fp64 tensor cores, HBM bandwidth.
PEAKS = {"A100-80GB": dict(bf16=312e12, fp32=19.5e12, fp64=19.5e12, bw=2.039e12),
         "H100-SXM": dict(bf16=989e12, fp32=67e12, fp64=67e12, bw=3.35e12)}
BF16 = 2


def _t(flops: float, nbytes: float, gpu: str, kind: str = "bf16") -> float:
    p = PEAKS[gpu]
    return max(flops / p[kind], nbytes / p["bw"])


def kernel_rows(families=("LLaMA-3-8B", "LLaMA-3-70B", "Gemma-2-9B", "Qwen3-32B"), tokens: int = 4096,
                prefill: int = 2048, cache=(1024, 8192, 32768)) -> list[dict]:
    from amp_kernels.compiled import FAMILIES
    rows = []

    def add(family, op, flops, ours, stock_name, stock_bytes, stock_flops=None):
        row = {"family": family, "op": op, "gflop": round(flops / 1e9, 2), "mbytes": round(ours / 1e6, 1),
               "intensity": round(flops / ours, 1), "stock": stock_name, "stock_mbytes": round(stock_bytes / 1e6, 1)}
        for gpu in PEAKS:
            row[f"{gpu}_us"] = round(_t(flops, ours, gpu) * 1e6, 1)
            row[f"{gpu}_stock_us"] = round(_t(stock_flops or flops, stock_bytes, gpu) * 1e6, 1)
        rows.append(row)

    for family in families:
        hidden, heads, kv, d, width, kind = FAMILIES[family]
        hd = heads * d
        # head_norms: per head, (T x d) @ (d x hidden), |.| summed; the paper's way materializes T x H x hidden.
        flops = 2 * tokens * hd * hidden
        ours = (tokens * hd + hidden * hd) * BF16 + heads * 4
        add(family, f"head_norms T={tokens}", flops, ours, "batched GEMM writing T x H x hidden, then a reduction",
            ours + 2 * tokens * heads * hidden * BF16)
        # fused activation with statistics vs silu, multiply, then |a| summed in a second pass
        n = tokens * width
        add(family, f"{kind if kind != 'experts' else 'swiglu'}+stats T={tokens}", 12 * n, 3 * n * BF16 + width * 4,
            "act, mul, abs-sum unfused", 8 * n * BF16)
        # prefill attention (causal): same FLOPs as SDPA with enable_gqa
        flops = 4 * heads * prefill * prefill * d / 2
        qkvo = (2 * heads + 2 * kv) * prefill * d * BF16
        add(family, f"attention prefill T={prefill}", flops, qkvo, "SDPA (flash, GQA)", qkvo)
        for s in cache:
            flops = 4 * heads * s * d
            grouped = 2 * kv * s * d * BF16 + 2 * heads * d * BF16
            per_head = 2 * heads * s * d * BF16 + 2 * heads * d * BF16
            add(family, f"decode S={s} (grouped kernel)", flops, grouped,
                "transformers' SDPA path (repeat_kv copies the cache to every query head, then reads it)",
                grouped + 2 * per_head)
            add(family, f"decode S={s} (per-query-head kernel, before)", flops, per_head, "-", per_head)
    return rows


def prune_rows(tokens: int = 64 * 512) -> list[dict]:
    """LLaMA-3-70B, default recipe, per layer and for 80 layers, on one H100 (projected)."""
    hidden, heads, kv, d, inter, layers = 8192, 64, 8, 128, 28672, 80
    hd = heads * d
    layer_params = hidden * hd * 2 + 2 * hidden * kv * d + 3 * hidden * inter
    forward = 2 * layer_params * tokens
    gram = 2 * tokens * (hd * hd + inter * inter)                          # fp32 products, accumulated in fp64
    solve = (hd ** 3 + inter ** 3) / 3 + 2 * (hd * hd + inter * inter) * hidden  # Cholesky and the solve, fp64
    phases = [("observe (forward with statistics)", forward, "bf16"), ("Gram accumulation (o_proj, down_proj)", gram,
              "fp32"), ("solve (damped refit)", solve, "fp64"), ("sequential pass (pruned forward)", 0.8 * forward,
              "bf16")]
    rows = []
    for name, flops, kind in phases:
        h100 = flops / PEAKS["H100-SXM"][kind]
        rows.append({"phase": name, "tflop_per_layer": round(flops / 1e12, 2), "precision": kind,
                     "H100_s_per_layer": round(h100, 3), "H100_min_80_layers": round(h100 * layers / 60, 2)})
    return rows


def cpu_phases(tokens: int) -> list[dict]:
    """The same phases measured here on one LLaMA-2-7B-shaped layer in bf16 (hidden 4096, intermediate 11008),
    with the engine's own code: the layer's forward, Gram.add over the projections' inputs, compensate.refit."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from amp.prune.compensate import Gram, refit
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    layer = LlamaDecoderLayer(config, 0).to(torch.bfloat16).eval()
    x = torch.randn(1, tokens, 4096, dtype=torch.bfloat16)
    pos = torch.arange(tokens)[None]
    rope = LlamaRotaryEmbedding(config)(x, pos)
    rows = []
    with torch.no_grad():
        start = time.perf_counter()
        layer(x, position_embeddings=rope, position_ids=pos)
        fwd = time.perf_counter() - start
        a = torch.randn(tokens, 11008, dtype=torch.bfloat16)
        o_in = torch.randn(tokens, 4096, dtype=torch.bfloat16)
        g_o, g_d = Gram.zeros(4096, "cpu"), Gram.zeros(11008, "cpu")
        start = time.perf_counter()
        g_o.add(o_in)
        g_d.add(a)
        gram = time.perf_counter() - start
        keep = torch.arange(0, 11008, 2)
        start = time.perf_counter()
        refit(layer.mlp.down_proj, g_d, keep, 0.01, False)
        solve = time.perf_counter() - start
        # the sequential pass runs the pruned layer: 20 % of the heads and of the MLP width gone
        # (built at full size, then its projections cut: transformers' config refuses 26 heads on a 4,096 hidden)
        pruned = LlamaDecoderLayer(LlamaConfig(hidden_size=4096, intermediate_size=int(11008 * 0.8),
                                               num_attention_heads=32, num_key_value_heads=32), 0)
        attn = pruned.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, torch.nn.Linear(4096, 26 * 128, bias=False))
        attn.o_proj = torch.nn.Linear(26 * 128, 4096, bias=False)
        pruned = pruned.to(torch.bfloat16).eval()
        start = time.perf_counter()
        pruned(x, position_embeddings=rope, position_ids=pos)
        seq = time.perf_counter() - start
    for name, seconds in (("observe (forward with statistics)", fwd), ("Gram accumulation (o_proj, down_proj)", gram),
                          ("solve (damped refit, down_proj keeping half)", solve),
                          ("sequential pass (pruned forward)", seq)):
        rows.append({"phase": name, "cpu_s_7b_layer": round(seconds, 2), "tokens": tokens})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="calibration tokens of the CPU measurement")
    p.add_argument("--name", default="roofline")
    args = p.parse_args(argv)
    kernels = kernel_rows()
    prune = prune_rows()
    cpu = cpu_phases(args.tokens)
    for row, measured in zip(prune, cpu):
        row["cpu_s_7b_layer"] = measured["cpu_s_7b_layer"]
        row["cpu_tokens"] = measured["tokens"]
    total = sum(r["H100_min_80_layers"] for r in prune)
    summary = ["Estimates from published peaks (A100-80GB: 312 TFLOP/s bf16, 19.5 fp32 and fp64, 2.04 TB/s; H100-SXM: "
               "989 bf16, 67 fp32 and fp64, 3.35 TB/s), not measurements.",
               f"LLaMA-3-70B, default recipe (32,768 calibration tokens, sequential, refit): {total:.1f} minutes of "
               "arithmetic on one H100 at peak (reading 141 GB and writing 113 GB add about 2 minutes of NVMe); "
               "the solve is fp64 and the Gram matrices (28,672 x 28,672 for down_proj) dominate."]
    decode = [r for r in kernels if r["op"].startswith("decode") and r["family"] == "LLaMA-3-8B"]
    for r in decode:
        summary.append(f"LLaMA-3-8B {r['op']}: {r['mbytes']} MB per step, {r['H100-SXM_us']} us on an H100")
    for line in summary:
        print(line)
    record(args.name, kernels, summary, Path(RESULTS))
    record(args.name + "_prune", prune, [f"measured CPU column: {args.tokens} tokens through one LLaMA-2-7B-shaped "
                                         "layer (bf16) here; the H100 columns are LLaMA-3-70B projections"],
           Path(RESULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())

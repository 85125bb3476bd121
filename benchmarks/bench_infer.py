"""What pruning buys at inference: stock transformers vs amp.accelerate_, dense vs pruned, in one run.

- SmolLM2-135M (the bundled model, fp32): dense, uniformly pruned at 20 % and 30 %, and at 20 % with per-layer
  budgets (depth, single query heads) and with single query heads alone (uneven groups) (pruned here with AMP on 32
  Alpaca prompts: speed does not depend on which structures went). Prefill tokens/s over 512 and 2,048 tokens
  (batch 1) and decode tokens/s at batch 1 and 16 (a 16-token prompt, 128 new tokens, greedy, KV cache), each
  through the stock path and the fused path; and where the prefill time goes (attention, MLP, the rest), measured
  with forward hooks.
- One decoder layer of LLaMA-2-7B and of LLaMA-3-8B shape (bf16 where the CPU has bf16 arithmetic, else fp32;
  bf16 on a GPU), at 0 / 20 / 30 % of the layer's parameters removed with the engine's own uniform plan: the same
  prefill and decode workloads through that one layer.
- On CUDA also the kernels alone (triton.testing.do_bench): gqa_attention vs SDPA on even groups and vs the
  index-based path on an uneven map, the fused MLP activation vs cuBLAS + torch's activation.

    python -m benchmarks.bench_infer [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import amp
from amp.common.dtypes import cpu_bf16_flag
from benchmarks.harness import RESULTS, gpu_ms, record, timed

LAYER_SHAPES = {
    "llama2-7b-layer": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "llama3-8b-layer": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
}


def _timer(device, repeats):
    if device == "cuda":
        return lambda fn: gpu_ms(fn)
    return lambda fn: timed(fn, warmup=1, repeats=repeats)


def smollm2_models(device):
    dense, tokenizer, _ = amp.load_model(None, "float32")
    calib = amp.load_calibration(tokenizer, "alpaca", nsamples=32)
    models = {"smollm2-dense": dense}
    for name, ratio, extra in (("amp20", 0.2, {}), ("amp30", 0.3, {}),
                               ("amp20-depth-query", 0.2, dict(allocation="depth", heads="query")),
                               ("amp20-uniform-query", 0.2, dict(allocation="uniform", heads="query"))):
        model, _, _ = amp.load_model(None, "float32")
        amp.prune_(model, amp.PruneConfig(ratio=ratio, **{"criterion": "amp", "allocation": "uniform", **extra}),
                   calib, progress=False)
        models[f"smollm2-{name}"] = model
    return {k: m.to(device).eval() for k, m in models.items()}


def layer_models(device, dtype):
    """A one-layer LLaMA per shape and ratio (vocab 8: the layer is what is timed), pruned shapes from the plan."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from amp.prune import allocate
    from amp.arch import Geometry, spec_for
    out = {}
    for name, shape in LAYER_SHAPES.items():
        config = LlamaConfig(vocab_size=8, num_hidden_layers=1, head_dim=128, max_position_embeddings=4096, **shape)
        with init_empty_weights():
            meta = LlamaForCausalLM(config)
        layer_params = sum(p.numel() for p in meta.model.layers[0].parameters())
        total = sum(p.numel() for p in meta.parameters())
        for pct in (0, 20, 30):
            kept = dict(shape)
            if pct:
                plan = allocate.plan(meta, meta.model.layers, spec_for(meta), Geometry.from_config(config),
                                     pct / 100 * layer_params / total)
                groups = shape["num_key_value_heads"] - plan.attn_units_removed
                kept.update(num_key_value_heads=groups, intermediate_size=shape["intermediate_size"] - plan.neurons_removed,
                            num_attention_heads=groups * shape["num_attention_heads"] // shape["num_key_value_heads"])
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(vocab_size=8, num_hidden_layers=1, head_dim=128,
                                                 max_position_embeddings=4096, **kept))
            out[f"{name}-{pct}%"] = (model.to(device=device, dtype=dtype).eval(), kept)
    return out


@torch.no_grad()
def workloads(model, device, hidden_input: bool, quick: bool):
    """name -> (callable, tokens it produces)."""
    dtype = next(model.parameters()).dtype
    width = model.config.hidden_size

    def inputs(b, t):
        if hidden_input:
            return {"inputs_embeds": torch.randn(b, t, width, device=device, dtype=dtype)}
        return {"input_ids": torch.randint(2, 1000, (b, t), device=device)}

    def prefill(t):
        x = inputs(1, t)
        return (lambda: model.model(**x, use_cache=False)) if hidden_input else (lambda: model(**x, use_cache=False))

    def decode(b, steps):
        from transformers import DynamicCache

        def run():
            if not hidden_input:
                ids = inputs(b, 16)["input_ids"]
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                      min_new_tokens=steps, do_sample=False, pad_token_id=0)
            cache = DynamicCache(config=model.config)
            model.model(**inputs(b, 16), past_key_values=cache, use_cache=True)
            step = inputs(b, 1)
            for _ in range(steps):
                model.model(**step, past_key_values=cache, use_cache=True)
        return run

    steps = 32 if quick else 128
    return {"prefill-512": (prefill(512), 512), "prefill-2048": (prefill(2048), 2048),
            "decode-b1": (decode(1, steps), steps), "decode-b16": (decode(16, steps), 16 * steps)}


@torch.no_grad()
def time_share(model, device):
    """Shares of a 512-token prefill spent in attention, MLP and the rest (forward hooks; CUDA synchronized)."""
    spent = {"attention": 0.0, "mlp": 0.0}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    handles, starts = [], {}
    for layer in model.model.layers:
        for kind, mod in (("attention", layer.self_attn), ("mlp", layer.mlp)):
            def pre(_m, _a, kind=kind, mod=mod):
                sync()
                starts[id(mod)] = time.perf_counter()

            def post(_m, _a, _o, kind=kind, mod=mod):
                sync()
                spent[kind] += time.perf_counter() - starts[id(mod)]
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    ids = torch.randint(2, 1000, (1, 512), device=device)
    model(ids, use_cache=False)
    spent = {"attention": 0.0, "mlp": 0.0}
    sync()
    start = time.perf_counter()
    for _ in range(3):
        model(ids, use_cache=False)
    sync()
    total = time.perf_counter() - start
    for h in handles:
        h.remove()
    return {k: v / total for k, v in spent.items()} | {"rest": 1 - sum(spent.values()) / total}


def kernel_rows(device):
    """CUDA only: the kernels alone against their stock counterparts."""
    import torch.nn.functional as F

    import amp_kernels
    from amp.runtime.attention import indexed_attention
    rows = []
    dt = torch.bfloat16
    for t in (512, 2048):
        q = torch.randn(1, 32, t, 128, device=device, dtype=dt)
        k, v = (torch.randn(1, 8, t, 128, device=device, dtype=dt) for _ in range(2))
        even = torch.arange(32, device=device) // 4
        uneven = torch.tensor([0] * 7 + [1] * 2 + [2] * 5 + [3] * 3 + [4] * 4 + [5] * 4 + [6] * 3 + [7] * 4,
                              device=device)[:28]
        sdpa = gpu_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))["median"]
        kern = gpu_ms(lambda: amp_kernels.gqa_attention(q, k, v, even))["median"]
        rows.append({"what": f"attention even 32/8, T={t}", "kernel_ms": kern * 1e3, "baseline": "SDPA enable_gqa",
                     "baseline_ms": sdpa * 1e3, "kernel_over_baseline": kern / sdpa})
        qu = q[:, :28]
        idx = gpu_ms(lambda: indexed_attention(qu, k, v, uneven))["median"]
        kern = gpu_ms(lambda: amp_kernels.gqa_attention(qu, k, v, uneven))["median"]
        rows.append({"what": f"attention uneven 28/8, T={t}", "kernel_ms": kern * 1e3, "baseline": "index + SDPA",
                     "baseline_ms": idx * 1e3, "kernel_over_baseline": kern / idx})
    for n in (16, 2048):
        x = torch.randn(n, 4096, device=device, dtype=dt)
        wg, wu = (torch.randn(14336, 4096, device=device, dtype=dt) / 64 for _ in range(2))
        stock = gpu_ms(lambda: F.silu(x @ wg.T) * (x @ wu.T))["median"]
        act = gpu_ms(lambda: amp_kernels.swiglu(x @ wg.T, x @ wu.T))["median"]
        fused = gpu_ms(lambda: amp_kernels.swiglu_matmul(x, wg, wu))["median"]
        rows.append({"what": f"MLP in, N={n}", "kernel_ms": act * 1e3, "baseline": "cuBLAS + silu*up",
                     "baseline_ms": stock * 1e3, "kernel_over_baseline": act / stock,
                     "swiglu_matmul_ms": fused * 1e3, "swiglu_matmul_over_baseline": fused / stock})
    return rows


def _dense_name(name: str) -> str:
    if name.startswith("smollm2-"):
        return "smollm2-dense"
    return name.rsplit("-", 1)[0] + "-0%"


def plot(rows, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    loads = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(1, len(loads), figsize=(4.5 * len(loads), 4.5))
    for ax, load in zip(axes, loads):
        sel = [r for r in rows if r["workload"] == load]
        names = [r["model"] for r in sel]
        y = range(len(sel))
        ax.barh([i + 0.2 for i in y], [r["stock_tok_s"] for r in sel], height=0.4, label="stock")
        ax.barh([i - 0.2 for i in y], [r["fused_tok_s"] for r in sel], height=0.4, label="accelerate_")
        ax.set_yticks(list(y), names, fontsize=7)
        ax.set_xscale("log")
        ax.set_title(f"{load} (tokens/s)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="32 decode steps, no SmolLM2 (for a short GPU slot)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--only", choices=("smollm2", "layers"), default=None, help="one of the two model groups")
    args = p.parse_args()
    device = args.device
    measure = _timer(device, args.repeats)
    layer_dtype = torch.bfloat16 if device == "cuda" or cpu_bf16_flag() else torch.float32
    groups = {} if args.quick or args.only == "layers" else \
        {k: (m, False, None) for k, m in smollm2_models(device).items()}
    if args.only != "smollm2":
        groups.update({k: (m, True, kept) for k, (m, kept) in layer_models(device, layer_dtype).items()})
    rows, shares = [], []
    for name, (model, hidden_input, kept) in groups.items():
        for load, (fn, tokens) in workloads(model, device, hidden_input, args.quick).items():
            amp.accelerate_(model, enable=False)
            stock = measure(fn)["median"]
            amp.accelerate_(model)
            fused = measure(fn)["median"]
            amp.accelerate_(model, enable=False)
            rows.append({"model": name, "workload": load, "dtype": str(next(model.parameters()).dtype)[6:],
                         "stock_tok_s": tokens / stock, "fused_tok_s": tokens / fused, "fused_over_stock": stock / fused})
            print(f"{name:22s} {load:13s} stock {tokens / stock:10.1f} tok/s  fused {tokens / fused:10.1f} tok/s  "
                  f"x{stock / fused:.2f}", flush=True)
        if not hidden_input:
            share = time_share(model, device)
            shares.append({"model": name, **{k: round(v, 3) for k, v in share.items()}})
    for row in rows:  # speed relative to the dense model of the same family, same path
        base = next(r for r in rows if r["workload"] == row["workload"] and
                    r["model"] == _dense_name(row["model"]))
        row["stock_over_dense"] = row["stock_tok_s"] / base["stock_tok_s"]
        row["fused_over_dense"] = row["fused_tok_s"] / base["fused_tok_s"]
    summary = [f"Device {device}; SmolLM2 in float32, single layers in {str(layer_dtype)[6:]}; medians of "
               f"{args.repeats if device == 'cpu' else 'do_bench'}; ratios are from the same run."]
    for s in shares:
        summary.append(f"Time share of a 512-token prefill, {s['model']} (stock): attention {s['attention']:.0%}, "
                       f"MLP {s['mlp']:.0%}, rest (embeddings, norms, lm_head) {s['rest']:.0%}.")
    out = Path(args.out)
    record("bench_infer", rows, summary, out)
    if shares:
        record("bench_infer_time_share", shares, None, out)
    if device == "cuda":
        record("bench_infer_kernels", kernel_rows(device), None, out)
    try:
        plot(rows, out / f"bench_infer_{device}.png")
    except ImportError:
        print("matplotlib is missing: no plot (pip install matplotlib)")
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()

"""Kernel micro-benchmarks on the real shapes of LLaMA-2-7B, LLaMA-3-8B and SmolLM2.

(1) head_norms: fused kernel vs the naive einsum + abs + sum (what the paper's hooks do) vs a plain matmul of
    the same size (x @ W_o^T, the floor); (2) swiglu with statistics: fused vs unfused torch, and (GPU only) the gate/up matmuls fused in too against
    cuBLAS matmuls + the swiglu kernel; (3) gqa_attention vs SDPA with K/V expanded to every query head; (4) a
    decode step at 1k / 8k / 32k cached tokens: the grouped decode kernel (each KV head's cache read once) vs the
    per-query-head kernel it replaced vs SDPA, with the bytes each reads from the cache.
GPU: triton.testing.do_bench, peak CUDA memory above the inputs. CPU: the twins (the engine's CPU path) against
the naive path, with peak resident memory above the inputs (Linux VmHWM, reset before each call).
    python -m benchmarks.bench_kernels [--tokens 2048,8192,16384] [--models smollm2,llama2-7b,llama3-8b]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import amp_kernels
from amp_kernels import reference
from benchmarks.harness import RESULTS, gpu_ms, record, timed

MODELS = {  # hidden, query heads, kv heads, head_dim, intermediate
    "smollm2": (576, 9, 3, 64, 1536),
    "llama2-7b": (4096, 32, 32, 128, 11008),
    "llama3-8b": (4096, 32, 8, 128, 14336),
}
CUDA = torch.cuda.is_available()


def _peak_extra_mb(fn) -> float:
    """Peak memory fn() needs beyond what is already allocated."""
    if CUDA:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    fn()
    return max(0.0, (_status_kb("VmHWM") - base) / 1024)


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _time(fn, repeats):
    if CUDA:
        return gpu_ms(fn)["median"]
    return timed(fn, warmup=1, repeats=repeats)["median"]


def bench_head_norms(name, tokens, dtype, repeats):
    hidden, hq, _, d, _ = MODELS[name]
    dev = "cuda" if CUDA else "cpu"
    x = torch.randn(tokens, hq * d, device=dev, dtype=dtype)
    w = torch.randn(hidden, hq * d, device=dev, dtype=dtype) * 0.02
    fused = (lambda: amp_kernels.head_norms(x, w, hq)) if CUDA else (lambda: reference.head_norms(x, w, hq))
    naive = lambda: torch.einsum("thd,ohd->tho", x.view(tokens, hq, d), w.view(hidden, hq, d)).abs().sum(dim=(0, 2))
    matmul = lambda: x @ w.T
    rows = []
    t_matmul = _time(matmul, repeats)
    for label, fn in (("fused" if CUDA else "twin (chunked)", fused), ("naive einsum", naive), ("matmul", matmul)):
        t = t_matmul if label == "matmul" else _time(fn, repeats)
        rows.append({"op": "head_norms", "model": name, "tokens": tokens, "dtype": str(dtype).split(".")[-1],
                     "impl": label, "ms": t * 1e3, "peak_extra_mb": _peak_extra_mb(fn),
                     "vs_matmul_throughput": t_matmul / t})
    return rows


def bench_swiglu(name, tokens, dtype, repeats):
    inter = MODELS[name][4]
    dev = "cuda" if CUDA else "cpu"
    g = torch.randn(tokens, inter, device=dev, dtype=dtype)
    u = torch.randn(tokens, inter, device=dev, dtype=dtype)
    stats = torch.zeros(inter, device=dev, dtype=torch.float32)
    fused = (lambda: amp_kernels.swiglu(g, u, stats)) if CUDA else (lambda: reference.swiglu(g, u, stats))

    def unfused():
        a = F.silu(g) * u
        stats.add_(a.abs().float().sum(dim=0))
        return a
    rows = []
    for label, fn in (("fused" if CUDA else "twin", fused), ("unfused torch", unfused)):
        rows.append({"op": "swiglu+stats", "model": name, "tokens": tokens, "dtype": str(dtype).split(".")[-1],
                     "impl": label, "ms": _time(fn, repeats) * 1e3, "peak_extra_mb": _peak_extra_mb(fn)})
    return rows


def bench_swiglu_matmul(name, tokens, dtype, repeats):
    """Does fusing the gate/up matmuls into the activation pay off? Only a GPU can say (the CPU has no kernel)."""
    hidden, _, _, _, inter = MODELS[name]
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    wg = torch.randn(inter, hidden, device="cuda", dtype=dtype) * 0.02
    wu = torch.randn(inter, hidden, device="cuda", dtype=dtype) * 0.02
    stats = torch.zeros(inter, device="cuda", dtype=torch.float32)
    fused = lambda: amp_kernels.swiglu_matmul(x, wg, wu, stats)
    unfused = lambda: amp_kernels.swiglu(x @ wg.T, x @ wu.T, stats)
    rows = []
    for label, fn in (("fused gate/up matmuls", fused), ("cuBLAS matmuls + swiglu kernel", unfused)):
        rows.append({"op": "swiglu_matmul", "model": name, "tokens": tokens, "dtype": str(dtype).split(".")[-1],
                     "impl": label, "ms": _time(fn, repeats) * 1e3, "peak_extra_mb": _peak_extra_mb(fn)})
    return rows


def bench_attention(name, tokens, dtype, repeats):
    _, hq, hkv, d, _ = MODELS[name]
    dev = "cuda" if CUDA else "cpu"
    q = torch.randn(1, hq, tokens, d, device=dev, dtype=dtype)
    k = torch.randn(1, hkv, tokens, d, device=dev, dtype=dtype)
    v = torch.randn(1, hkv, tokens, d, device=dev, dtype=dtype)
    hmap = torch.arange(hq, device=dev) // (hq // hkv)
    ours = (lambda: amp_kernels.gqa_attention(q, k, v, hmap)) if CUDA else \
        (lambda: reference.gqa_attention(q, k, v, hmap))
    sdpa = lambda: F.scaled_dot_product_attention(q, k.index_select(1, hmap), v.index_select(1, hmap), is_causal=True)
    rows = []
    for label, fn in (("gqa_attention" if CUDA else "twin", ours), ("sdpa, expanded K/V", sdpa)):
        rows.append({"op": "attention", "model": name, "tokens": tokens, "dtype": str(dtype).split(".")[-1],
                     "impl": label, "ms": _time(fn, repeats) * 1e3, "peak_extra_mb": _peak_extra_mb(fn)})
    return rows


def bench_decode(name, cache, dtype, repeats):
    """One decode step (T = 1) against `cache` cached tokens: the grouped decode kernel (each KV head's cache read
    once) vs the per-query-head kernel it replaced vs SDPA on expanded K/V; bytes read from the cache beside."""
    from amp_kernels.triton_gqa_attention import gqa_attention_triton
    from amp_kernels.triton_gqa_decode import decode_bytes, gqa_decode_triton
    _, hq, hkv, d, _ = MODELS[name]
    dev = "cuda" if CUDA else "cpu"
    q = torch.randn(1, hq, 1, d, device=dev, dtype=dtype)
    k = torch.randn(1, hkv, cache, d, device=dev, dtype=dtype)
    v = torch.randn(1, hkv, cache, d, device=dev, dtype=dtype)
    hmap = torch.arange(hq, device=dev) // (hq // hkv)
    groups = amp_kernels.decode_groups(hmap, hkv).to(dev)
    elt = torch.empty((), dtype=dtype).element_size()
    nbytes = decode_bytes(1, hq, hkv, 1, cache, d, elt)
    impls = [("sdpa, expanded K/V", lambda: F.scaled_dot_product_attention(q, k.index_select(1, hmap),
                                                                           v.index_select(1, hmap)),
              nbytes["minimum"] + 2 * nbytes["per_query_head"])]
    if CUDA:
        impls = [("grouped decode kernel", lambda: gqa_decode_triton(q, k, v, groups), nbytes["grouped"]),
                 ("per-query-head kernel", lambda: gqa_attention_triton(q, k, v, hmap), nbytes["per_query_head"])
                 ] + impls
    else:
        impls = [("twin", lambda: reference.gqa_attention(q, k, v, hmap), nbytes["per_query_head"])] + impls
    return [{"op": "decode", "model": name, "tokens": cache, "dtype": str(dtype).split(".")[-1], "impl": label,
             "ms": _time(fn, repeats) * 1e3, "peak_extra_mb": _peak_extra_mb(fn), "cache_mb_read": b / 1e6,
             "cache_mb_minimum": nbytes["minimum"] / 1e6} for label, fn, b in impls]


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    ops = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        for (model, impl) in sorted({(r["model"], r["impl"]) for r in rows if r["op"] == op}):
            pts = sorted((r["tokens"], r["ms"]) for r in rows if r["op"] == op and r["model"] == model
                         and r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model}: {impl}")
        ax.set(title=op, xlabel="tokens", ylabel="ms (median)", xscale="log", yscale="log")
        ax.legend(fontsize=6)
    fig.suptitle(f"AMP kernels on {'GPU: ' + torch.cuda.get_device_name() if CUDA else 'CPU (twins)'}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="2048,8192,16384" if CUDA else "1024,2048,4096")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--dtype", default="bfloat16" if CUDA else "float32")
    p.add_argument("--repeats", type=int, default=3 if CUDA else 5)
    p.add_argument("--ops", default="head_norms,swiglu,swiglu_matmul,attention,decode" if CUDA else
                   "head_norms,swiglu,attention")
    p.add_argument("--caches", default="1024,8192,32768", help="cached tokens of the decode benchmark")
    p.add_argument("--out", default=os.environ.get("OUT") or str(RESULTS), help="results folder")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    benches = {"head_norms": bench_head_norms, "swiglu": bench_swiglu, "swiglu_matmul": bench_swiglu_matmul,
               "attention": bench_attention, "decode": bench_decode}
    rows = []
    torch.manual_seed(0)
    for op in args.ops.split(","):
        for model in args.models.split(","):
            for tokens in map(int, (args.caches if op == "decode" else args.tokens).split(",")):
                new = benches[op](model, tokens, dtype, args.repeats)
                for r in new:
                    print(f"{r['op']:<13} {r['model']:<10} {r['tokens']:>6} {r['impl']:<20} {r['ms']:10.3f} ms "
                          f"peak +{r['peak_extra_mb']:9.1f} MB")
                rows.extend(new)
    for r in rows:
        r.setdefault("vs_matmul_throughput", "")
    out = Path(args.out)
    summary = _summary(rows)
    record("bench_kernels", rows, summary, results_dir=out)
    plot(rows, out / ("bench_kernels_gpu.png" if CUDA else "bench_kernels_cpu.png"))
    print("\n".join(summary))


def _summary(rows):
    lines = [] if CUDA else [
        "CPU: the engine's CPU path is the twins, so these compare twin and naive path, not Triton kernels. Peak "
        "extra memory is the growth of the resident set (VmHWM), which misses memory the allocator reuses: figures "
        "under ~100 MB are unreliable. Times are medians on a shared 2-core machine; compare within a row only."]
    key = lambda r: (r["op"], r["model"], r["tokens"])
    groups = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["impl"]] = r
    for (op, model, tokens), g in sorted(groups.items()):
        impls = list(g)
        ours, other = g[impls[0]], g[impls[1]]
        line = (f"{op} {model} {tokens} tokens: {impls[0]} is {other['ms'] / ours['ms']:.2f}x the speed of "
                f"{impls[1]}, extra memory {ours['peak_extra_mb']:.1f} MB vs {other['peak_extra_mb']:.1f} MB")
        if "matmul" in g:
            line += f"; {g['matmul']['ms'] / ours['ms']:.2f}x the throughput of the same-size matmul"
        lines.append(line)
        if op == "decode":  # arithmetic, the same on any machine: what each kernel reads from the cache per step
            from amp_kernels.triton_gqa_decode import decode_bytes
            _, hq, hkv, d, _ = MODELS[model]
            b = decode_bytes(1, hq, hkv, 1, tokens, d, 2)
            lines.append(f"decode {model} {tokens} tokens, bf16 cache bytes per step: minimum (the cache once) "
                         f"{b['minimum'] / 1e6:.1f} MB; grouped decode kernel {b['grouped'] / 1e6:.1f} MB "
                         f"({b['grouped'] / b['minimum']:.0f}x the minimum); per-query-head kernel "
                         f"{b['per_query_head'] / 1e6:.1f} MB ({b['per_query_head'] / b['minimum']:.0f}x)")
    return lines


if __name__ == "__main__":
    main()

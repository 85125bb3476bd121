"""What `--multiple-of N` changes in a pruned model's shapes and speed, in two parts:

- smollm2: SmolLM2 pruned at 20 % (uniform) with N = 1, 64 and 128, the kept widths per layer, the achieved
  ratio, and prefill / decode time against N = 1 measured in the same run (interleaved repeats). The shapes only
  need the scores, so this prune uses a small calibration (16 Alpaca prompts, no refit): the widths the rounding
  leaves are what is timed, not the quality of the weights (benchmarks.quality measures that: recipes mult64,
  mult128).
- compiled: the MLP kernels at LLaMA-2-7B and LLaMA-3-8B widths kept at 20 % (80 % of the intermediate, and the
  nearest multiple of 64 and of 128) compiled for sm_80 and sm_90a as the launchers would launch them
  (amp_kernels.compiled): tiles launched and the share of their width left idle, registers, occupancy, and the
  global loads and stores that move 16 bytes per thread against narrower ones. With `--device cuda` each kernel
  and the stock down projection (cuBLAS) are also timed at every width (triton.testing.do_bench).

    python -m benchmarks.bench_multiple_of [--parts smollm2,compiled] [--multiples 1,64,128] [--ratio 0.2]
                                           [--repeats 5] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import RESULTS, record


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


COMPILED_FAMILIES = ("LLaMA-2-7B", "LLaMA-3-8B")   # shapes from amp_kernels.compiled.FAMILIES
# the workloads of amp_kernels.compiled whose tensors are as wide as the kept MLP width
MLP_KERNELS = ("swiglu+stats", "swiglu", "swiglu_matmul")


def kept_width(intermediate: int, ratio: float, multiple: int) -> int:
    """The width a uniform prune at `ratio` keeps, rounded to the nearest multiple (the shapes compiled here)."""
    width = round(intermediate * (1 - ratio))
    return max(multiple, round(width / multiple) * multiple)


def _mlp_workloads(family: str, width: int) -> list[tuple[str, object, tuple]]:
    """(kernel, launcher, meta-tensor args) of the MLP kernels at `width`: the compile check's own workloads."""
    from amp_kernels import compiled
    return [(name, launcher, args) for name, launcher, args, _ in compiled.workloads(family, torch.bfloat16, width)
            if name in MLP_KERNELS]


def compiled_rows(ratio: float, multiples: list[int], device: str) -> list[dict]:
    from amp_kernels import compiled
    rows = []
    for family in COMPILED_FAMILIES:
        intermediate = compiled.FAMILIES[family][4]
        for n in multiples:
            width = kept_width(intermediate, ratio, n)
            for kernel, launcher, args in _mlp_workloads(family, width):
                for arch in compiled.ARCHS:
                    launch = compiled.capture(arch, launcher, *args)[0]
                    built = compiled.compile_launch(launch, arch)
                    res = compiled.resources(built, arch)
                    block = int(launch.kwargs.get("BLOCK_I", width))
                    tiles = -(-width // block)
                    rows.append({"family": family, "multiple_of": n, "width": width, "kernel": kernel,
                                 "dtype": "bf16", "arch": f"sm_{arch}a" if arch == 90 else f"sm_{arch}",
                                 "block_width": block, "tiles_across_width": tiles,
                                 "idle_share_of_tiles": round(1 - width / (tiles * block), 4),
                                 "registers": res["registers"], "spills": res["spill_stores"] + res["spill_loads"],
                                 "occupancy": res["occupancy"], **compiled.memory_ops(built.asm["ptx"])})
            if device == "cuda":
                rows += _gpu_rows(family, width, n)
    return rows


def _gpu_rows(family: str, width: int, n: int) -> list[dict]:
    """do_bench of each MLP kernel at `width` on the GPU (the same shapes as compiled), and of the stock down
    projection (cuBLAS) that reads the kept width."""
    from triton.testing import do_bench

    from amp_kernels import compiled

    def on_gpu(arg):  # the workloads' meta tensors, made real
        return torch.randn(arg.shape, dtype=arg.dtype, device="cuda") if isinstance(arg, torch.Tensor) else arg
    head = {"family": family, "multiple_of": n, "width": width, "dtype": "bf16", "arch": torch.cuda.get_device_name()}
    out = []
    for kernel, launcher, args in _mlp_workloads(family, width):
        real = tuple(map(on_gpu, args))
        out.append({**head, "kernel": kernel, "time_us": round(1e3 * do_bench(lambda: launcher(*real)), 2)})
    act = torch.randn(compiled.PREFILL, width, dtype=torch.bfloat16, device="cuda")
    w_down = torch.randn(compiled.FAMILIES[family][0], width, dtype=torch.bfloat16, device="cuda")
    out.append({**head, "kernel": "down_proj (cuBLAS)", "time_us": round(1e3 * do_bench(lambda: act @ w_down.t()), 2)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="smollm2,compiled", help="comma list of smollm2, compiled")
    p.add_argument("--multiples", default="1,64,128")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: also time the kernels")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - {"smollm2", "compiled"}:
        p.error(f"--parts: unknown {sorted(parts - {'smollm2', 'compiled'})}")
    multiples = list(map(int, args.multiples.split(",")))
    if "compiled" in parts:
        rows = compiled_rows(args.ratio, multiples, args.device)
        for r in rows:
            print(r)
        summary = [f"MLP kernels at the widths a uniform prune at {args.ratio:.0%} keeps (80 % of the "
                   "intermediate, rounded to the nearest multiple), bf16, compiled for the A100 (sm_80) and H100 "
                   "(sm_90a) as the launchers launch them: loads/stores per thread that move 16 bytes against "
                   "narrower ones (PTX), tiles across the width and the share of their width left idle. An "
                   "estimate of what the width buys, not a time: --device cuda adds do_bench times."]
        record("bench_multiple_of_compiled", rows, summary, Path(args.out))
        print(summary[0])
    if "smollm2" in parts:
        smollm2(args, multiples)
    return 0


def smollm2(args, multiples: list[int]) -> None:
    import amp
    torch.manual_seed(0)
    models = {}
    for n in multiples:
        model, tok, _ = amp.load_model(None, "float32")
        cal = amp.load_calibration(tok, "alpaca", 16, 128, 0)
        report = amp.prune_(model, amp.PruneConfig(ratio=args.ratio, multiple_of=n, compensate="none", criterion="amp",
                                                   sequential=False, calib="alpaca", nsamples=16, seqlen=128,
                                                   allocation="uniform"),
                            cal, progress=False)
        widths = sorted({layer.mlp.down_proj.in_features for layer in model.model.layers})
        heads = sorted({layer.self_attn.o_proj.in_features // layer.self_attn.head_dim
                        for layer in model.model.layers})
        models[n] = (model.eval(), report["ratio_achieved"], widths, heads)
    ids = torch.randint(100, 20000, (1, args.prefill))
    times = {n: {"prefill": [], "decode": []} for n in models}
    with torch.no_grad():
        for _ in range(args.repeats):  # interleaved: the machine's noise falls on every model alike
            for n, (model, *_rest) in models.items():
                times[n]["prefill"] += _time(lambda: model(ids, use_cache=False), 1)
                times[n]["decode"] += _time(lambda: model.generate(ids[:, :16], max_new_tokens=args.decode,
                                                                   min_new_tokens=args.decode, do_sample=False), 1)
    base = {k: statistics.median(v) for k, v in times[min(models)].items()}
    rows = []
    for n, (_, ratio, widths, heads) in models.items():
        med = {k: statistics.median(v) for k, v in times[n].items()}
        rows.append({"model": "SmolLM2-135M", "multiple_of": n, "ratio_achieved": round(ratio, 4),
                     "mlp_widths": "/".join(map(str, widths)), "query_heads": "/".join(map(str, heads)),
                     "mlp_tiles_of_128": "/".join(f"{w / 128:.2f}" for w in widths),
                     "prefill_s": round(med["prefill"], 4), "decode_s": round(med["decode"], 4),
                     "prefill_speed_vs_1": round(base["prefill"] / med["prefill"], 3),
                     "decode_speed_vs_1": round(base["decode"] / med["decode"], 3)})
    for r in rows:
        print(r)
    summary = [f"SmolLM2 at {args.ratio:.0%} (uniform): prefill of {args.prefill} tokens and {args.decode} decode "
               f"steps, fp32 on this CPU, medians of {args.repeats} interleaved repeats; speed relative to "
               "--multiple-of 1 in the same run. CPU GEMMs (oneDNN/MKL) do not tile like GPU kernels: a CPU ratio "
               "near 1 says nothing about the GPU, where the compiled tiles are 64 or 128 wide (docs/kernels.md)."]
    record("bench_multiple_of", rows, summary, Path(args.out))
    print(summary[0])


if __name__ == "__main__":
    sys.exit(main())

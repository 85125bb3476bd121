"""What `--multiple-of N` changes in a pruned model's shapes and its CPU speed: SmolLM2 pruned at 20 % (uniform) with
N = 1, 64 and 128, the kept widths per layer, the achieved ratio, and prefill / decode time against N = 1 measured
in the same run (interleaved repeats). Its quality cost is measured by benchmarks.quality (recipes mult64, mult128).

    python -m benchmarks.bench_multiple_of [--multiples 1,64,128] [--ratio 0.2] [--repeats 5]

The shapes only need the scores, so the prune here uses a small calibration (16 Alpaca prompts, no refit): the
widths the rounding leaves are what is timed, not the quality of the weights.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.harness import RESULTS, record


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main(argv=None) -> int:
    import amp
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--multiples", default="1,64,128")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=32)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    models = {}
    for n in map(int, args.multiples.split(",")):
        model, tok, _ = amp.load_model(None, "float32")
        cal = amp.load_calibration(tok, "alpaca", 16, 128, 0)
        report = amp.prune_(model, amp.PruneConfig(ratio=args.ratio, multiple_of=n, compensate="none",
                                                   sequential=False, calib="alpaca", nsamples=16, seqlen=128),
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
    record("bench_multiple_of", rows, summary, RESULTS)
    print(summary[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())

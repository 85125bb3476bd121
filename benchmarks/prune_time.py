"""The whole prune's time and peak host memory, recipe against recipe in one run: SmolLM2-135M streamed from its
safetensors folder (what `amp prune` does), each prune in a process of its own (so that its peak RSS is its own),
the recipes interleaved repeat by repeat (so that a busy spell of this shared CPU hits every recipe alike); the
ratio of each median to the first recipe's is the figure.

    python -m benchmarks.prune_time [--model smollm2-135m | gemma3-270m] [--recipes amp,obs,kl,kl+obs] [--ratio 0.2]
        [--repeats 2]

A recipe is a '+'-list of changes to the previous default, `amp` (uniform allocation of AMP scores; 64 C4 windows,
sequential statistics, refit): obs (--criterion obs), kl (--allocation kl), depth, query; `default` is whatever
PruneConfig's defaults are now (--allocation auto: the kl candidate and the paper's, the better kept).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

STEPS = {"obs": {"criterion": "obs"}, "kl": {"allocation": "kl"}, "depth": {"allocation": "depth"},
         "query": {"heads": "query"}}


def fields(recipe: str) -> dict:
    if recipe == "default":
        return {}
    out = {"criterion": "amp", "allocation": "uniform"}  # the previous default, every step from it
    for step in recipe.split("+"):
        if step != "amp":
            out.update(STEPS[step])
    return out


def worker(recipe: str, ratio: float, model: str) -> dict:
    import amp
    from benchmarks import zoo
    path = str(zoo.path(model))
    amp.load_model(path)  # a GGUF is dequantized into the cache once, outside the timed prune
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = amp.prune_checkpoint(path, amp.PruneConfig(ratio=ratio, **fields(recipe)), f"{tmp}/out",
                                      progress=False)
        seconds = time.perf_counter() - start
    layer_bytes = max(report["memory"]["checkpoint_bytes"] / len(report["layers"]), 1)
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "phases": {k: v["seconds"] for k, v in report["phases"].items()},
            "ratio_achieved": report["ratio_achieved"], "layer_mb": layer_bytes / 2**20,
            "heldout_kl": report["allocation"].get("heldout_kl"),
            "kept": report.get("selection", {}).get("kept", "")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="amp,obs,kl,kl+obs")
    p.add_argument("--model", default="smollm2-135m", help="a zoo model (benchmarks/zoo)")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.ratio, args.model)))
        return
    from benchmarks.harness import record
    recipes = args.recipes.split(",")
    runs = {r: [] for r in recipes}
    for _ in range(args.repeats):
        for r in recipes:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.prune_time", "--worker", r, "--ratio",
                                   str(args.ratio), "--model", args.model], capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(proc.stderr[-3000:])
            runs[r].append(json.loads(line[7:]))
            print(r, f"{runs[r][-1]['seconds']:.0f} s", flush=True)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    base = median([x["seconds"] for x in runs[recipes[0]]])
    rows = []
    for r in recipes:
        secs = [x["seconds"] for x in runs[r]]
        rows.append({"recipe": r, "seconds_median": round(median(secs), 1), "seconds_min": round(min(secs), 1),
                     "seconds_max": round(max(secs), 1), "over_first": round(median(secs) / base, 2),
                     "peak_rss_mb": round(max(x["peak_rss_mb"] for x in runs[r])),
                     "ratio_achieved": round(runs[r][0]["ratio_achieved"], 4),
                     "heldout_kl": (runs[r][0]["heldout_kl"] or {}).get("measured", ""),
                     "kept": runs[r][0]["kept"], "model": args.model})
    record("prune_time", rows, [
        f"{args.model} streamed from its safetensors folder (a GGUF dequantized into the cache first), --ratio {args.ratio}, {args.repeats} interleaved repeats "
        f"per recipe, each prune in its own process; over_first = median time over the first recipe's ({recipes[0]}), "
        f"same run. peak_rss_mb: the whole process (Python, torch and the calibration store included); one decoder "
        f"layer is about {runs[recipes[0]][0]['layer_mb']:.0f} MB in its stored dtype."])
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()

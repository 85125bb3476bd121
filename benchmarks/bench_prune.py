"""Wall time and peak memory of pruning SmolLM2-135M (default 20 %), phase by phase, beside a plain batched
forward pass over the same calibration tokens and beside the paper's reference way of scoring (one prompt at
a time, hooks that materialize every head's projected output).

Each measurement runs in its own process so that its peak resident memory is its own.
    python -m benchmarks.bench_prune [--ratio 0.2] [--nsamples 128] [--repeats 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(args):
    from amp.io import calibration as data, models
    start = time.perf_counter()
    model, tokenizer, _ = models.load_model(None, args.dtype)
    load_s = time.perf_counter() - start
    args.load_rss_mb = _rss_mb()
    calib = data.load_calibration(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed, args.data_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return model.to(args.device) if args.worker != "prune" else model, tokenizer, calib, pad, load_s


def worker_prune(args) -> dict:
    from amp import PruneConfig, prune_
    from amp.io.folders import save_pruned
    from amp.common.profiling import PhaseTimer
    model, tokenizer, calib, pad, load_s = _setup(args)
    config = PruneConfig(ratio=args.ratio, criterion="amp", allocation="uniform", nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size,
                         device=args.device, dtype=args.dtype)
    runs = []
    for i in range(args.warmup + args.repeats):
        victim = copy.deepcopy(model)
        timer = PhaseTimer(args.device)
        report = prune_(victim, config, calib, timer=timer, progress=False, pad_id=pad)
        if i >= args.warmup:
            runs.append({k: v["seconds"] for k, v in timer.report().items()})
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        save_pruned(victim, tokenizer, report, f"{tmp}/out")
        save_s = time.perf_counter() - start
    med = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
    cs = sorted(r["calibrate"] + r.get("score", 0.0) for r in runs)  # scores are computed inside calibrate now
    return {"load_s": load_s, "load_rss_mb": args.load_rss_mb, **{f"{k}_s": v for k, v in med.items()}, "save_s": save_s,
            "calibrate_score_s": cs[len(cs) // 2], "calibrate_score_min_s": cs[0], "calibrate_score_max_s": cs[-1],
            "ratio_achieved": report["ratio_achieved"], "tokens": calib.num_tokens,
            "phase_peak_rss_mb": {k: v["peak_rss_mb"] for k, v in timer.report().items()}, "peak_rss_mb": _rss_mb()}


@torch.no_grad()
def worker_forward(args) -> dict:
    from amp.io.calibration import make_batches
    from benchmarks.harness import timed
    model, _, calib, pad, _ = _setup(args)
    batches = [(i.to(args.device), m.to(args.device)) for i, m in make_batches(calib.samples, args.batch_size, pad)]
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    t = timed(lambda: [model(input_ids=i, attention_mask=m, use_cache=False) for i, m in batches],
              warmup=args.warmup, repeats=args.repeats, sync=sync)
    return {"forward_s": t["median"], "forward_min_s": t["min"], "forward_max_s": t["max"], "peak_rss_mb": _rss_mb()}


@torch.no_grad()
def worker_paper(args) -> dict:
    """The reference way: one prompt at a time through the whole model, each o_proj hook materializing
    (tokens, heads, hidden) with an einsum before reducing it."""
    from benchmarks.harness import timed
    model, _, calib, _, _ = _setup(args)
    cfg = model.config
    heads, d = cfg.num_attention_heads, cfg.head_dim
    scores = {}

    def o_hook(i, module, inputs):
        x = inputs[0][0].float().view(-1, heads, d)
        proj = torch.einsum("thd,ohd->tho", x, module.weight.float().view(-1, heads, d))
        scores[("h", i)] = scores.get(("h", i), 0) + proj.abs().sum(-1).sum(0)

    def down_hook(i, module, inputs):
        scores[("n", i)] = scores.get(("n", i), 0) + inputs[0][0].float().abs().sum(0)

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: o_hook(i, m, a))
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: down_hook(i, m, a))
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    samples = [s.to(args.device)[None] for s in calib.samples]
    t = timed(lambda: [model(input_ids=s, use_cache=False) for s in samples], warmup=args.warmup,
              repeats=args.repeats, sync=sync)
    return {"paper_s": t["median"], "paper_min_s": t["min"], "paper_max_s": t["max"], "peak_rss_mb": _rss_mb()}


def run_worker(kind: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_prune", "--worker", kind, *argv],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--calib", default="alpaca")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--worker", choices=["prune", "forward", "paper"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        fn = {"prune": worker_prune, "forward": worker_forward, "paper": worker_paper}[args.worker]
        print(json.dumps(fn(args)))
        return
    argv = [a for a in sys.argv[1:]]
    from amp.io.models import default_model_dir
    default_model_dir()  # build the cache once, outside every measurement
    # Alternate the kinds, so that a noisy neighbour on this shared machine hits them alike.
    prune, forward, paper = (run_worker(k, argv) for k in ("prune", "forward", "paper"))
    cs_over_fwd = prune["calibrate_score_s"] / forward["forward_s"]
    paper_over_fwd = paper["paper_s"] / forward["forward_s"]
    rows = [
        {"what": "load (safetensors cache)", "seconds": prune["load_s"], "peak_rss_mb": prune["load_rss_mb"]},
        {"what": "calibrate + score (layer-wise, fused head norms)", "seconds": prune["calibrate_s"],
         "peak_rss_mb": prune["phase_peak_rss_mb"]["calibrate"]},
        {"what": "slice", "seconds": prune["slice_s"], "peak_rss_mb": prune["phase_peak_rss_mb"]["slice"]},
        {"what": "save", "seconds": prune["save_s"], "peak_rss_mb": prune["peak_rss_mb"]},
        {"what": "calibrate + score", "seconds": prune["calibrate_score_s"], "peak_rss_mb": prune["peak_rss_mb"]},
        {"what": "plain batched forward, same tokens", "seconds": forward["forward_s"],
         "peak_rss_mb": forward["peak_rss_mb"]},
        {"what": "paper reference scoring (per prompt, materialized heads)", "seconds": paper["paper_s"],
         "peak_rss_mb": paper["peak_rss_mb"]},
    ]
    summary = [f"SmolLM2-135M-Instruct at ratio {args.ratio} (achieved {prune['ratio_achieved']:.4f}), "
               f"{args.nsamples} {args.calib} samples = {prune['tokens']} tokens, batch {args.batch_size}, "
               f"device {args.device}, {args.dtype}; medians of {args.repeats} runs after {args.warmup} warm-up.",
               f"(calibrate + score) / plain forward = {cs_over_fwd:.3f} (target <= 1.2 on CPU; "
               f"min-max calibrate+score {prune['calibrate_score_min_s']:.3f}-{prune['calibrate_score_max_s']:.3f} s, "
               f"forward {forward['forward_min_s']:.3f}-{forward['forward_max_s']:.3f} s)",
               f"paper reference scoring / plain forward = {paper_over_fwd:.3f}; "
               f"paper reference / (calibrate + score) = {paper['paper_s'] / prune['calibrate_score_s']:.3f}",
               "peak_rss_mb: the process's peak resident memory up to the end of that phase (each kind in its own "
               "process; the prune process also holds the dense model it deep-copies for each repeat)."]
    from benchmarks.harness import record
    record("bench_prune", rows, summary)
    for r in rows:
        print(f"{r['what']:<58} {r['seconds']:8.3f} s  peak RSS {r['peak_rss_mb']:8.1f} MB")
    print("\n".join(summary))


if __name__ == "__main__":
    main()

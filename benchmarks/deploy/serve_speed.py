"""Served speed of pruned models against their dense original, measured so that the figures hold: each model runs
in a fresh process of its runtime (vLLM does not free a model deleted in its process, and one process timing two
models times the second against the first one's leftovers), dense and pruned alternate (the order flips every
repeat, so drift on a shared machine falls on both), every pair is repeated, and the figure is the median of the
paired ratios with their spread.

- vLLM (its CPU build, fp32, eager): a batch of 16 prompts x 64 new tokens, tokens/s of the whole generate call
  (after a warm-up call); per-layer results through the amp-vllm plugin's export.
- llama.cpp (llama-cpp-python): one stream, 4 prompts x 64 new tokens; decode tokens/s (prompt evaluation timed
  apart), for the f16 export and the quantized ones; the quantized files' greedy continuations against the f16
  file's of the same model (identical tokens before the first difference).

    python -m benchmarks.deploy.serve_speed [--models smollm2-135m,gemma3-270m] [--recipes default,paper]
        [--ratio 0.2] [--runtimes vllm,llamacpp] [--gguf f16,q8_0,q4_k_m] [--repeats 3] [--work DIR] [--no-record]

Run it alone: every process here uses every core.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import zoo
from benchmarks.harness import record
from benchmarks.serve_check import install

RECIPES = {"default": {}, "paper": {"criterion": "amp", "allocation": "uniform"}}
VLLM_PROMPTS, LLAMA_PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 16, 4, 32, 64

VLLM_TIME = r"""
import json, os, sys, time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from vllm import LLM, SamplingParams
job = json.loads(sys.argv[1])
llm = LLM(model=job["path"], dtype="float32", max_model_len=512, enforce_eager=True)
prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True)
llm.generate(prompts[:2], params, use_tqdm=False)
start = time.perf_counter()
out = llm.generate(prompts, params, use_tqdm=False)
seconds = time.perf_counter() - start
tokens = sum(len(o.outputs[0].token_ids) for o in out)
print("RESULT " + json.dumps({"tokens_per_s": tokens / seconds, "seconds": seconds}))
"""

LLAMA_TIME = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
job = json.loads(sys.argv[1])
llm = Llama(model_path=job["path"], n_ctx=512, verbose=False, n_threads=job["threads"])
llm.eval(job["prompts"][0][:8])  # warm-up
prefill = decode = 0.0
n = 0
greedy = []
for ids in job["prompts"]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    seq = []
    for _ in range(job["new_tokens"]):
        seq.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([seq[-1]])
        n += 1
    prefill += t1 - t0
    decode += time.perf_counter() - t1
    greedy.append(seq)
print("RESULT " + json.dumps({"tokens_per_s": n / decode, "greedy": greedy,
                              "prefill_tokens_per_s": sum(len(p) for p in job["prompts"]) / prefill}))
"""


def _prompts(tokenizer, data_dir: Path, n: int) -> list[list[int]]:
    """The first `n` WikiText-2 paragraphs of at least PROMPT_TOKENS tokens, cut to PROMPT_TOKENS."""
    out = []
    for line in (data_dir / "text" / "wikitext2_test.txt").read_text().splitlines():
        ids = tokenizer(line.strip(), add_special_tokens=False)["input_ids"]
        if len(ids) >= PROMPT_TOKENS:
            out.append(ids[:PROMPT_TOKENS])
        if len(out) == n:
            return out
    raise SystemExit("error: too few WikiText-2 paragraphs for the prompts")


def _timed(runtime: str, path: str, prompts, python: str) -> dict:
    """One model in a fresh process of its runtime."""
    code = VLLM_TIME if runtime == "vllm" else LLAMA_TIME
    job = {"path": path, "prompts": prompts, "new_tokens": NEW_TOKENS, "threads": os.cpu_count() or 2}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([python, "-c", code, json.dumps(job)], capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{runtime} failed on {path}:\n{(proc.stderr or proc.stdout)[-3000:]}")
    return json.loads(line[len("RESULT "):])


def _build(name: str, recipes: list[str], ratio: float, gguf_types: list[str], runtimes: list[str], work: Path,
           data_dir) -> dict:
    """{label: {variant: path}} for the dense model and each recipe: the vLLM export and each GGUF type."""
    import amp
    from amp.io.models import gguf_folder
    dense = gguf_folder(zoo.path(name))
    folders = {"dense": dense}
    for recipe in recipes:
        out = work / f"{name}-{recipe}-{ratio}"
        if not (out / "amp_report.json").is_file():
            amp.prune_checkpoint(str(dense), amp.PruneConfig(ratio=ratio, **RECIPES[recipe]), out, data_dir=data_dir,
                                 progress=True, overwrite=True)
        folders[recipe] = out
    built = {}
    for label, folder in folders.items():
        variants = {}
        if "vllm" in runtimes:
            target = work / f"{name}-{label}-vllm"
            if not (target / "export_report.json").is_file():
                amp.export_checkpoint(folder, "vllm", target, overwrite=True, progress=False)
            variants["vllm"] = str(target)
        if "llamacpp" in runtimes:
            for t in gguf_types:
                target = work / f"{name}-{label}-{t}"
                if not (target / "export_report.json").is_file():
                    amp.export_checkpoint(folder, "gguf", target, dtype=t, overwrite=True, progress=False)
                variants[f"llamacpp-{t}"] = str(target / "model.gguf")
        built[label] = variants
    return {"folders": {k: str(v) for k, v in folders.items()}, "variants": built, "dense": dense}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--recipes", default="default,paper")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--runtimes", default="vllm,llamacpp")
    p.add_argument("--gguf", default="f16,q8_0,q4_k_m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default=None, help="keep (and reuse) the pruned models and exports here")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    from amp.io.models import load_tokenizer
    from amp.io.calibration import default_data_dir
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    runtimes = args.runtimes.split(",")
    pythons = {r: str(install(r)) for r in runtimes}
    if "vllm" in runtimes:
        from amp.common.vllm_plugin import ensure_installed
        ensure_installed(pythons["vllm"])
    work = Path(args.work or tempfile.mkdtemp(prefix="amp-serve-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    recipes = args.recipes.split(",")
    rows, agreement = [], []
    for name in args.models.split(","):
        built = _build(name, recipes, args.ratio, args.gguf.split(","), runtimes, work, data_dir)
        tokenizer = load_tokenizer(built["dense"])
        greedy = {}
        for variant in built["variants"]["dense"]:
            runtime = variant.split("-")[0]
            prompts = _prompts(tokenizer, data_dir, VLLM_PROMPTS if runtime == "vllm" else LLAMA_PROMPTS)
            for recipe in recipes:
                pair = {"dense": built["variants"]["dense"][variant], recipe: built["variants"][recipe][variant]}
                speeds = {"dense": [], recipe: []}
                for rep in range(args.repeats):
                    order = ["dense", recipe] if rep % 2 == 0 else [recipe, "dense"]
                    for label in order:
                        speeds[label].append(_timed(runtime, pair[label], prompts, pythons[runtime]))
                ratios = [m["tokens_per_s"] / d["tokens_per_s"] for m, d in zip(speeds[recipe], speeds["dense"])]
                row = {"model": name, "runtime": runtime, "variant": variant, "recipe": recipe, "ratio": args.ratio,
                       "repeats": args.repeats,
                       "dense_tokens_per_s": round(statistics.median(s["tokens_per_s"] for s in speeds["dense"]), 2),
                       "pruned_tokens_per_s": round(statistics.median(s["tokens_per_s"] for s in speeds[recipe]), 2),
                       "speedup_median": round(statistics.median(ratios), 3),
                       "speedup_min": round(min(ratios), 3), "speedup_max": round(max(ratios), 3)}
                if runtime == "llamacpp":
                    row["prefill_speedup_median"] = round(statistics.median(
                        m["prefill_tokens_per_s"] / d["prefill_tokens_per_s"]
                        for m, d in zip(speeds[recipe], speeds["dense"])), 3)
                    for label in ("dense", recipe):
                        greedy[(label, variant)] = speeds[label][0]["greedy"]
                rows.append(row)
                print(json.dumps(row), flush=True)
        for (label, variant), seqs in sorted(greedy.items()):  # quantized against f16, the same model
            if variant == "llamacpp-f16" or (label, "llamacpp-f16") not in greedy:
                continue
            ref = greedy[(label, "llamacpp-f16")]
            prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(seqs, ref)]
            agreement.append({"model": name, "label": label, "variant": variant, "identical_prefix": prefix,
                              "identical": f"{sum(p == NEW_TOKENS for p in prefix)}/{len(prefix)}"})
            print(json.dumps(agreement[-1]), flush=True)
    if not args.no_record:
        summary = [f"{r['model']} {r['recipe']} at {r['ratio']:.0%}, {r['variant']}: {r['speedup_median']:.2f}x dense "
                   f"(median of {r['repeats']} alternated fresh-process pairs, spread {r['speedup_min']:.2f}-"
                   f"{r['speedup_max']:.2f}; dense {r['dense_tokens_per_s']} tokens/s)" for r in rows]
        summary += [f"{a['model']} {a['label']} {a['variant']}: greedy continuations identical to the f16 file's "
                    f"in {a['identical']} prompts; identical tokens before the first difference {a['identical_prefix']}"
                    for a in agreement]
        record("serve_speed", rows, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Streaming vs in-memory pruning of a checkpoint larger than a comfortable share of host memory.

Writes (once, into a cache folder) a synthetic checkpoint with real layer shapes, random bf16 weights and enough
layers to be at least 6 GB on disk, then prunes it at 20 % on this machine, each prune in its own process:
streamed (the default) and in memory (--no-stream). Recorded side by side: peak RSS of the process (the kernel's
own count, ru_maxrss through wait4), wall time per phase and per layer, bytes read and written, and the
checkpoint's size. Shapes (`--shapes`, a comma list):
- llama2-7b: hidden 4096, 32 heads, intermediate 11008, vocab 32000, untied lm_head; 14 layers = 6.2 GB;
- mixtral-8x7b: hidden 4096, 32 / 8 heads, 8 experts of 14336 (top-2), vocab 32000; 2.9 GB a layer, 3 layers;
- qwen3-30b-a3b: hidden 2048, 32 / 4 heads of 128, 128 experts of 768 (top-8), vocab 151936; 1.25 GB a layer,
  5 layers.
The MoE checkpoints store every expert on its own, as Hub checkpoints do (the names transformers 5 writes).

    python -m benchmarks.bench_stream [--shapes llama2-7b] [--layers N] [--nsamples 16] [--seqlen 128]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import RESULTS, record

COMMON = dict(max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=1, pad_token_id=0)
# name -> (config class, model class, sizes, layers for >= 6 GB)
PRESETS = {
    "llama2-7b": ("LlamaConfig", "LlamaForCausalLM",
                  dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       vocab_size=32000), 14),
    "mixtral-8x7b": ("MixtralConfig", "MixtralForCausalLM",
                     dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                          num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, sliding_window=None), 3),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                           num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                           num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936), 5),
}


def synthetic_checkpoint(folder: Path, layers: int, preset: str = "llama2-7b") -> tuple[Path, float | None]:
    """The checkpoint, and the seconds it took to write (None when it was already cached). Written tensor by
    tensor through the engine's shard writer, so generating it needs one tensor of memory."""
    if (folder / "config.json").is_file():
        return folder, None
    import transformers
    from accelerate import init_empty_weights

    from amp.arch import spec_for
    from amp.io.layouts import Layout
    from amp.io.safetensors_io import ShardWriter
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import tiny_tokenizer  # a byte-level tokenizer: ids stay far below the vocabulary

    start = time.perf_counter()
    config_cls, model_cls, sizes, _ = PRESETS[preset]
    config = getattr(transformers, config_cls)(num_hidden_layers=layers, dtype=torch.bfloat16,
                                               architectures=[model_cls], **COMMON, **sizes)
    with init_empty_weights():
        skeleton = getattr(transformers, model_cls)(config)
    names = Layout(spec_for(skeleton))  # experts one by one on disk, as the Hub stores them
    layout = [(disk, shape, torch.bfloat16) for n, p in skeleton.state_dict().items()
              for disk, shape in names.disk(n, tuple(p.shape))]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        writer = ShardWriter(tmp, layout, 2 * 10**9)
        gen = torch.Generator().manual_seed(0)
        for name, shape, dtype in layout:
            if "norm" in name and len(shape) == 1:
                t = torch.ones(shape)
            else:  # std 1/sqrt(fan_in): activations keep their scale through the layers
                t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
            writer.write(name, t.to(dtype))
            del t
        writer.finish()
        config.save_pretrained(tmp)
        from amp.io.layouts import add_legacy_keys
        add_legacy_keys(tmp, spec_for(skeleton))
        tiny_tokenizer().save_pretrained(tmp)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder, time.perf_counter() - start


RECIPES = {"default": [], "paper": ["--criterion", "amp", "--allocation", "uniform"]}  # the paper's: AMP, uniform
# what a large model's prune holds on one 80 GB GPU, projected from the per-layer terms below (bench_stream's note)
PROJECTIONS = {
    "LLaMA-3-70B": dict(layers=80, hidden=8192, heads=64, kv=8, head_dim=128, inter=28672, experts=0, vocab=128256),
    "Llama-4-Scout-109B (16 experts)": dict(layers=48, hidden=5120, heads=40, kv=8, head_dim=128, inter=8192,
                                             experts=16, top_k=2, vocab=202048),  # 1 routed + the shared
    "GLM-4.5-Air-106B (128 experts)": dict(layers=46, hidden=4096, heads=96, kv=8, head_dim=128, inter=1408,
                                            experts=128, top_k=9, vocab=151552),  # 8 routed + the shared
}


def run_prune(folder: Path, out: Path, args, stream: bool, recipe: str = "default") -> dict:
    cmd = [sys.executable, "-m", "amp.cli", "prune", str(folder), "--ratio", str(args.ratio), "--out", str(out),
           "--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--batch-size", "8", "--device", args.device, "--overwrite", "--quiet", *RECIPES[recipe]]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if not stream:
        cmd.append("--no-stream")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prune ({'stream' if stream else 'in memory'}) failed:\n{stderr[-3000:]}")
    report = json.loads((out / "amp_report.json").read_text())
    return {"report": report, "peak_rss_bytes": usage.ru_maxrss * 1024, "wall_s": wall, "stdout": stdout}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama2-7b", help=f"comma list of {', '.join(PRESETS)}")
    p.add_argument("--layers", default=None, help="decoder layers, or a comma list with --recipes (default: the "
                   "preset's, >= 6 GB)")
    p.add_argument("--recipes", default=None, help="comma list of default, paper: each streamed prune of each "
                   "--layers count side by side (peak host RSS, time, memory by pass) instead of stream vs memory")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--calib", default="wikitext2", help="calibration set or text file (never the eval text)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache", default=None, help="where the synthetic checkpoint is kept (default: the AMP cache)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--skip-in-memory", action="store_true", help="only the streamed prune (hosts with little RAM)")
    args = p.parse_args()
    rows, summary = [], []
    for preset in args.shapes.split(","):
        if preset not in PRESETS:
            raise SystemExit(f"unknown --shapes {preset!r}; choose from {', '.join(PRESETS)}")
        more_rows, more_summary = bench_recipes(preset, args) if args.recipes else bench_one(preset, args)
        rows += more_rows
        summary += more_summary
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k, "") for k in keys} for r in rows]
    for line in summary:
        print(line)
    record("bench_stream_recipes" if args.recipes else "bench_stream", rows, summary, Path(args.out))


def bench_one(preset: str, args) -> tuple[list[dict], list[str]]:
    from amp.io.models import cache_dir
    layers = int(args.layers) if args.layers else PRESETS[preset][3]
    folder = Path(args.cache or cache_dir() / "bench") / f"{preset}-shapes-{layers}L-bf16"
    folder, gen_s = synthetic_checkpoint(folder, layers, preset)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    from amp.io.safetensors_io import Checkpoint
    layer_bytes = sum(t.nbytes for n, t in Checkpoint(folder).tensors.items() if n.startswith("model.layers.0."))
    print(f"checkpoint {folder}: {size / 1e9:.2f} GB" +
          (f", written in {gen_s:.0f} s" if gen_s else " (cached)"))
    runs = {}
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        for stream in ([True] if args.skip_in_memory else [True, False]):
            name = "stream" if stream else "in-memory"
            runs[name] = run_prune(folder, Path(tmp) / name, args, stream)
            print(f"{name}: peak RSS {runs[name]['peak_rss_bytes'] / 2**30:.2f} GiB, {runs[name]['wall_s']:.0f} s")
    rows = []
    for name, run in runs.items():
        rep = run["report"]
        row = {"shapes": preset, "path": name, "checkpoint_gb": round(size / 1e9, 3), "layers": layers,
               "peak_rss_gib": round(run["peak_rss_bytes"] / 2**30, 3),
               "peak_rss_over_checkpoint": round(run["peak_rss_bytes"] / size, 3),
               "layer_gb": round(layer_bytes / 1e9, 3), "peak_rss_in_layers": round(run["peak_rss_bytes"] / layer_bytes, 2),
               "wall_s": round(run["wall_s"], 1),
               "s_per_layer": round(sum(v["seconds"] for k, v in rep["phases"].items()
                                        if k in ("load", "calibrate", "compensate", "slice", "write")) / layers, 1),
               "read_gb": round(rep["memory"]["bytes_read"] / 1e9, 3),
               "written_gb": round(rep["memory"]["bytes_written"] / 1e9, 3),
               "ratio_achieved": round(rep["ratio_achieved"], 4),
               "computed_in": rep["dtype"]["computed"], "offload": (rep["memory"]["offload"] or {}).get("where")}
        if "moe" in rep:
            row["experts_kept"] = "/".join(map(str, rep["moe"]["experts"][1]))
            row["expert_width_kept"] = "/".join(map(str, rep["moe"]["expert_width"][1]))
            row["active_params_per_token"] = "{:,} -> {:,}".format(*rep["moe"]["active_params_per_token"])
        for phase, v in rep["phases"].items():
            row[f"{phase}_s"] = round(v["seconds"], 1)
            row[f"{phase}_peak_rss_gib"] = round(v["peak_rss_mb"] / 1024, 2)
            if "peak_cuda_mb" in v:
                row[f"{phase}_peak_cuda_gib"] = round(v["peak_cuda_mb"] / 1024, 2)
        rows.append(row)
    s = runs["stream"]
    summary = [f"Synthetic {preset}-shaped checkpoint, {layers} layers, {size / 1e9:.2f} GB bf16 on disk"
               + (f" (written in {gen_s:.0f} s)" if gen_s else "") + f"; prune at {args.ratio:.0%} on "
               f"{args.device}, {args.nsamples} x {args.seqlen} calibration tokens ({args.calib}).",
               f"Streamed peak RSS: {s['peak_rss_bytes'] / 2**30:.2f} GiB = "
               f"{s['peak_rss_bytes'] / size:.1%} of the checkpoint (target: under 25 %), "
               f"{s['peak_rss_bytes'] / layer_bytes:.2f}x one decoder layer ({layer_bytes / 1e9:.2f} GB); "
               f"{rows[0]['s_per_layer']} s per layer."]
    if "in-memory" in runs:
        m = runs["in-memory"]
        summary.append(f"In-memory peak RSS: {m['peak_rss_bytes'] / 2**30:.2f} GiB = {m['peak_rss_bytes'] / size:.1%} "
                       f"of the checkpoint; streaming needs {s['peak_rss_bytes'] / m['peak_rss_bytes']:.2f}x its "
                       f"memory and {s['wall_s'] / m['wall_s']:.2f}x its wall time (same run).")
    return rows, summary


def bench_recipes(preset: str, args) -> tuple[list[dict], list[str]]:
    """Every recipe at every layer count, streamed, each prune in its own process, recipes alternated."""
    from amp.io.models import cache_dir
    from amp.io.safetensors_io import Checkpoint
    recipes = args.recipes.split(",")
    for r in recipes:
        if r not in RECIPES:
            raise SystemExit(f"unknown --recipes {r!r}; choose from {', '.join(RECIPES)}")
    counts = [int(n) for n in (args.layers or "4,8").split(",")]
    rows, runs = [], {}
    for layers in counts:
        folder = Path(args.cache or cache_dir() / "bench") / f"{preset}-shapes-{layers}L-bf16"
        folder, _ = synthetic_checkpoint(folder, layers, preset)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        layer_bytes = sum(t.nbytes for n, t in Checkpoint(folder).tensors.items() if n.startswith("model.layers.0."))
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            for recipe in recipes:
                run = run_prune(folder, Path(tmp) / recipe, args, True, recipe)
                runs[(recipe, layers)] = run
                rep = run["report"]
                row = {"shapes": preset, "recipe": recipe, "layers": layers, "checkpoint_gib": round(size / 2**30, 3),
                       "layer_gib": round(layer_bytes / 2**30, 3),
                       "limit_gib": round(0.4 * size / 2**30 + 1, 3),
                       "peak_rss_gib": round(run["peak_rss_bytes"] / 2**30, 3), "wall_s": round(run["wall_s"], 1),
                       "kl_measured": rep["allocation"].get("heldout_kl", {}).get("measured", ""),
                       "kept_bytes": rep["memory"].get("kept_bytes", ""),
                       "kept_bytes_per_layer": rep["memory"].get("kept_bytes_per_layer", "")}
                for name, v in rep["memory"].get("passes", {}).items():
                    row[f"{name}_s"] = round(v["seconds"], 1)
                    row[f"{name}_peak_gib"] = round(v["peak_rss_mb"] / 1024, 3)
                rows.append(row)
                print(f"{preset} {layers} layers, {recipe}: peak RSS {row['peak_rss_gib']} GiB (limit "
                      f"{row['limit_gib']}), {row['wall_s']} s", flush=True)
    summary = [f"Synthetic {preset}-shaped bf16 checkpoints ({', '.join(map(str, counts))} layers), streamed prune at "
               f"{args.ratio:.0%} on {args.device}, {args.nsamples} x {args.seqlen} calibration tokens ({args.calib}); "
               "each prune in its own process; peak host RSS = ru_maxrss."]
    for r in rows:
        summary.append(f"- {r['layers']} layers ({r['checkpoint_gib']} GiB), {r['recipe']}: peak {r['peak_rss_gib']} GiB "
                       f"(limit 40 % + 1 GiB = {r['limit_gib']}), {r['wall_s']} s" +
                       (f"; by pass: " + ", ".join(f"{k[:-9]} {r[k]}" for k in r if k.endswith("_peak_gib"))
                        if any(k.endswith("_peak_gib") for k in r) else ""))
    if len(counts) > 1:
        lo, hi = min(counts), max(counts)
        layer_gib = rows[0]["layer_gib"]
        for recipe in recipes:
            grow = (runs[(recipe, hi)]["peak_rss_bytes"] - runs[(recipe, lo)]["peak_rss_bytes"]) / 2**30
            summary.append(f"{recipe}: the peak grows {grow:+.3f} GiB from {lo} to {hi} layers (one layer in bf16: "
                           f"{layer_gib} GiB)")
    if "default" in recipes and "paper" in recipes:
        for layers in counts:
            d, p = runs[("default", layers)], runs[("paper", layers)]
            summary.append(f"{layers} layers: the default takes {d['wall_s'] / p['wall_s']:.2f}x the paper's recipe's "
                           f"time and {d['peak_rss_bytes'] / p['peak_rss_bytes']:.2f}x its peak host RSS (same run)")
    summary += projections()
    return rows, summary


def projections() -> list[str]:
    """What one layer's default prune holds, by term, for large models on one 80 GB GPU (calibration activations
    on the device when they fit): the layer in bf16, the widest Gram (fp32: 64 x 2048 calibration tokens are
    fewer than the 10 per channel a refit needs, so the Grams only rank; a mixture's: one per expert), the copy
    of the weight a path scores, and 64 x 2048 tokens of hidden states in bf16. Host memory holds the kept curves
    (measured here: a few hundred points per block) and, when they do not fit on the device, the activations."""
    tokens = 64 * 2048
    out = [f"Projected device memory of the default prune with {tokens:,} calibration tokens, one layer resident "
           "(arithmetic from the shapes, the terms measured above: layer bf16 + widest Gram + weight copy + "
           "hidden states):"]
    for name, m in PROJECTIONS.items():
        h, q, kv, d, inter, e = m["hidden"], m["heads"], m["kv"], m["head_dim"], m["inter"], m["experts"]
        attn = h * d * (2 * q + 2 * kv)
        mlp = 3 * h * inter * max(e, 1) + (h * e if e else 0)
        layer = 2 * (attn + mlp)
        widest = max(inter, q * d) if not e else q * d
        refit = not e and tokens >= 10 * widest  # compensate.MIN_TOKENS_PER_CHANNEL: a refit solves in fp64
        gram = (8 if refit else 4) * widest ** 2 + (4 * e * inter ** 2 if e else 0)
        weight = 2 * h * max(inter, q * d)  # one projection (one expert) at a time, in bf16
        acts = 2 * tokens * h
        total = layer + gram + weight + acts
        minutes = {r: _h100_minutes(m, r, tokens, layer, attn, inter, widest) for r in ("default", "paper")}
        out.append(f"- {name}: layer {layer / 2**30:.1f} GiB + Gram {gram / 2**30:.1f} ({'fp64, refit' if refit else 'fp32'}"
                   f"{', every expert' if e else ''}) + weight {weight / 2**30:.1f} + hidden states {acts / 2**30:.1f}"
                   f" = {total / 2**30:.1f} GiB of 80; the whole model "
                   f"{(m['layers'] * layer + 2 * 2 * h * m['vocab']) / 2**30:.0f} GiB in bf16; on one H100 (half "
                   f"its bf16 peak, checkpoint read at 3 GB/s) about {minutes['default']:.0f} min for the default, "
                   f"{minutes['paper']:.0f} for the paper's recipe")
    return out


def _h100_minutes(m: dict, recipe: str, tokens: int, layer_bytes: int, attn: int, inter: int, widest: int) -> float:
    """A compute-and-read estimate, not a measurement: forward flops 2 x active parameters per token (the paper's
    recipe: calibrate and propagate; the default adds the curves pass, the kl yardstick's forward, backward (2x)
    and held-back run over 8 x 512 tokens), the Grams and W^T W on and above the diagonal (curves and cut passes),
    at 495 TFLOP/s, plus reading the checkpoint (once; the default four times) at 3 GB/s."""
    h, e = m["hidden"], m["experts"]
    active = attn + 3 * h * inter * (m["top_k"] if e else 1)
    held = 8 * 512
    if recipe == "paper":
        flops, reads = 2 * active * tokens * 2, 1
    else:
        grams = tokens * (widest ** 2 + (m["heads"] * m["head_dim"]) ** 2)      # half of 2 T n^2, two passes
        paths = h * (widest ** 2 + (m["heads"] * m["head_dim"]) ** 2)
        flops, reads = 2 * active * (3 * tokens + 4 * held) + grams + paths, 4
    seconds = m["layers"] * (flops / 495e12 + reads * layer_bytes / 3e9)
    return seconds / 60


if __name__ == "__main__":
    main()

"""Streaming vs in-memory pruning of a checkpoint larger than a comfortable share of host memory.

Writes (once, into a cache folder) a synthetic LLaMA-architecture checkpoint with real LLaMA-2-7B layer shapes
(hidden 4096, 32 heads, intermediate 11008, vocab 32000, random bf16 weights, untied lm_head) and enough layers
to be at least 6 GB on disk, then prunes it at 20 % on this machine twice, each in its own process: streamed (the
default) and in memory (--no-stream). Recorded side by side: peak RSS of the process (the kernel's own count,
ru_maxrss through wait4), wall time per phase, bytes read and written, and the checkpoint's size.

    python -m benchmarks.bench_stream [--layers 14] [--nsamples 16] [--seqlen 128] [--device cpu]
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

SHAPES = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
              vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=1, pad_token_id=0)


def synthetic_checkpoint(folder: Path, layers: int) -> tuple[Path, float | None]:
    """The checkpoint, and the seconds it took to write (None when it was already cached). Written tensor by
    tensor through the engine's shard writer, so generating it needs one tensor of memory."""
    if (folder / "config.json").is_file():
        return folder, None
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from amp.io.safetensors_io import ShardWriter
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import tiny_tokenizer  # a byte-level tokenizer: ids stay far below the vocabulary

    start = time.perf_counter()
    config = LlamaConfig(num_hidden_layers=layers, dtype=torch.bfloat16, architectures=["LlamaForCausalLM"], **SHAPES)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    layout = [(n, tuple(p.shape), torch.bfloat16) for n, p in skeleton.state_dict().items()]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        writer = ShardWriter(tmp, layout, 2 * 10**9)
        gen = torch.Generator().manual_seed(0)
        for name, shape, dtype in layout:
            if "norm" in name:
                t = torch.ones(shape)
            else:  # std 1/sqrt(fan_in): activations keep their scale through the layers
                t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
            writer.write(name, t.to(dtype))
            del t
        writer.finish()
        config.save_pretrained(tmp)
        tiny_tokenizer().save_pretrained(tmp)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder, time.perf_counter() - start


def run_prune(folder: Path, out: Path, args, stream: bool) -> dict:
    cmd = [sys.executable, "-m", "amp.cli", "prune", str(folder), "--ratio", str(args.ratio), "--out", str(out),
           "--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--batch-size", "8", "--device", args.device, "--overwrite", "--quiet"]
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
    p.add_argument("--layers", type=int, default=14, help="14 layers of LLaMA-2-7B shapes: 6.2 GB in bf16")
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
    from amp.io.models import cache_dir
    folder = Path(args.cache or cache_dir() / "bench" / f"llama2-7b-shapes-{args.layers}L-bf16")
    folder, gen_s = synthetic_checkpoint(folder, args.layers)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
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
        row = {"path": name, "checkpoint_gb": round(size / 1e9, 3), "layers": args.layers,
               "peak_rss_gib": round(run["peak_rss_bytes"] / 2**30, 3),
               "peak_rss_over_checkpoint": round(run["peak_rss_bytes"] / size, 3), "wall_s": round(run["wall_s"], 1),
               "read_gb": round(rep["memory"]["bytes_read"] / 1e9, 3),
               "written_gb": round(rep["memory"]["bytes_written"] / 1e9, 3),
               "computed_in": rep["dtype"]["computed"], "offload": (rep["memory"]["offload"] or {}).get("where")}
        for phase, v in rep["phases"].items():
            row[f"{phase}_s"] = round(v["seconds"], 1)
            row[f"{phase}_peak_rss_gib"] = round(v["peak_rss_mb"] / 1024, 2)
            if "peak_cuda_mb" in v:
                row[f"{phase}_peak_cuda_gib"] = round(v["peak_cuda_mb"] / 1024, 2)
        rows.append(row)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k, "") for k in keys} for r in rows]
    s = runs["stream"]
    summary = [f"Synthetic LLaMA-2-7B-shaped checkpoint, {args.layers} layers, {size / 1e9:.2f} GB bf16 on disk"
               + (f" (written in {gen_s:.0f} s)" if gen_s else "") + f"; prune at {args.ratio:.0%} on "
               f"{args.device}, {args.nsamples} x {args.seqlen} calibration tokens ({args.calib}).",
               f"Streamed peak RSS: {s['peak_rss_bytes'] / 2**30:.2f} GiB = "
               f"{s['peak_rss_bytes'] / size:.1%} of the checkpoint (target: under 25 %)."]
    if "in-memory" in runs:
        m = runs["in-memory"]
        summary.append(f"In-memory peak RSS: {m['peak_rss_bytes'] / 2**30:.2f} GiB = {m['peak_rss_bytes'] / size:.1%} "
                       f"of the checkpoint; streaming needs {s['peak_rss_bytes'] / m['peak_rss_bytes']:.2f}x its "
                       f"memory and {s['wall_s'] / m['wall_s']:.2f}x its wall time (same run).")
    for line in summary:
        print(line)
    record("bench_stream", rows, summary, Path(args.out))


if __name__ == "__main__":
    main()

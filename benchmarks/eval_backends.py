"""`amp eval --backend vllm` against the in-process transformers backend, on SmolLM2 (dense, and pruned at 20 %),
the same rows of the same tasks and the same perplexity windows, fp32 in both.

    python -m benchmarks.eval_backends [--modes dense,depth/query] [--ratio 0.2] [--limit 200] [--ppl-windows 5]
        [--work DIR] [--name eval_backends]

Per model and task: accuracy with each backend, and how many rows' outcomes differ (a row may flip only where two
choices' log-likelihoods tie within fp32 summation order); WikiText-2 perplexity with each. A per-layer result goes
to vLLM through its DeciLM export, as `amp eval --backend vllm` does. vLLM runs from the environment that
`python -m benchmarks.serve_check --install` makes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import RESULTS, record
from benchmarks.quality import TASKS as FIVE_TASKS


def main(argv=None) -> int:
    import amp
    from amp.cli import main as amp_main
    from amp.io.models import default_model_dir
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="dense,depth/query")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--ppl-windows", type=int, default=5)
    p.add_argument("--work", default=None, help="reuse pruned models kept by serve_check --work DIR")
    p.add_argument("--name", default="eval_backends")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    from benchmarks.serve_check import venv_python
    python = venv_python("vllm")
    if not python.is_file():
        raise SystemExit("vLLM is not installed: python -m benchmarks.serve_check --install --runtimes vllm")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            folder = default_model_dir()
            if mode != "dense" and args.work and (Path(args.work) / mode.replace("/", "-")).is_dir():
                folder = Path(args.work) / mode.replace("/", "-")      # serve_check --work's prune, reused
            elif mode != "dense":
                allocation, heads = mode.split("/")
                folder = Path(tmp) / mode.replace("/", "-")
                amp.prune_checkpoint(None, amp.PruneConfig(ratio=args.ratio, allocation=allocation, heads=heads),
                                     folder, progress=True)
            results = {}
            for backend in ("transformers", "vllm"):
                out = Path(tmp) / f"{mode.replace('/', '-')}-{backend}.json"
                extra = ["--backend", "vllm", "--vllm-python", str(python), "--vllm-dtype", "float32"] \
                    if backend == "vllm" else []
                code = amp_main(["eval", str(folder), "--tasks", ",".join(FIVE_TASKS), "--limit", str(args.limit),
                                 "--ppl", "wikitext2", "--max-windows", str(args.ppl_windows), "--quiet",
                                 "--json", str(out), *extra])
                if code != 0:
                    raise SystemExit(f"amp eval --backend {backend} failed on {mode}")
                results[backend] = json.loads(out.read_text())
            hf, vl = results["transformers"], results["vllm"]
            (key,) = hf["perplexity"]
            for task in FIVE_TASKS:
                metric = hf["metric"][task]
                a, b = hf["tasks"][task]["rows"][metric], vl["tasks"][task]["rows"][metric]
                rows.append({"model": "SmolLM2-135M", "mode": mode, "ratio": 0.0 if mode == "dense" else args.ratio,
                             "task": task, "metric": metric, "rows": len(a),
                             "transformers": round(100 * hf["tasks"][task][metric], 2),
                             "vllm": round(100 * vl["tasks"][task][metric], 2),
                             "rows_differing": sum(x != y for x, y in zip(a, b)),
                             "ppl_transformers": round(hf["perplexity"][key], 4),
                             "ppl_vllm": round(vl["perplexity"][key], 4)})
    for r in rows:
        print(r)
    differing = sum(r["rows_differing"] for r in rows)
    total = sum(r["rows"] for r in rows)
    gap = max(abs(r["transformers"] - r["vllm"]) for r in rows)
    ppl_gap = max(abs(r["ppl_vllm"] / r["ppl_transformers"] - 1) for r in rows)
    summary = [f"{differing} of {total} (model, task, row) outcomes differ between the backends; largest accuracy "
               f"gap {gap:.2f} points; largest perplexity ratio gap {ppl_gap:.2e} (WikiText-2, {args.ppl_windows} "
               f"windows of 2,048 tokens). fp32 in both; {args.limit} rows per task."]
    print(summary[0])
    if not args.no_record:
        record(args.name, rows, summary, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

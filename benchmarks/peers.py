"""Other pruning tools side by side with the engine on SmolLM2-135M, cut to the engine's parameter count, evaluated
on the same perplexity windows and the same zero-shot rows as `benchmarks.quality` (so that
`benchmarks.quality_paired --json quality_search,peers` pairs them with the engine's rows).

    python -m benchmarks.peers [--peers optipfair,torch-pruning,llm-pruner] [--ratios 0.2,0.3] [--limit 500]
        [--ppl-windows 20] [--install] [--name peers]

Each peer runs in its own virtual environment under $AMP_CACHE_DIR/peers/NAME with the pins it was tested with
(its driver in benchmarks/peer_drivers/ writes the pruned model with save_pretrained); the evaluation runs here,
in the project's environment, on what it wrote:
- optipfair: OptiPFair 0.4.2 (PyPI), MLP-GLU width pruning with its data-driven MAW score on the engine's own 64
  C4 calibration windows of 512 tokens, no compensation; every layer cut to the same width, chosen so that the
  parameter count equals the engine's uniform prune at the ratio (MLP only: that is all it prunes);
- torch-pruning: Torch-Pruning 1.6.1 (PyPI) with the settings of its LLM example (hidden channels, heads and MLP
  channels at one ratio, magnitude group norms, no data), on transformers 4.48.3 with eager attention, no cache,
  on the CPU, as that example was tested; the ratio bisected to the engine's parameter count;
- llm-pruner: LLM-Pruner is published on GitHub only (no PyPI package), so it is installed from a checkout given
  with --llm-pruner DIR; without one it is recorded as not run, with that reason.
A peer that cannot run is recorded with the reason, never dropped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import RESULTS, machine, record

DRIVERS = Path(__file__).resolve().parent / "peer_drivers"
PEERS = {
    "optipfair": dict(packages=["torch==2.13.0", "transformers==5.24.0", "optipfair==0.4.2"],
                      driver="optipfair_prune.py", check="import optipfair",
                      what="OptiPFair 0.4.2: MLP-GLU width, data-driven MAW score (64 C4 windows), no compensation"),
    "torch-pruning": dict(packages=["torch==2.13.0", "transformers==4.48.3", "torch-pruning==1.6.1",
                                    "accelerate<1.5"],
                          driver="torch_pruning_prune.py", check="import torch_pruning, transformers",
                          what="Torch-Pruning 1.6.1 LLM example: hidden, heads and MLP at one ratio, group "
                               "magnitude, no data (transformers 4.48.3, eager, CPU)"),
    "llm-pruner": dict(packages=None, driver=None, check=None,
                       what="LLM-Pruner (GitHub only)",
                       unavailable="LLM-Pruner is not published on PyPI (GitHub only: horseee/LLM-Pruner) and this "
                                   "machine reaches package registries only; not run"),
}


def peer_python(name: str) -> Path:
    from amp.io.models import cache_dir
    return cache_dir() / "peers" / name / "bin" / "python"


def install(name: str) -> Path:
    """The peer's virtual environment, made once and reused (a changed package list installs again)."""
    from benchmarks.serve_check import make_env
    spec = PEERS[name]
    return make_env(peer_python(name).parent.parent, spec["packages"], [], spec["check"])


def run_peer(name: str, job: dict) -> dict:
    python = install(name)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    proc = subprocess.run([str(python), str(DRIVERS / PEERS[name]["driver"]), f.name], capture_output=True,
                          text=True)
    Path(f.name).unlink()
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError((proc.stderr or proc.stdout).strip().splitlines()[-1] if (proc.stderr or proc.stdout)
                           else f"exit {proc.returncode}")
    return json.loads(line[len("RESULT "):])


def load_peer_model(folder: Path):
    """A peer's output in this environment. Torch-Pruning leaves hidden sizes that transformers 5 validates more
    strictly than its modelling code needs (hidden % heads, huggingface/transformers#46082; head_dim is explicit),
    so that one check is lifted while loading."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    saved = list(getattr(LlamaConfig, "__class_validators__", []))
    LlamaConfig.__class_validators__ = [v for v in saved if v.__name__ != "validate_architecture"]
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    finally:
        LlamaConfig.__class_validators__ = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", default="optipfair,torch-pruning,llm-pruner")
    p.add_argument("--ratios", default="0.2,0.3")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--ppl-windows", type=int, default=20)
    p.add_argument("--tasks", default=None, help="zero-shot tasks (default: benchmarks.quality's five), or 'none'")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--install", action="store_true", help="only make the peers' environments")
    p.add_argument("--name", default="peers")
    p.add_argument("--keep", default=None, help="keep the peers' pruned models here")
    args = p.parse_args(argv)
    names = args.peers.split(",")
    if args.install:
        for n in names:
            if PEERS[n]["packages"]:
                print(f"{n}: {install(n)}")
        return 0
    import amp
    from amp.io.calibration import default_data_dir
    from amp.io.models import default_model_dir
    from amp.prune.allocate import total_params
    from amp.quality.evaluate import evaluate_model
    from amp.quality.perplexity import corpus_text
    from benchmarks.quality import TASKS, _row
    tasks = [] if args.tasks == "none" else args.tasks.split(",") if args.tasks else TASKS
    data_dir = default_data_dir()
    dense_dir = default_model_dir()
    dense, tokenizer, _ = amp.load_model(None)
    total = total_params(dense)
    layers, hidden, width = dense.config.num_hidden_layers, dense.config.hidden_size, dense.config.intermediate_size
    calibration = amp.load_calibration(tokenizer, "c4", 64, 512, 0, data_dir)  # the engine's default windows
    texts = {"wikitext2": corpus_text("wikitext2", data_dir)}
    results, rows = {}, []
    work = Path(args.keep or tempfile.mkdtemp(prefix="amp-peers-"))
    for ratio in map(float, args.ratios.split(",")):
        removed = round(ratio * total)
        for name in names:
            spec, key = PEERS[name], f"{name}@{ratio}"
            entry = {"peer": spec["what"], "ratio": ratio, "target_params": total - removed}
            if spec.get("unavailable"):
                entry.update(status="not run", reason=spec["unavailable"])
                results[key] = entry
                rows.append({"criterion": name, "ratio": ratio, "status": "not run", "reason": spec["unavailable"]})
                continue
            out = work / key.replace("@", "-")
            job = {"model": str(dense_dir), "out": str(out), "params": total - removed,
                   "calibration": [s.tolist() for s in calibration.samples],
                   # MLP-only peers: the one width that removes the budget from every layer's MLP
                   "intermediate_size": width - round(removed / (layers * 3 * hidden))}
            start = time.perf_counter()
            try:
                ran = run_peer(name, job)
                model = load_peer_model(out)
            except Exception as e:  # noqa: BLE001 - a peer that fails is recorded with its reason
                entry.update(status="failed", reason=str(e)[-500:])
                results[key] = entry
                rows.append({"criterion": name, "ratio": ratio, "status": "failed", "reason": entry["reason"]})
                print(f"{key}: failed: {entry['reason']}", flush=True)
                continue
            params = sum(p.numel() for p in model.parameters())
            r = evaluate_model(model, tokenizer, key, tasks, texts, args.seqlen, data_dir, args.limit, 8, "cpu",
                               args.ppl_windows, progress=False)
            r.update(entry, status="ok", params=params, prune_seconds=round(ran["seconds"], 1),
                     settings=ran["settings"], wall_seconds=round(time.perf_counter() - start, 1))
            results[key] = r
            row = _row(name, ratio, (total - params) / total, r, args.seqlen)
            rows.append({**row, "status": "ok", "params": params, "prune_seconds": r["prune_seconds"]})
            print(f"{key}: {params:,} parameters, ppl {row['wikitext2_ppl']:.2f}, avg {row['avg']:.4f}", flush=True)
    summary = [f"Peers on SmolLM2-135M at the engine's parameter count (ratio of the whole model, {total:,} "
               f"parameters dense); perplexity: WikiText-2 test, first {args.ppl_windows} windows of {args.seqlen} "
               f"tokens; " + (f"zero-shot: the first {args.limit} rows of {', '.join(tasks)} (the rows of "
                              "benchmarks.quality)." if tasks else "no zero-shot tasks (--tasks none).") +
               " Each peer ran in its own environment under $AMP_CACHE_DIR/peers with the pins in benchmarks/peers.py."]
    record(args.name, rows, summary)
    path = RESULTS / f"{args.name}.json"
    earlier = json.loads(path.read_text()).get("results", {}) if path.is_file() else {}
    path.write_text(json.dumps({"machine": machine(), "results": {**earlier, **results}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

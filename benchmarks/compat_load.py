"""What this environment writes loads under another transformers release, with the same logits.

    python -m benchmarks.compat_load 4.57.6 [5.17.0 ...] [--no-record]

Why: transformers 5 holds a mixture-of-experts layer's experts fused in memory and reads Hub checkpoints with one
tensor per expert, while 4.57 keeps them as a ModuleList; per-layer checkpoints (`amp_per_layer`) go through the
patch `import amp` installs, which each release must accept. MoE pruning itself needs transformers >= 5, so the
test suite cannot check under 4.57 that a MoE result loads there; this does. For each case (tiny random configs:
Mixtral and Qwen3-MoE pruned uniformly and per layer, and a dense per-layer LLaMA), the model is pruned here and
its logits on fixed tokens are saved; a subprocess with the other release first on PYTHONPATH (the overlay of
benchmarks/compat_transformers.py) loads each folder after `import amp` and compares. The results go to
benchmarks/results/compat_load.md; the exit status is non-zero when any case fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = [("mixtral_moe", dict(allocation="uniform")), ("mixtral_moe", dict(allocation="depth", heads="query")),
         ("qwen3moe_moe", dict(allocation="uniform")), ("qwen3moe_moe", dict(allocation="sensitivity")),
         ("llama_gqa", dict(allocation="depth", heads="query"))]

CHECK = r"""
import json, sys, torch
import amp  # the per-layer patch
from transformers import AutoModelForCausalLM
results = {}
for folder in json.loads(sys.argv[1]):
    try:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        ids = torch.load(folder + "/ids.pt")
        with torch.no_grad():
            got = model(ids).logits
        want = torch.load(folder + "/logits.pt")
        results[folder] = {"max_abs_diff": float((got - want).abs().max()),
                           "params": sum(p.numel() for p in model.parameters())}
    except Exception as e:  # noqa: BLE001 - every failure is reported, not raised
        results[folder] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
print("RESULTS " + json.dumps(results))
"""


def build(folder: Path) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    import amp
    from conftest import random_calibration
    from tiny_models import make_tiny, save_tiny
    cases = []
    for i, (family, kwargs) in enumerate(CASES):
        model = make_tiny(family)
        report = amp.prune_(model, amp.PruneConfig(ratio=0.3, batch_size=3, **kwargs), random_calibration(n=8),
                            progress=False)
        out = save_tiny(model, folder / f"{i}-{family}-{kwargs['allocation']}")
        ids = torch.randint(2, 258, (2, 11), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            torch.save(model(ids).logits, out / "logits.pt")
        torch.save(ids, out / "ids.pt")
        per_layer = "amp_per_layer" in json.loads((out / "config.json").read_text())
        cases.append({"folder": str(out), "family": family, **kwargs, "per_layer_config": per_layer,
                      "params": report["params_after"]})
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("versions", nargs="+")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    from benchmarks.compat_transformers import install
    from benchmarks.harness import record
    import transformers
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        cases = build(Path(tmp))
        for version in args.versions:
            target, _ = install(version)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT), os.environ.get("PYTHONPATH", "")])}
            proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps([c["folder"] for c in cases])], env=env,
                                  capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")), None)
            if line is None:
                raise SystemExit(f"transformers {version}: the check did not run:\n{proc.stderr[-2000:]}")
            results = json.loads(line[len("RESULTS "):])
            for case in cases:
                r = results[case["folder"]]
                ok = "error" not in r and r["max_abs_diff"] < 1e-4 and r["params"] == case["params"]
                failed += not ok
                rows.append({"written_with": transformers.__version__, "loaded_with": version,
                             "case": f"{case['family']} {case['allocation']}/{case.get('heads', 'group')}",
                             "amp_per_layer": case["per_layer_config"], "ok": ok,
                             "max_abs_logit_diff": r.get("max_abs_diff", ""), "error": r.get("error", "")})
                print(rows[-1])
    if not args.no_record:
        summary = [f"Pruned with transformers {transformers.__version__} here, loaded with "
                   f"{', '.join(args.versions)} after `import amp`: {len(rows) - failed} of {len(rows)} cases load "
                   "with the same logits (max |diff| < 1e-4) and parameter count."]
        record("compat_load", rows, summary, ROOT / "benchmarks" / "results")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The quality zoo table (issue 29): on every zoo model at the ratios that matter, the engine's default (the
measured choice of --allocation auto), the paper's recipe (AMP scores, uniform) and the peers, each row in a fresh
process (benchmarks/zoo/one.py), on the same calibration windows, held-back windows, perplexity windows and
zero-shot rows.

    python -m benchmarks.zoo.table [--runs smollm2-135m@0.1,0.2,0.3+gemma3-270m@0.1,0.2]
        [--recipes dense,default,paper,optipfair] [--tasks piqa,winogrande,arc_easy,arc_challenge | none]
        [--limit 500] [--name zoo] [--calibration c4:64x512] [--recover-tokens 65536]

A recipe may be followed by +lora (default+lora): that prune, then `amp recover`'s LoRA fine-tune
(benchmarks.quality.RECOVERY).

Every finished row is kept in benchmarks/results/<name>.json as it lands (a run resumes where it stopped; --again
runs rows already there); the table (<name>.md / .csv) is written at the end, with the ratios to the best peer and
to the paper's recipe, and the paired gaps of the four-task average (without BoolQ) where zero-shot rows were run.
Perplexity: WikiText-2 test, the first 8 windows of 1,024 tokens (8,192 tokens: issue 29's measure) and 20 windows
of 2,048 (the engine's); C4 on documents the calibration never read, 16 windows of 1,024 (the calibration's own
domain: does the held-back KL's preference hold in perplexity there?). Held-out KL: mean over the 8 held-back
calibration windows' tokens of KL(dense || pruned).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import RESULTS, record
from benchmarks.quality import RECOVERY

PPL = [[1024, 8], [2048, 20]]
FOUR = ["piqa", "winogrande", "arc_easy", "arc_challenge"]
PEERS = ("optipfair",)


def _runs(text: str) -> list[tuple[str, float]]:
    out = []
    for part in text.split("+"):
        model, ratios = part.split("@")
        out += [(model, float(r)) for r in ratios.split(",")]
    return out


def run_one(job: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.zoo.one", f.name], capture_output=True, text=True)
    Path(f.name).unlink()
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {**job, "status": "failed", "reason": tail[-1][-400:] if tail else f"exit {proc.returncode}"}
    return json.loads(line[len("RESULT "):])


def _key(model: str, ratio: float, recipe: str) -> str:
    return f"{model}@{0.0 if recipe == 'dense' else ratio}/{recipe}"


def table_rows(results: dict) -> tuple[list[dict], list[str]]:
    """One row per result, with the perplexity ratios to the best peer and to the paper's recipe at the same
    model and ratio, and the four-task average's paired gap to the paper's recipe."""
    from benchmarks.quality_paired import paired_gap
    rows, lines = [], []
    for key, r in results.items():
        if r.get("status") == "failed":
            rows.append({"model": r["model"], "ratio": r["ratio"], "recipe": r["recipe"], "status": "failed",
                         "reason": r["reason"]})
            continue
        ppl = r["perplexity"]["8x1024"]
        row = {"model": r["model"], "ratio": r["ratio"], "recipe": r["recipe"], "kept": r.get("kept", ""),
               "params": r["params"], "ratio_achieved": r["ratio_achieved"], "ppl_8x1024": ppl,
               "ppl_20x2048": r["perplexity"].get("20x2048"),
               "ppl_c4_unseen": r["perplexity"].get("c4_unseen_16x1024", ""), "heldout_kl": r.get("heldout_kl", ""),
               "prune_seconds": r.get("prune_seconds", "")}
        if "recovery" in r:  # a RECIPE+lora row: the fine-tune's token budget and time (beside the prune's)
            row["fine_tune_tokens"], row["fine_tune_seconds"] = r["recovery"]["tokens"], r["recovery"]["seconds"]
        same = {k.split("/")[1]: v for k, v in results.items()
                if k.startswith(f"{r['model']}@{r['ratio']}/") and v.get("status") != "failed"}
        peers = [same[p]["perplexity"]["8x1024"] for p in PEERS if p in same]
        if peers and r["recipe"] not in PEERS:
            row["over_best_peer"] = round(ppl / min(peers), 3)
        if "paper" in same and r["recipe"] != "paper":
            row["over_paper"] = round(ppl / same["paper"]["perplexity"]["8x1024"], 3)
        if "tasks" in r and all(t in r["tasks"] for t in FOUR):
            row["avg4"] = round(100 * sum(r["tasks"][t][r["metric"][t]] for t in FOUR) / len(FOUR), 2)
            row["zero_shot_rows"] = min(r["tasks"][t]["n"] for t in FOUR)
            if "paper" in same and r["recipe"] != "paper" and "tasks" in same["paper"]:
                gap = paired_gap(r, same["paper"], FOUR)
                row["avg4_gap_to_paper"] = f"{gap['gap']:+.2f} [{gap['lo']:+.2f}, {gap['hi']:+.2f}]"
        rows.append(row)
    return rows, lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="smollm2-135m@0.1,0.2,0.3+gemma3-270m@0.1,0.2")
    p.add_argument("--recipes", default="dense,default,paper,optipfair")
    p.add_argument("--tasks", default=",".join(FOUR))
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--name", default="zoo")
    p.add_argument("--recover-tokens", type=int, default=None, help="the fine-tune's budget of RECIPE+lora rows "
                   "(default: benchmarks.quality.RECOVERY's, 65,536); another belongs in its own --name")
    p.add_argument("--again", action="store_true", help="run rows already in the results file again")
    p.add_argument("--calibration", default="c4:64x512", help="CORPUS:WINDOWSxTOKENS, the prune's calibration "
                   "(and its 8 held-back windows); another than the default belongs in its own --name")
    args = p.parse_args(argv)
    path = RESULTS / f"{args.name}.json"
    results = json.loads(path.read_text())["results"] if path.exists() else {}
    tasks = [] if args.tasks == "none" else args.tasks.split(",")
    corpus, size = args.calibration.split(":")
    windows, seqlen = (int(n) for n in size.split("x"))
    for model, ratio in _runs(args.runs):
        for recipe in args.recipes.split(","):
            key = _key(model, ratio, recipe)
            if key in results and not args.again:
                continue
            job = {"model": model, "ratio": ratio, "recipe": recipe, "tasks": tasks, "limit": args.limit, "ppl": PPL,
                   "calibration": [corpus, windows, seqlen]}
            if args.recover_tokens:
                job["recover_tokens"] = args.recover_tokens
            print(f"{key} ...", flush=True)
            results[key] = run_one(job)
            r = results[key]
            print(f"{key}: " + (f"failed: {r['reason']}" if r.get("status") == "failed" else
                                f"ppl {r['perplexity']['8x1024']:.2f}, held-out KL {r.get('heldout_kl', '-')}, "
                                f"prune {r.get('prune_seconds', '-')} s {r.get('kept', '')}"), flush=True)
            path.write_text(json.dumps({"results": results}, indent=1))
    rows, _ = table_rows(results)
    record(args.name, rows, [
        f"The quality zoo (benchmarks/zoo/table.py): each row a fresh process; calibration {windows} {corpus} windows "
        f"of {seqlen} tokens (seed 0) and 8 held back; default = --allocation auto (the measured choice between the "
        "engine's kl candidate and the paper's recipe, `kept`); paper = --criterion amp --allocation uniform; "
        "optipfair = OptiPFair 0.4.2 MLP-GLU (MAW) cut to the same parameter count; RECIPE+lora = that prune, then "
        f"`amp recover`'s LoRA fine-tune (Alpaca records of at most {RECOVERY['seqlen']} tokens, batch 8, lr "
        f"{RECOVERY['lr']:g}, no teacher; fine_tune_tokens its budget). Perplexity: WikiText-2 test, 8 "
        "windows of 1,024 and 20 of 2,048 tokens; ppl_c4_unseen: C4 validation documents past the span the calibration "
        "reads, 16 windows of 1,024 (blank: a row run before it was measured). " +
        (f"Zero-shot: the first {args.limit} rows of {', '.join(tasks)}; avg4 their mean (acc_norm where defined), "
         "gaps paired on the same rows with a bootstrap 95 % interval." if tasks else "No zero-shot rows.")])
    return 0


if __name__ == "__main__":
    sys.exit(main())

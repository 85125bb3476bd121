"""Paired comparison of zero-shot results on the same rows: is a gap between two models more than chance?

    python -m benchmarks.quality_paired --json quality_paired --reference seq+refit@c4:64

Every model evaluated by `benchmarks.quality` stores each row's 0/1 outcome (amp.zeroshot.row_outcomes). For every
label in the file, against the reference label at the same ratio, this gives the gap of the five-task average and
of the four-task average without BoolQ (see quality_table.py), with a paired bootstrap 95 % interval (rows resampled
per task, the same rows for both models) and the paired standard error. Pairing removes the variance of row
difficulty that both models share, so the interval is narrower than the unpaired rule of thumb quality.md quotes
(two standard errors of one average). Appends to benchmarks/results/<json>_gaps.md.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks.harness import RESULTS, record
from benchmarks.quality import TASKS

WITHOUT_BOOLQ = [t for t in TASKS if t != "boolq"]  # quality_table.py's four-task average


def outcomes(result: dict, task: str) -> np.ndarray:
    bits = result["tasks"][task]["rows"][result["metric"][task]]
    return np.frombuffer(bits.encode(), dtype=np.uint8) - ord("0")


def paired_gap(a: dict, b: dict, tasks: list[str], iters: int = 10_000, seed: int = 0) -> dict:
    """Gap (a - b) of the mean over tasks of per-task accuracy, in points: estimate, paired SE, bootstrap 95 %."""
    rng = np.random.default_rng(seed)
    diffs = []
    for t in tasks:
        da, db = outcomes(a, t), outcomes(b, t)
        if len(da) != len(db):
            raise SystemExit(f"error: {t} has {len(da)} rows in one result and {len(db)} in the other")
        diffs.append(da.astype(np.float64) - db)
    gap = np.mean([d.mean() for d in diffs])
    se = np.sqrt(sum(d.var(ddof=1) / len(d) for d in diffs)) / len(diffs)
    boot = np.zeros(iters)
    for d in diffs:
        boot += d[rng.integers(0, len(d), size=(iters, len(d)))].mean(axis=1)
    boot /= len(diffs)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"gap": float(100 * gap), "se": float(100 * se), "lo": float(100 * lo), "hi": float(100 * hi)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="quality_paired",
                   help="result name(s), comma-separated (their .json files under benchmarks/results, merged)")
    p.add_argument("--reference", required=True, help="label (without @RATIO) the others are compared against")
    p.add_argument("--iters", type=int, default=10_000)
    args = p.parse_args()
    results = {}
    for name in args.json.split(","):
        results.update({k: v for k, v in json.loads((RESULTS / f"{name}.json").read_text())["results"].items()
                        if "tasks" in v})  # a peer that did not run has no rows
    args.json = args.json.split(",")[-1]
    rows = []
    for key, r in results.items():
        label, ratio = key.rsplit("@", 1)
        ref = results.get(f"{args.reference}@{ratio}")
        if label == args.reference or ref is None:
            continue
        missing = [t for t in TASKS if "rows" not in r["tasks"].get(t, {}) or "rows" not in ref["tasks"].get(t, {})]
        if missing:
            raise SystemExit(f"error: {key} or its reference lacks per-row outcomes for {', '.join(missing)} "
                             "(evaluated before they were stored; run it again)")
        for name, tasks in (("5-task", TASKS), ("4-task (no BoolQ)", WITHOUT_BOOLQ)):
            g = paired_gap(r, ref, tasks, args.iters)
            rows.append({"model": label, "reference": args.reference, "ratio": float(ratio), "average": name,
                         "gap_points": round(g["gap"], 2), "paired_se": round(g["se"], 2),
                         "ci95_low": round(g["lo"], 2), "ci95_high": round(g["hi"], 2),
                         "beyond_noise": "yes" if g["lo"] > 0 or g["hi"] < 0 else "no"})
    if not rows:
        raise SystemExit(f"error: no label to compare against {args.reference} at the same ratio")
    record(f"{args.json}_gaps", rows, [
        f"Gap = model minus reference, in points of average accuracy over the same rows; paired bootstrap over rows "
        f"({args.iters:,} resamples per task). 'beyond_noise': the 95 % interval excludes zero."])
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()

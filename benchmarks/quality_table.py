"""One table from the results that several `benchmarks.quality` runs stored (their JSON files), with the
perplexity ratio to dense and an average without BoolQ (on SmolLM2 BoolQ sits at or below its majority-class rate,
63 % "yes" in the first 500 rows: a model that drifts toward always answering "yes" gains 20 points there while
knowing less, which moves the five-task average by 4).
    python -m benchmarks.quality_table --json quality_recovery,quality_allocation --dense quality_allocation \
        --name quality_recovery_table
"""
from __future__ import annotations

import argparse
import json

from benchmarks.harness import RESULTS, machine
from benchmarks.quality import TASKS
BOOLQ_YES_RATE = 0.63  # share of "true" labels in the first 500 validation rows (counted from the data file)


def rows_from(results: dict, keep, key_ppl: str) -> list[dict]:
    out = []
    for label, r in results.items():
        if not keep(label):
            continue
        acc = {t: r["tasks"][t][r["metric"][t]] for t in TASKS if t in r["tasks"]}
        row = {"model": label, "wikitext2_ppl": r["perplexity"][key_ppl], **acc}
        if len(acc) == len(TASKS):
            row["avg5"] = sum(acc.values()) / 5
            row["avg4_no_boolq"] = sum(v for t, v in acc.items() if t != "boolq") / 4
        rec = r.get("recovery")
        row["fine-tune tokens"] = rec["tokens"] if rec else 0
        out.append(row)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="quality_recovery", help="comma list of result names (their .json files)")
    p.add_argument("--dense", default="quality_allocation", help="result name holding the dense row")
    p.add_argument("--include", default="", help="comma list of extra labels to take from the other files")
    p.add_argument("--name", default="quality_recovery_table")
    p.add_argument("--ppl-key", default="wikitext2@2048")
    args = p.parse_args()
    include = set(filter(None, args.include.split(",")))
    rows = []
    dense = json.loads((RESULTS / f"{args.dense}.json").read_text())["results"]["dense"]
    rows += rows_from({"dense": dense}, lambda _: True, args.ppl_key)
    for i, name in enumerate(args.json.split(",")):
        results = json.loads((RESULTS / f"{name}.json").read_text())["results"]
        rows += rows_from(results, (lambda _: True) if i == 0 else (lambda label: label in include), args.ppl_key)
    base = rows[0]["wikitext2_ppl"]
    for row in rows:
        row["ppl_x_dense"] = round(row["wikitext2_ppl"] / base, 3)
    cols = ["model", "wikitext2_ppl", "ppl_x_dense", *TASKS, "avg5", "avg4_no_boolq", "fine-tune tokens"]
    head = machine()
    lines = [f"\n## {head['date']} · commit {head['commit']}\n",
             "; ".join(f"{k}: {v}" for k, v in head.items() if k not in ("date", "commit")) + "\n",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |")
    lines.append(f"\nBoolQ: {BOOLQ_YES_RATE:.0%} of its first 500 rows are 'yes'; a score near 0.63 is the "
                 "majority-class rate, so avg4_no_boolq is the sharper zero-shot figure here.")
    text = "\n".join(lines) + "\n"
    with (RESULTS / f"{args.name}.md").open("a") as f:
        f.write(text)
    print(text)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()

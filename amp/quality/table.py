"""The Markdown table `amp eval` prints: one column per model, deltas against a baseline when given."""
from __future__ import annotations


def _fmt(value, pct: bool) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.2f}" if pct else f"{value:.2f}"


def _delta(a, b, pct: bool) -> str:
    if a is None or b is None:
        return "—"
    d = (a - b) * (100 if pct else 1)
    return f"{d:+.2f}"


def markdown(result: dict, baseline: dict | None = None) -> str:
    head = ["measure", "metric", "model"] + (["baseline", "Δ"] if baseline else [])
    rows = []

    def add(name, metric, value, base, pct):
        row = [name, metric, _fmt(value, pct)]
        if baseline is not None:
            row += [_fmt(base, pct), _delta(value, base, pct)]
        rows.append(row)

    for key, value in result["perplexity"].items():
        base = baseline["perplexity"].get(key) if baseline else None
        add(f"perplexity {key} ({result['perplexity_tokens'][key]:,} tokens)", "ppl ↓", value, base, False)
    for task, scores in result["tasks"].items():
        metric = result["metric"][task]
        base = baseline["tasks"].get(task, {}).get(metric) if baseline else None
        add(f"{task} (n={scores['n']})", f"{metric} %", scores[metric], base, True)
    for name, avg in result["averages"].items():
        base = baseline["averages"].get(name, {}).get("value") if baseline else None
        label = name.replace("_", "-") + " average"
        if name == "evaluated":
            label = f"average of the {len(avg['tasks'])} evaluated tasks"
        if avg["missing"]:
            label += f" (missing {', '.join(avg['missing'])})"
        add(label, "mixed %", avg["value"], base, True)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    notes = [f"model: {result['model']} ({result['parameters']:,} parameters)"]
    if baseline:
        notes.append(f"baseline: {baseline['model']} ({baseline['parameters']:,} parameters)")
    if result.get("limit"):
        notes.append(f"zero-shot limited to the first {result['limit']} rows of each task")
    for task, why in result.get("skipped_tasks", {}).items():
        notes.append(f"{task} skipped: {why}")
    for corpus, why in result.get("skipped_corpora", {}).items():
        notes.append(f"perplexity on {corpus} skipped: {why}")
    notes.append("averages use acc_norm for piqa, hellaswag, arc_easy, arc_challenge, openbookqa and acc for "
                 "boolq, winogrande")
    return "\n".join(lines + [""] + notes)

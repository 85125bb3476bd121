"""How much does the pruned model keep? SmolLM2-135M pruned at 10, 20 and 30 % on one calibration set, evaluated
on WikiText-2 perplexity and the five shipped zero-shot tasks (lm-eval, the first --limit rows of each, the same
rows for every model), side by side with the dense model.
- by criterion (uniform allocation): writes benchmarks/results/quality.{md,csv,json,png};
- with --modes ALLOCATION/HEADS,... (AMP scores): per-layer allocation and head granularity side by side, writes
  benchmarks/results/quality_allocation.{md,csv,json,png}.
    python -m benchmarks.quality [--ratios 0.1,0.2,0.3] [--limit 100] [--ppl-windows 40]
    python -m benchmarks.quality --modes uniform/group,uniform/query,depth/query,sensitivity/query --limit 500
- with --recipes (AMP scores, each with its own calibration set): compensation, sequential calibration and
  recovery side by side, writes benchmarks/results/quality_recovery.{md,csv,json,png}. A recipe is
  STEPS@CALIB:N, STEPS a '+'-list of none | bias | refit | seq | depth | query | mult64 | mult128 | lora | kd, CALIB:N the
  calibration source and sample count (c4 and wikitext2 in windows of 512 tokens), e.g.
    python -m benchmarks.quality --recipes none@alpaca:128,refit@c4:64,bias+refit+seq@c4:64,lora@c4:64 \
        --recover-tokens 65536 --limit 500
"""
from __future__ import annotations

import argparse
import copy
import json
import time


from benchmarks.harness import RESULTS, machine, record

TASKS = ["boolq", "piqa", "winogrande", "arc_easy", "arc_challenge"]
# the recovery benchmarks' fine-tune: training tokens, records truncated to seqlen, learning rate (batch 8, LoRA r 8:
# RecoverConfig's defaults); benchmarks.zoo's RECIPE+lora rows run the same
RECOVERY = {"tokens": 65536, "seqlen": 256, "lr": 3e-4}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", default="0.1,0.2,0.3")
    p.add_argument("--criteria", default="amp,wanda-sp,flap,magnitude,random,reversed")
    p.add_argument("--modes", default=None, help="allocation/heads pairs, e.g. uniform/group,depth/query")
    p.add_argument("--recipes", default=None, help="STEPS@CALIB:N recipes, e.g. none@alpaca:128,refit@c4:64")
    p.add_argument("--recover-tokens", type=int, default=RECOVERY["tokens"],
                   help="fine-tuning budget of lora / kd, in tokens")
    p.add_argument("--recover-seqlen", type=int, default=RECOVERY["seqlen"])
    p.add_argument("--recover-lr", type=float, default=RECOVERY["lr"],
                   help="a short budget moves LoRA little at 1e-4")
    p.add_argument("--tasks", default=",".join(TASKS), help="zero-shot tasks, or 'none' for perplexity only")
    p.add_argument("--name", default=None, help="results file name (default: quality or quality_allocation)")
    p.add_argument("--skip-dense", action="store_true", help="do not evaluate the dense model (known from a run)")
    p.add_argument("--calib", default="alpaca")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window")
    p.add_argument("--ppl-windows", type=int, default=40)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    import amp
    from amp.io.calibration import default_data_dir
    from amp.quality.evaluate import evaluate_model
    from amp.quality.perplexity import corpus_text
    data_dir = args.data_dir or default_data_dir()
    tasks = [] if args.tasks == "none" else args.tasks.split(",")
    dense, tokenizer, _ = amp.load_model(None)
    calib = amp.load_calibration(tokenizer, args.calib, args.nsamples, 512, args.seed, data_dir)
    texts = {"wikitext2": corpus_text("wikitext2", data_dir)}

    def score(model, name):
        start = time.perf_counter()
        r = evaluate_model(model, tokenizer, name, tasks, texts, args.seqlen, data_dir, args.limit, 8, "cpu",
                           args.ppl_windows, progress=False)
        avg = r["averages"].get("evaluated", {}).get("value")
        print(f"{name}: ppl {r['perplexity'][f'wikitext2@{args.seqlen}']:.2f}, avg {avg} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        return r

    results = {} if args.skip_dense else {"dense": score(dense, "dense")}
    rows = [] if args.skip_dense else [_row("dense", 0.0, 0.0, results["dense"], args.seqlen)]
    # (label, PruneConfig fields, calibration, recovery): criteria under uniform allocation, allocation modes
    # under AMP, or recipes
    if args.recipes:
        variants = [_recipe(r, tokenizer, data_dir, args.seed) for r in args.recipes.split(",")]
    else:
        # the allocation tables keep the first-built recipe (dense statistics, no compensation): comparable rows
        variants = [(m, dict(criterion="amp", allocation=m.split("/")[0], heads=m.split("/")[1], sequential=False,
                                compensate="none"),
                     calib, None) for m in args.modes.split(",")] if args.modes else \
            [(c, dict(criterion=c, allocation="uniform"), calib, None) for c in args.criteria.split(",")]
    for ratio in map(float, args.ratios.split(",")):
        for label, fields, cal, recovery in variants:
            model = copy.deepcopy(dense)
            data_free = fields.get("criterion") in ("magnitude", "random")
            start = time.perf_counter()
            report = amp.prune_(model, amp.PruneConfig(ratio=ratio, seed=args.seed, **fields),
                                None if data_free else cal, progress=False)
            prune_s = time.perf_counter() - start
            recovered = None
            if recovery:
                recovered, model = _recover(model, dense, tokenizer, recovery, args, data_dir)
            r = score(model, f"{label}@{ratio}")
            r["prune_notes"] = report["notes"]
            r["prune_seconds"] = round(prune_s, 1)
            r["compensation"] = report["compensation"]
            r["calibration_tokens"] = cal.num_tokens
            r["blocks_ratio"] = round(report["blocks"]["ratio_achieved"], 4)
            if report["allocation"].get("heldout_kl"):
                r["heldout_kl"] = report["allocation"]["heldout_kl"]
            if recovered:
                r["recovery"] = recovered
            r["kept_per_layer"] = [[len(l["kept_heads"]), len(l["kept_kv_heads"]), len(l["kept_neurons"])]
                                   for l in report["layers"]]
            results[f"{label}@{ratio}"] = r
            rows.append(_row(label, ratio, report["ratio_achieved"], r, args.seqlen))
            del model
    name = args.name or ("quality_recovery" if args.recipes else "quality_allocation" if args.modes else "quality")
    reference = variants[0][0] if args.recipes else "uniform/group" if args.modes else "amp"
    summary = _ranking(rows, reference) + [
        f"Calibration: {calib.name}, {len(calib.samples)} samples, {calib.num_tokens} tokens, seed {args.seed}. "
        f"Perplexity: WikiText-2 test, first {args.ppl_windows} windows of {args.seqlen} tokens. " +
        (f"Zero-shot: lm-eval, first {args.limit} rows of each of {', '.join(tasks)}, the same rows for every "
         "model; 'avg' is their mean (acc_norm for piqa and the ARC sets, acc for boolq and winogrande). "
         if tasks else "No zero-shot tasks (--tasks none): perplexity only. ") +
        ("AMP scores; the label is allocation/heads." if args.modes else
         "AMP scores unless the recipe has obs; the label is STEPS@CALIBRATION:SAMPLES (the calibration line above is "
         "the default set, "
         "unused by recipes)." if args.recipes else "Uniform allocation for every criterion.")]
    if args.recipes and any(v[3] for v in variants):
        summary.append(f"Recovery: LoRA r 8 on the attention and MLP projections, Alpaca records (prompt and "
                       f"response; never the evaluation texts), a budget of {args.recover_tokens:,} training "
                       f"tokens per fine-tune (records truncated to {args.recover_seqlen}, batch 8, lr "
                       f"{args.recover_lr:g}); kd = distillation from the dense model (KL on the logits, "
                       "temperature 1, weight 0.5 beside the language-model loss).")
    if tasks:
        summary.append(f"Noise: one task's accuracy on {args.limit} rows has a standard error of up to "
                       f"{100 * (0.25 / args.limit) ** 0.5:.1f} points, the {len(tasks)}-task average up to "
                       f"{100 * (0.25 / args.limit / len(tasks)) ** 0.5:.1f}; differences of average below about "
                       f"{2 * 100 * (0.25 / args.limit / len(tasks)) ** 0.5:.1f} points are within noise.")
    record(name, rows, summary, results_dir=_path(args.out))
    json_path = _path(args.out) / f"{name}.json"
    if json_path.is_file():  # runs of single recipes add up in one file
        earlier = json.loads(json_path.read_text()).get("results", {})
        results = {**earlier, **results}
    json_path.write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    _plot(rows_of(results, args.seqlen), _path(args.out) / f"{name}.png", args)  # every run in the file
    print("\n".join(summary))


_STEPS = {"none": {}, "bias": {"compensate": "bias"}, "refit": {"compensate": "refit"}, "seq": {"sequential": True},
          "depth": {"allocation": "depth"}, "query": {"heads": "query"}, "mult64": {"multiple_of": 64},
          "mult128": {"multiple_of": 128}, "obs": {"criterion": "obs"}, "kl": {"allocation": "kl"},
          "blocks": {"ratio_of": "blocks"}}


def _recipe(text: str, tokenizer, data_dir, seed: int):
    """'bias+refit+seq@c4:64' -> (label, PruneConfig fields, calibration, recovery or None)."""
    import amp
    steps, _, cal = text.partition("@")
    source, _, n = (cal or "alpaca:128").partition(":")
    # every step explicit, from the paper's AMP scores under uniform allocation
    fields, recovery = {"criterion": "amp", "allocation": "uniform", "compensate": "none", "sequential": False}, None
    for step in steps.split("+"):
        if step in ("lora", "kd"):
            recovery = step
        elif step in _STEPS:
            fields.update(_STEPS[step])
        else:
            raise SystemExit(f"unknown recipe step {step!r} in {text!r}")
    if "bias" in steps.split("+") and "refit" in steps.split("+"):
        fields["compensate"] = "bias+refit"
    # the kl allocation measures on windows held back beside the same calibration windows
    key = (source, int(n or 128), 8 if fields.get("allocation") == "kl" else 0)
    if key not in _CALIBRATIONS:
        _CALIBRATIONS[key] = amp.load_calibration(tokenizer, source, key[1], 512, seed, data_dir, holdout=key[2])
    return text, fields, _CALIBRATIONS[key], recovery


_CALIBRATIONS: dict = {}


def fine_tune(model, tokenizer, data_dir, tokens: int = RECOVERY["tokens"], seqlen: int = RECOVERY["seqlen"],
              lr: float = RECOVERY["lr"], teacher=None):
    """`amp recover`'s LoRA fine-tune on Alpaca (distilled from `teacher` when given, weight 0.5), no checkpoints:
    the merged model and the run's figures, with the loss curve in place of the history."""
    from amp import RecoverConfig, recover_model
    config = RecoverConfig(tokens=tokens, seqlen=seqlen, lr=lr, kd_weight=0.5 if teacher is not None else 0.0,
                           checkpoint_every=0)
    result = recover_model(model, tokenizer, config, teacher=teacher, data_dir=data_dir, progress=False)
    merged = result.pop("model")
    result["loss_curve"] = [round(h["loss"], 4) for h in result.pop("history")]
    return merged, result


def _recover(model, dense, tokenizer, kind: str, args, data_dir) -> dict:
    merged, result = fine_tune(model, tokenizer, data_dir, args.recover_tokens, args.recover_seqlen, args.recover_lr,
                               teacher=dense if kind == "kd" else None)
    print(f"  recovery: {result['steps']} steps, {result['tokens']:,} tokens, loss {result['loss_first']:.3f} -> "
          f"{result['loss_last']:.3f}, {result['seconds']:.0f} s", flush=True)
    return result, merged


def _path(p):
    from pathlib import Path
    return Path(p)


def _row(criterion, ratio, achieved, r, seqlen):
    row = {"criterion": criterion, "ratio": ratio, "achieved": round(achieved, 4),
           "wikitext2_ppl": r["perplexity"][f"wikitext2@{seqlen}"]}
    for t in TASKS:
        row[t] = r["tasks"][t][r["metric"][t]] if t in r["tasks"] else ""
    row["avg"] = r["averages"].get("evaluated", {}).get("value", float("nan"))
    return row


def rows_of(results: dict, seqlen: int) -> list[dict]:
    """Table rows from a results file's entries (keyed LABEL@RATIO, or "dense")."""
    rows = []
    for key, r in results.items():
        label, ratio = key.rsplit("@", 1) if "@" in key else (key, "0")
        rows.append(_row(label, float(ratio), float("nan"), r, seqlen))
    return rows


def _ranking(rows, reference: str):
    lines = []
    for ratio in sorted({r["ratio"] for r in rows if r["ratio"]}):
        at = [r for r in rows if r["ratio"] == ratio]
        by_ppl = sorted(at, key=lambda r: r["wikitext2_ppl"])
        by_acc = sorted(at, key=lambda r: -r["avg"] if r["avg"] == r["avg"] else 0)
        names = [r["criterion"] for r in at]
        ppl_rank = " < ".join(f"{r['criterion']} ({r['wikitext2_ppl']:.1f})" for r in by_ppl)
        acc_rank = " > ".join(f"{r['criterion']} ({100 * r['avg']:.1f})" for r in by_acc)
        line = f"At {ratio:.0%}: perplexity ranking {ppl_rank}" + \
            (f"; accuracy ranking {acc_rank}." if all(r["avg"] == r["avg"] for r in at) else " (perplexity only).")
        if reference in names:
            line += f" {reference} is #{[r['criterion'] for r in by_ppl].index(reference) + 1} by perplexity"
            line += (f" and #{[r['criterion'] for r in by_acc].index(reference) + 1} by average accuracy"
                     if all(r["avg"] == r["avg"] for r in at) else "") + f" of {len(at)}."
        lines.append(line)
    return lines


def _plot(rows, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dense = next((r for r in rows if r["criterion"] == "dense"), None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for crit in [c for c in dict.fromkeys(r["criterion"] for r in rows) if c != "dense"]:
        pts = sorted((r["ratio"], r["avg"], r["wikitext2_ppl"]) for r in rows if r["criterion"] == crit)
        ax1.plot([100 * x[0] for x in pts], [100 * x[1] for x in pts], marker="o", label=crit)
        ax2.plot([100 * x[0] for x in pts], [x[2] for x in pts], marker="o", label=crit)
    if dense:
        ax1.axhline(100 * dense["avg"], color="k", ls="--", label="dense")
        ax2.axhline(dense["wikitext2_ppl"], color="k", ls="--", label="dense")
    ax1.set(xlabel="parameters removed (%)", ylabel="average zero-shot accuracy (%)",
            title=f"5 tasks, first {args.limit} rows each")
    ax2.set(xlabel="parameters removed (%)", ylabel="WikiText-2 perplexity (log)", yscale="log",
            title=f"{args.ppl_windows} windows x {args.seqlen} tokens")
    ax1.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct, structured pruning" + (
        " (AMP, allocation/heads)" if args.modes else " (AMP, recipes STEPS@CALIBRATION:SAMPLES)"
        if getattr(args, "recipes", None) else ", uniform allocation"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

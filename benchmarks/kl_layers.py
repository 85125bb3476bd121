"""Where the pruned model's divergence from the dense one comes from, layer by layer, against what the kl
allocation predicted; and what one re-solve with the measured figures buys (a measurement of what a search that
re-measures after its decisions would gain, not an engine mode).

    python -m benchmarks.kl_layers [--model smollm2-135m | gemma3-270m] [--ratio 0.2] [--rounds 1] [--route default]

A zoo model (benchmarks/zoo) pruned in memory with the engine's kl recipe (structured OBS, kl allocation,
sequential statistics, refit; 64 C4 windows of 512 tokens, 8 more held back). `--route kl` (`--allocation kl`)
takes its error curves on the dense model's outputs in an observing pass of its own; `--route default` (the
default prune, `--allocation auto`) takes them on the paper-pruned layers' outputs during the paper's pass
(prune/candidates.py) and measures the model the choice kept. On the held-back windows, the exact KL(dense ||
hybrid) of hybrid models whose first l layers are the pruned ones and the rest dense, for l = 1..L: its increments
are what each pruned layer adds given the pruned layers before it, compounding included, which the allocation's one
solve (each layer's OBS error weighted by the dense model's diagonal output Fisher, errors assumed additive) cannot
see.

A round (--rounds): every layer's error curves are scaled by its measured increment over its predicted one, and the
budget is solved and the model pruned again from the dense one. Each round costs a whole prune and L forward passes
over the held-back windows. Perplexity: WikiText-2 test, --ppl-windows windows of 2,048 tokens.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import contextmanager

import torch

from amp.quality.divergence import log_probs, mean_kl
from benchmarks.harness import record


@contextmanager
def _scaled_curves(scale: list[float] | None):
    """The allocation's error curves of layer i times scale[i] (the engine has no such knob: this is the
    measurement's own, around prune/budget.py's per-layer blocks)."""
    from amp.prune import budget
    original = budget.layer_blocks

    def scaled(index, *args, **kwargs):
        blocks = original(index, *args, **kwargs)
        for block in blocks:
            block.error = [e * scale[index] for e in block.error]
        return blocks

    if scale is not None:
        budget.layer_blocks = scaled
    try:
        yield
    finally:
        budget.layer_blocks = original


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a zoo model (benchmarks/zoo)")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--rounds", type=int, default=1, help="re-solves with the measured increments")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--ppl-windows", type=int, default=20)
    p.add_argument("--ppl-seqlen", type=int, default=2048)
    p.add_argument("--route", choices=("kl", "default"), default="kl",
                   help="kl: --allocation kl (curves on the dense model's outputs); default: the default prune "
                        "(curves on the paper's pass; the kept candidate is measured)")
    p.add_argument("--name", default="kl_layers")
    args = p.parse_args()
    import amp
    from amp.io.calibration import default_data_dir, text_prefix
    from amp.quality.perplexity import corpus_text, perplexity, tokenize_text

    data_dir = default_data_dir()
    from benchmarks import zoo
    dense, tokenizer, _ = amp.load_model(str(zoo.path(args.model)))
    dense.eval()
    calib = amp.load_calibration(tokenizer, "c4", args.nsamples, 512, 0, data_dir, holdout=8)
    held = torch.stack(calib.held_out)
    dense_logp = [log_probs(dense, window) for window in held]
    wiki = tokenize_text(tokenizer, corpus_text("wikitext2", data_dir))
    n_layers = len(dense.model.layers)

    rows, summary, scale = [], [], None
    for round_ in range(args.rounds + 1):
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        with _scaled_curves(scale):
            config = amp.PruneConfig(ratio=args.ratio, seed=0, **({"allocation": "kl"} if args.route == "kl" else {}))
            report = amp.prune_(model, config, calib, progress=False)
        prune_s = time.perf_counter() - start
        if "predicted_kl" not in report["allocation"]:  # the default kept the paper's recipe: nothing predicted
            raise SystemExit(f"the default kept {report['selection']['kept']}'s recipe, which predicts no KL per "
                             "layer: nothing to compare")
        predicted = [sum(pair) for pair in report["allocation"]["predicted_kl"]]
        hybrid, accumulated = copy.deepcopy(dense), [0.0]
        for layer in range(n_layers):
            hybrid.model.layers[layer] = model.model.layers[layer]
            accumulated.append(mean_kl(hybrid, held, dense_logp))
            print(f"round {round_}: layers 0..{layer} pruned: KL {accumulated[-1]:.4f}", flush=True)
        increments = [accumulated[i + 1] - accumulated[i] for i in range(n_layers)]
        ppl = perplexity(model, wiki, args.ppl_seqlen, args.ppl_windows, prefix=text_prefix(tokenizer))["perplexity"]
        kl = accumulated[-1]
        # the allocation's predicted total is in the scaled unit after round 0: compare the dense-Fisher sum
        unscaled = [p / s for p, s in zip(predicted, scale)] if scale else predicted
        summary.append(f"Round {round_}: held-out KL {kl:.4f} (the allocation predicted {sum(unscaled):.4f} "
                       f"before any scaling), WikiText-2 perplexity {ppl:.2f}, prune {prune_s:.0f} s.")
        print(summary[-1], flush=True)
        for i, layer in enumerate(report["layers"]):
            rows.append({"model": args.model, "ratio": args.ratio, "route": args.route, "round": round_, "layer": i,
                         "kept_heads": len(layer["kept_heads"]), "kept_neurons": len(layer["kept_neurons"]),
                         "predicted_kl": round(unscaled[i], 5), "measured_increment": round(increments[i], 5),
                         "measured_over_predicted": round(increments[i] / unscaled[i], 2) if unscaled[i] > 1e-5
                         else "", "accumulated_kl": round(accumulated[i + 1], 5),
                         "heldout_kl": round(kl, 4), "wikitext2_ppl": round(ppl, 2)})
        if round_ < args.rounds:
            ratios = [m / p for m, p in zip(increments, unscaled) if p > 1e-5 and m > 0]
            typical = statistics.median(ratios) if ratios else 1.0
            # a layer that lost nothing predicts nothing: it keeps the typical factor
            factors = [m / p if p > 1e-5 and m > 0 else typical for m, p in zip(increments, unscaled)]
            scale = factors  # the ratio at the allocation just measured, against the dense-Fisher prediction
        del model, hybrid
    route = ("the default prune (--allocation auto: the kl candidate's curves on the paper's pass; the kept "
             "candidate measured)" if args.route == "default" else "--allocation kl (curves on the dense model)")
    summary.append(f"{args.model} at {args.ratio:.0%} with the kl recipe (structured OBS, kl allocation, "
                   f"sequential statistics, refit) by {route}, {args.nsamples} C4 windows of 512 tokens and 8 "
                   "held back; "
                   "KL: mean over the held-back tokens of KL(dense || model); measured_increment: what layer i adds "
                   "when layers 0..i are the pruned ones and the rest dense (exact forward passes); predicted_kl: "
                   "the allocation's figure for the layer's attention and MLP (dense model's diagonal output Fisher "
                   "times the OBS error). Round r > 0: every layer's error curves scaled by its measured / "
                   "predicted factor in the round before (the median factor where a layer lost nothing), the budget "
                   f"solved again and the model pruned again. Perplexity: WikiText-2 test, {args.ppl_windows} "
                   f"windows of {args.ppl_seqlen} tokens.")
    record(args.name, rows, summary)
    print("\n".join(summary))


if __name__ == "__main__":
    main()

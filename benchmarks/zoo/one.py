"""One recipe on one zoo model at one ratio, in this (fresh) process: the prune timed alone, then its KL from the
dense model on the engine's held-back calibration windows, WikiText-2 perplexity, C4 perplexity on documents the
calibration never read and, optionally, zero-shot rows.
Run by benchmarks.zoo.table (one process per row, so that no run inherits another's memory or caches):

    python -m benchmarks.zoo.one JOB.json   (prints `RESULT {...}`)

JOB: model (a zoo name), ratio, recipe (default | paper | optipfair | dense, or a part: engine-kl, obs-uniform,
amp-kl, paper-no-refit, dense-target, or the default with one setting moved: damp-0.001, damp-0.1, widths-32,
widths-1; an engine recipe followed by +lora is that prune and then a LoRA fine-tune, quality.RECOVERY), tasks,
limit, ppl (list of [seqlen, windows]), calibration (optional [corpus, windows, tokens per window]), recover_tokens
(optional, the fine-tune's budget). Calibration as the engine's default run unless given: 64 C4 windows of 512
tokens, seed 0, 8 more held back (drawn after them, so that the 64 are the same for every recipe)."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.quality import RECOVERY, fine_tune

RECIPES = {
    "default": {},                                              # --allocation auto: measured choice
    "paper": {"criterion": "amp", "allocation": "uniform"},     # arXiv 2504.21174's recipe, in the engine
    "engine-kl": {"allocation": "kl"},                          # the engine's own candidate, without the choice
    "dense-target": {"refit_target": "dense"},                  # the default with --refit-target dense
    # the parts, one at a time (what each bought on each model): the engine's criterion under the paper's
    # allocation, and the paper's criterion under the engine's allocation
    "obs-uniform": {"criterion": "obs", "allocation": "uniform"},
    "amp-kl": {"criterion": "amp", "allocation": "kl"},
    "paper-no-refit": {"criterion": "amp", "allocation": "uniform", "compensate": "none"},  # what the refit buys
    # the default with one setting moved (levers measured against the remaining targets): the refit's damping
    # (default 0.01 x the Gram's mean diagonal) and the MLP width multiples (default auto: 256 where it lands)
    "damp-0.001": {"damp": 0.001},
    "damp-0.1": {"damp": 0.1},
    "widths-32": {"mlp_multiple_of": 32},
    "widths-1": {"mlp_multiple_of": 1},
}
# RECIPE+lora: that recipe, then `amp recover`'s LoRA fine-tune at benchmarks.quality's settings (RECOVERY, no
# teacher): what training adds beyond a one-shot prune, and its time


CALIBRATION = ("c4", 64, 512)  # corpus, windows, tokens per window: every row's calibration (8 more held back)
C4_UNSEEN = (1024, 16)  # seqlen, windows of C4 perplexity on documents the calibration never read


def c4_unseen_ids(tokenizer, data_dir, seqlen: int, windows: int, calibrations=(CALIBRATION,)) -> torch.Tensor:
    """Token ids of C4 validation documents past the span the zoo's calibration reads (calibration.unseen_text):
    the calibration's own corpus, on text no prune, Fisher or choice saw. Tells whether a candidate the held-back
    KL prefers is also better in perplexity on its own domain."""
    from amp.io.calibration import chars_read, unseen_text
    from amp.quality.perplexity import tokenize_text
    # the same documents for every row unless a row's calibration reads further (then past it as well)
    widest = max(calibrations, key=lambda c: chars_read(c[1], c[2]))
    return tokenize_text(tokenizer, unseen_text(*widest, data_dir)[: 8 * seqlen * windows])


def parse_recipe(name: str) -> tuple[str, str]:
    """'default+lora' -> ('default', 'lora'); a one-line error for a name the zoo does not run."""
    recipe, _, then = name.partition("+")
    known = recipe in RECIPES or (recipe in ("optipfair", "dense") and not then)
    if not known or then not in ("", "lora"):
        raise SystemExit(f"error: unknown recipe {name!r} (one of {', '.join([*RECIPES, 'optipfair', 'dense'])}; "
                         "an engine recipe may be followed by +lora)")
    return recipe, then


def run(job: dict) -> dict:
    import amp
    from amp.io.calibration import default_data_dir
    from amp.io.models import resolve_model
    from amp.prune.allocate import total_params
    from amp.quality.divergence import log_probs, mean_kl
    from amp.quality.evaluate import evaluate_model
    from amp.quality.perplexity import corpus_text
    from benchmarks import zoo
    recipe, then = parse_recipe(job["recipe"])
    gguf = str(zoo.path(job["model"]))
    data_dir = default_data_dir()
    model, tokenizer, folder = amp.load_model(gguf)
    total = total_params(model)
    calibration = tuple(job.get("calibration") or CALIBRATION)
    calib = amp.load_calibration(tokenizer, *calibration, 0, data_dir, holdout=8)
    dense_logp = [log_probs(model, w) for w in calib.held_out]  # log_probs runs without gradients
    out = {"model": job["model"], "ratio": job["ratio"], "recipe": job["recipe"]}
    if calibration != CALIBRATION:
        out["calibration"] = list(calibration)
    if recipe in RECIPES:
        start = time.perf_counter()
        report = amp.prune_(model, amp.PruneConfig(ratio=job["ratio"], seed=0, **RECIPES[recipe]), calib,
                            progress=False)
        out["prune_seconds"] = round(time.perf_counter() - start, 1)
        out["kept"] = report.get("selection", {}).get("kept", "")
        out["selection"] = report.get("selection")
        shapes = [(len(l["kept_heads"]), len(l.get("kept_neurons", []))) for l in report["layers"]]
        out["kept_shapes"] = shapes
        out["phases"] = {k: v["seconds"] for k, v in report["phases"].items()}
        out["passes"] = {k: v.get("seconds") for k, v in report["memory"].get("passes", {}).items()}
        if then:
            model, out["recovery"] = _recover(model, tokenizer, job.get("recover_tokens", RECOVERY["tokens"]),
                                              data_dir)
    elif recipe == "optipfair":
        from benchmarks.peers import load_peer_model, run_peer
        removed = round(job["ratio"] * total)
        c = model.config
        work = Path(tempfile.mkdtemp(prefix="amp-zoo-peer-"))
        peer_job = {"model": str(resolve_model(gguf)), "out": str(work / "out"), "params": total - removed,
                    "calibration": [s.tolist() for s in calib.samples],
                    "intermediate_size": c.intermediate_size - round(removed / (c.num_hidden_layers * 3 *
                                                                                c.hidden_size))}
        start = time.perf_counter()
        ran = run_peer("optipfair", peer_job)
        out["prune_seconds"] = round(time.perf_counter() - start, 1)
        out["peer_seconds"] = round(ran["seconds"], 1)
        model = load_peer_model(work / "out")
    out["params"] = total_params(model)
    out["ratio_achieved"] = round((total - out["params"]) / total, 5)
    if recipe != "dense":
        out["heldout_kl"] = round(mean_kl(model, calib.held_out, dense_logp), 5)
    texts = {"wikitext2": corpus_text("wikitext2", data_dir)}
    out["perplexity"] = {}
    for seqlen, windows in job["ppl"]:
        r = evaluate_model(model, tokenizer, recipe, [], texts, seqlen, data_dir, None, 8, "cpu", windows, False)
        out["perplexity"][f"{windows}x{seqlen}"] = round(r["perplexity"][f"wikitext2@{seqlen}"], 3)
    from amp.io.calibration import text_prefix
    from amp.quality.perplexity import perplexity
    seqlen, windows = C4_UNSEEN
    unseen = c4_unseen_ids(tokenizer, data_dir, seqlen, windows, (CALIBRATION, calibration))
    r = perplexity(model, unseen, seqlen, windows, prefix=text_prefix(tokenizer))
    out["perplexity"][f"c4_unseen_{windows}x{seqlen}"] = round(r["perplexity"], 3)
    if job.get("tasks"):
        start = time.perf_counter()
        r = evaluate_model(model, tokenizer, recipe, job["tasks"], {}, 1024, data_dir, job["limit"], 8, "cpu", None,
                           False)
        out["tasks"], out["metric"] = r["tasks"], r["metric"]
        out["zero_shot_seconds"] = round(time.perf_counter() - start, 1)
    return out


def _recover(model, tokenizer, tokens: int, data_dir):
    """The pruned model fine-tuned with LoRA (adapters merged) on `tokens` training tokens, and the run's figures
    (its seconds from here: tokenizing the records and merging the adapters included)."""
    start = time.perf_counter()
    model, result = fine_tune(model, tokenizer, data_dir, tokens)
    figures = {"seconds": round(time.perf_counter() - start, 1), "tokens": result["tokens"], "steps": result["steps"],
               "loss_first": round(result["loss_first"], 4), "loss_last": round(result["loss_last"], 4)}
    return model, figures


if __name__ == "__main__":
    result = run(json.loads(Path(sys.argv[1]).read_text()))
    print("RESULT " + json.dumps(result))

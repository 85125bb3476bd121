"""--allocation auto as a choice by measurement (issue 29): the engine's recipe (structured OBS under the kl
allocation, or the given criterion under it) and the paper's (AMP scores, uniform allocation, whole KV groups; the
same calibration, compensation and statistics) are both pruned, each one's KL divergence from the dense model is
measured on the held-back calibration windows (never on an evaluation set), and the lower is kept. The kl
allocation is chosen by a second-order prediction; on a model unlike those it was measured on the prediction can
be wrong (Gemma-3-270M, issue 29), and then the measurement hands back the paper's result instead of a worse one.

Order and costs: the paper's recipe goes first, in one pass over the layers, and the engine's Fisher pass and
error curves ride on it (shares_pass): its Grams, taken for the paper's refit, give the engine's structured-OBS
paths to the per-layer floor as well, before the refit uses them. The engine's candidate then solves its budget
and cuts in one more pass. So the whole prune is the paper's recipe plus one Fisher pass, the paths and one cut
pass, not two passes more (issue 29's time budget: at most 3x the paper's recipe). Its curves are thereby taken
on the inputs the paper-pruned layers pass on rather than the dense model's: the Fisher, the allocation's
yardstick, stays the dense model's, and the engine's own cut re-chooses on its own pruned prefix. Where the
paper's recipe is not one pass (a mixture of experts) or the engine's criterion is neither `obs` nor the paper's
`amp`, each candidate runs its own passes, the engine's first (its Fisher pass keeps the dense states the
paper's reuses). Memory: streamed, each candidate writes its own shards (twice the output on disk for a while),
one layer resident as ever; in memory, the first candidate's pruned layers wait
beside the model while the second prunes it."""
from __future__ import annotations

import copy
import time
from dataclasses import replace

import torch.nn as nn

from .config import PruneConfig

PAPER = "paper"      # AMP scores, uniform allocation: arXiv 2504.21174's recipe
ENGINE = "engine"    # the resolved auto allocation (kl) with the configured criterion


def applies(config: PruneConfig) -> bool:
    """Whether the prune chooses between candidates: --allocation auto that resolved to kl (a criterion that reads
    calibration data); an explicit allocation is taken as given."""
    return config.auto_allocation and config.allocation == "kl"


def paper_config(config: PruneConfig) -> PruneConfig:
    """The paper's recipe with everything else of `config` (calibration, compensation, statistics, widths)."""
    return replace(config, criterion="amp", allocation="uniform", heads="auto")


def label(config: PruneConfig) -> str:
    return f"{config.criterion} + {config.allocation} allocation" + (" (heads: query)" if config.heads == "query"
                                                                    and config.allocation != "uniform" else "")


def shares_pass(config: PruneConfig, moe: bool) -> bool:
    """Whether the engine's Fisher and curves can ride on the paper candidate's one pass: a dense model (the
    paper's recipe prunes a mixture of experts in two passes) and a criterion the shared Grams serve (structured
    OBS chooses from them; `amp` follows the paper's own scores)."""
    return not moe and config.criterion in ("obs", "amp") and paper_config(config).single_pass


def choose(run_one, config: PruneConfig, moe: bool = False) -> tuple[str, dict, dict]:
    """Runs `run_one(name, candidate config, dense_final, side, observed)` -> prune_layers' result for the
    paper's candidate (with the engine's config as `side` where shares_pass) and then the engine's (given what
    the paper's pass observed for it); unshared, the engine's and then the paper's. Returns (the kept name, its
    result, the selection entry for the report). A tie keeps the engine's (fewer choices made by hand)."""
    shared = shares_pass(config, moe)
    # unshared, the engine goes first: its Fisher pass keeps the dense states the paper's then reuses (the paper
    # first would read every layer once more for them)
    order = (PAPER, ENGINE) if shared else (ENGINE, PAPER)
    results, seconds, dense_final, observed = {}, {}, None, None
    for name in order:
        start = time.perf_counter()
        results[name] = run_one(name, config if name == ENGINE else paper_config(config), dense_final,
                                config if shared and name == PAPER else None, observed)
        seconds[name] = time.perf_counter() - start
        dense_final, observed = results[name]["dense_final"], results[name]["observed"]
    paper, engine = results[PAPER], results[ENGINE]
    if engine["first_heldout_kl"] is not None:  # measured in the engine's run, on the same dense logits
        paper["allocation"]["heldout_kl"] = engine["first_heldout_kl"]
    for name, other in ((PAPER, ENGINE), (ENGINE, PAPER)):  # the report's peak by pass covers both prunes
        own, theirs = results[name]["memory"]["passes"], results[other]["memory"]["passes"]
        merged = {(f"{other} {k}" if k in own else k): v for k, v in theirs.items()}
        results[name]["memory"]["passes"] = {**own, **merged}
    kl = {name: r["allocation"]["heldout_kl"]["measured"] for name, r in results.items()}
    kept = PAPER if kl[PAPER] < kl[ENGINE] else ENGINE
    other = PAPER if kept == ENGINE else ENGINE
    held = results[kept]["allocation"]["heldout_kl"]
    entry = {
        "kept": kept,
        "why": (f"its KL from the dense model on the {held['samples']} held-back calibration windows "
                f"({held['tokens']} tokens) is {kl[kept]:.4g} nats per token, against {kl[other]:.4g} for the "
                f"{'paper' if other == PAPER else 'engine'}'s recipe"),
        "candidates": {name: {"recipe": label(config if name == ENGINE else paper_config(config)),
                              "heldout_kl": kl[name], "seconds": round(seconds[name], 1)}
                       for name in (ENGINE, PAPER)},
        "shared": ("the engine's Fisher pass and error curves were taken during the paper's pass, on its Grams "
                   "(its seconds include them); the paper's held-back KL was measured in the engine's run, on the "
                   "same dense logits (the engine's seconds include it)") if shared else None,
    }
    return kept, results[kept], entry


class CopySource:
    """A model held in memory, read without being touched: every load is a fresh copy of the dense layer (the
    first candidate's prune must leave the model for the second)."""
    streamed = False

    def __init__(self, source):
        self.inner = source
        self.model, self.layers = source.model, source.layers
        self.host, self.storage_dtype = source.host, source.storage_dtype
        self.bytes_read, self.size_bytes = 0, None

    def load_layer(self, index: int, device, dtype) -> nn.Module:
        return copy.deepcopy(self.layers[index]).to(device=device, dtype=dtype)

    def release_layer(self, index: int) -> None:
        pass

    def embeddings(self, device, head: bool = False):
        return self.inner.embeddings(device, head)


class LayersSink:
    """Keeps a candidate's pruned layers (on the host, in the stored dtype) until the choice is made."""

    def __init__(self, model, storage_dtype):
        self.model, self.storage_dtype = model, storage_dtype
        self.layers: dict[int, nn.Module] = {}
        self.bytes_written = 0
        self.target = None

    def begin(self, target_config) -> None:
        pass

    def put(self, index: int, layer: nn.Module) -> None:
        self.layers[index] = layer.to(device="cpu", dtype=self.storage_dtype)

    def finish(self, target_config) -> int:
        self.target = target_config
        inside = sum(p.numel() for layer in self.layers.values() for p in layer.parameters())
        outside = sum(p.numel() for p in self.model.parameters()) - \
            sum(p.numel() for layer in self.model.model.layers for p in layer.parameters())
        return inside + outside

    def adopt(self, model_sink) -> None:
        """The kept candidate's layers into the model, and its sizes into the model's config."""
        for index, layer in self.layers.items():
            self.model.model.layers[index] = layer
        model_sink.finish(self.target)

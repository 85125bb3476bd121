"""PruneConfig: every knob of a prune, validated once. The CLI flags map one to one onto its fields."""
from __future__ import annotations

import math

from dataclasses import dataclass, field, replace

from ..common.errors import AmpError
from ..io.safetensors_io import parse_size

CRITERIA = ("amp", "obs", "magnitude", "random", "reversed", "wanda-sp", "flap")
# Criteria that need per-channel input moments, and the one that folds removed channels into a bias.
MOMENT_CRITERIA = ("wanda-sp", "flap")
DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OFFLOADS = ("auto", "device", "host", "disk")
ALLOCATIONS = ("auto", "uniform", "depth", "sensitivity", "kl")
RATIO_OF = ("model", "blocks")  # what --ratio is a share of: the whole model (the paper), or the decoder blocks
HEADS = ("auto", "group", "query")
MOE = ("auto", "experts", "neurons")  # mixture-of-experts granularity, as --heads is for attention
# Criteria that need no calibration data.
DATA_FREE = ("magnitude", "random")
COMPENSATIONS = ("auto", "none", "bias", "refit", "bias+refit")
REFIT_TARGETS = ("pruned", "dense")
# What --compensate auto means for every criterion but flap (whose own method is the bias), decided by
# measurement (benchmarks/results/quality_recovery.md): a refit wherever the calibration set has enough tokens
# per input channel for one (compensate.MIN_TOKENS_PER_CHANNEL), else nothing.
AUTO_REFIT = True


@dataclass(frozen=True)
class PruneConfig:
    ratio: float | None = None       # fraction of the parameters to remove (of the whole model: see ratio_of)
    ratio_of: str = "model"          # model: the whole model's parameters (the paper) | blocks: the decoder blocks'
    iteration: int | None = None     # or: remove this many decoder layers' worth of parameters (paper's flag)
    criterion: str = "obs"           # measured default (docs/quality.md); amp: the paper's scores
    calib: str = "c4"                # c4 | alpaca | wikitext2 | path to .txt / .json / .jsonl (measured default)
    nsamples: int | None = None      # default: 64 windows of a text corpus, 128 prompts of a prompt set
    seqlen: int = 512                # window length for text corpora, truncation length for prompts
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"              # weights as stored and written; auto: the checkpoint's own
    compute_dtype: str = "auto"      # what a resident layer computes in; auto: the stored dtype (float32 on a CPU)
    offload: str = "auto"            # where calibration activations live: auto | device | host | disk
    stream: bool = True              # prune_checkpoint: stream a safetensors checkpoint layer by layer
    max_shard_size: str = "5GB"      # output shards when streaming
    allocation: str = "auto"         # per-layer budgets: uniform | depth | sensitivity | kl (auto: kl wherever the
                                     # criterion reads calibration data, else uniform; measured)
    holdout: int = 8                 # kl: calibration samples held back to measure the output divergence on
    heads: str = "auto"              # GQA: prune whole KV groups or single query heads (auto: group if uniform)
    min_keep: float = 0.1            # per-layer floor: each layer keeps this share of its heads and of its neurons
    depth_range: tuple = (0.5, 1.5)  # depth allocation: the first and last layer's share, times the uniform share
    compensate: str = "auto"         # none | bias | refit | bias+refit (auto: bias for flap, else the measured best)
    damp: float = 0.01               # refit damping, relative to the mean diagonal of the Gram matrix
    refit_target: str = "pruned"     # what a sequential refit fits: pruned (the layer's dense output on the pruned
                                     # model's input) | dense (the dense model's own output, GPTAQ-style)
    sequential: bool | None = None   # calibrate each layer on the outputs of the already-pruned layers
                                     # (default: yes wherever calibration data is used; measured)
    moe: str = "auto"                # MoE layers: auto (the budget decides) | experts (whole) | neurons (per expert)
    multiple_of: int = 1             # kept neurons and attention widths are multiples of this (GEMMs tile well)
    mlp_multiple_of: int | str = "auto"  # MLP and expert widths also multiples of this (llama.cpp quantizes rows in
                                     # blocks of 32, K-quants of 256); auto: the coarsest of allocate.QUANT_BLOCKS
                                     # whose budget lands; 1: as chosen
    # allocation / heads were auto (resolved below): init fields, so that dataclasses.replace carries them (a
    # replaced default config still makes the measured choice of prune/candidates.py)
    auto_allocation: bool = field(default=False, repr=False, compare=False)
    auto_heads: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self):
        if (self.ratio is None) == (self.iteration is None):
            raise AmpError("give exactly one of --ratio and --iteration")
        if self.ratio is not None and not (0.0 < self.ratio < 1.0):
            raise AmpError(f"--ratio must lie strictly between 0 and 1, got {self.ratio}")
        if self.iteration is not None and self.iteration < 1:
            raise AmpError(f"--iteration must be a positive number of layers, got {self.iteration}")
        if self.criterion not in CRITERIA:
            raise AmpError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.compensate not in COMPENSATIONS:
            raise AmpError(f"unknown --compensate {self.compensate!r}; choose one of {', '.join(COMPENSATIONS)}")
        if self.refit_target not in REFIT_TARGETS:
            raise AmpError(f"unknown --refit-target {self.refit_target!r}; choose one of {', '.join(REFIT_TARGETS)}")
        if not (isinstance(self.damp, (int, float)) and self.damp > 0 and self.damp == self.damp):
            raise AmpError(f"--damp must be a positive number, got {self.damp}")
        if self.compensate == "auto" and self.criterion == "flap":
            object.__setattr__(self, "compensate", "bias")
        if self.sequential is None:
            object.__setattr__(self, "sequential", self.criterion not in DATA_FREE)
        if self.sequential and self.criterion in DATA_FREE:
            raise AmpError(f"--sequential recalibrates on pruned outputs; criterion {self.criterion!r} uses no "
                           "calibration data")
        if self.nsamples is not None and self.nsamples < 1:
            raise AmpError(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise AmpError(f"--seqlen must be at least 2, got {self.seqlen}")
        if self.batch_size < 1:
            raise AmpError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.device not in DEVICES:
            raise AmpError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise AmpError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.compute_dtype not in DTYPES:
            raise AmpError(f"unknown compute dtype {self.compute_dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.offload not in OFFLOADS:
            raise AmpError(f"unknown --offload {self.offload!r}; choose one of {', '.join(OFFLOADS)}")
        parse_size(self.max_shard_size)
        if self.allocation not in ALLOCATIONS:
            raise AmpError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.allocation == "auto":  # frozen: resolve through object.__setattr__
            object.__setattr__(self, "auto_allocation", True)
            object.__setattr__(self, "allocation", "kl" if self.criterion not in DATA_FREE else "uniform")
        if self.ratio_of not in RATIO_OF:
            raise AmpError(f"unknown --ratio-of {self.ratio_of!r}; choose one of {', '.join(RATIO_OF)}")
        if self.ratio_of == "blocks" and self.ratio is None:
            raise AmpError("--ratio-of blocks counts --ratio against the decoder blocks; --iteration already counts "
                           "in layers")
        if not isinstance(self.holdout, int) or self.holdout < 1:
            raise AmpError(f"--holdout must be a positive number of calibration samples, got {self.holdout!r}")
        if self.heads not in HEADS:
            raise AmpError(f"unknown --heads {self.heads!r}; choose one of {', '.join(HEADS)}")
        if not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise AmpError(f"--multiple-of must be a positive integer, got {self.multiple_of!r}")
        if self.mlp_multiple_of != "auto" and (not isinstance(self.mlp_multiple_of, int) or self.mlp_multiple_of < 1):
            raise AmpError(f"--mlp-multiple-of must be auto or a positive integer, got {self.mlp_multiple_of!r}")
        if self.moe not in MOE:
            raise AmpError(f"unknown --moe {self.moe!r}; choose one of {', '.join(MOE)}")
        if not 0.0 <= self.min_keep < 1.0:
            raise AmpError(f"--min-keep must lie in [0, 1), got {self.min_keep}")
        lo, hi = self.depth_range
        if not (0 < lo and 0 < hi):
            raise AmpError(f"--depth-range must be two positive factors, got {self.depth_range}")
        if self.allocation in ("sensitivity", "kl") and not self.needs_calibration:
            raise AmpError(f"the {self.allocation} allocation measures on calibration data; criterion "
                           f"{self.criterion!r} uses none")
        if self.heads == "auto":  # frozen: resolve through object.__setattr__
            object.__setattr__(self, "auto_heads", True)
            object.__setattr__(self, "heads", "group" if self.allocation == "uniform" else "query")

    def without_holdout(self) -> "PruneConfig":
        """--allocation auto on a calibration set too small to hold windows back from: uniform allocation."""
        return replace(self, allocation="uniform", heads="auto" if self.auto_heads else self.heads)

    @property
    def width_levels(self) -> tuple:
        """The quantization blocks to try, coarsest first (auto: allocate.QUANT_BLOCKS, of which the prune keeps
        the coarsest whose budget lands; an explicit --mlp-multiple-of: that one)."""
        from .allocate import QUANT_BLOCKS
        return QUANT_BLOCKS if self.mlp_multiple_of == "auto" else (self.mlp_multiple_of,)

    def mlp_multiple(self, width: int, level: int) -> int:
        """What an MLP (or expert) of dense `width` keeps its width a multiple of at `level` (one of
        width_levels): --multiple-of combined with the level's block, or under auto the coarsest block up to it
        that the width holds enough of (allocate.quant_levels)."""
        from .allocate import quant_levels
        step = level if self.mlp_multiple_of != "auto" else max(b for b in quant_levels(width) if b <= level)
        return math.lcm(step, self.multiple_of)

    @property
    def needs_calibration(self) -> bool:
        return self.criterion not in DATA_FREE or self.compensate not in ("none", "auto")

    @property
    def auto_refit(self) -> bool:
        """--compensate auto: refit if the calibration set turns out large enough (decided once it is read)."""
        return self.compensate == "auto" and AUTO_REFIT and self.needs_calibration

    @property
    def refit(self) -> bool:
        return "refit" in self.compensate

    @property
    def bias(self) -> bool:
        return "bias" in self.compensate

    @property
    def paths(self) -> bool:
        """Whether layers are observed through Gram-based paths (prune/obs.py): structured OBS chooses, or the
        KL allocation needs every block's error curve."""
        return self.criterion == "obs" or self.allocation == "kl"

    @property
    def single_pass(self) -> bool:
        """Uniform whole-group pruning knows every shape up front: observe and prune fold into one pass."""
        return self.allocation == "uniform" and self.heads == "group"

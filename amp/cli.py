"""The command line: `amp prune`, `amp recover`, `amp eval`, `amp generate`, `amp info`, `amp export`; parsing and
printing, no logic of its own (every command calls the API below it; AmpError becomes one line and exit 2)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile

from .api import prune_checkpoint
from .export import FORMATS, GGUF_DTYPES, export_checkpoint, padded_structures
from .common.errors import AmpError
from .io.folders import write_json_atomic
from .io.info import describe
from .io.models import silenced_progress
from .prune.config import (ALLOCATIONS, COMPENSATIONS, CRITERIA, DEVICES, DTYPES, HEADS, MOE, OFFLOADS, RATIO_OF,
                           REFIT_TARGETS, PruneConfig)
from .quality.evaluate import evaluate
from .quality.generation import generate_text
from .quality.table import markdown
from .recover.config import RecoverConfig
from .recover.distributed import STRATEGIES, is_main_process
from .recover.run import recover_checkpoint


class _Parser(argparse.ArgumentParser):
    """Usage mistakes get the same one-line error and exit status as every other bad input."""

    def error(self, message):
        print(f"amp: error: {message}", file=sys.stderr)
        sys.exit(2)


def _auto_or_int(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {value!r}") from None


def _prune_parser(sub):
    p = sub.add_parser("prune", help="prune attention heads and MLP neurons with the AMP criterion")
    p.add_argument("model", nargs="?", default=None,
                   help="model folder, .gguf file or cached Hub id (default: bundled SmolLM2-135M-Instruct)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--ratio", type=float, help="fraction of the parameters to remove: of the whole model "
                        "(the paper's convention), or of the decoder blocks with --ratio-of blocks")
    budget.add_argument("--iteration", type=int, help="remove this many decoder layers' worth of parameters")
    p.add_argument("--ratio-of", default="model", choices=RATIO_OF,
                   help="what --ratio counts against: the whole model (embeddings and lm_head included, never "
                        "pruned) or only the decoder blocks, which is what a user of a model with a large "
                        "vocabulary usually means; the report says what a whole-model ratio cost the blocks")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--calib", default="c4", help="c4 | alpaca | wikitext2 | path to .txt/.json/.jsonl (default c4: "
                   "it beats Alpaca prompts on perplexity and zero-shot accuracy, benchmarks/results/quality_recovery.md)")
    p.add_argument("--data-dir", default=None, help="folder holding text/alpaca_5000.json etc. ($AMP_DATA_DIR)")
    p.add_argument("--nsamples", type=int, default=None,
                   help="calibration samples: windows of --seqlen tokens of a text (default 64), or prompts (128)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--criterion", default="obs", choices=CRITERIA,
                   help="obs (default, measured best): structured OBS, the structures whose removal leaves the "
                        "least error after the refit (greedy, from the layer's Gram matrices); magnitude, random, "
                        "reversed, wanda-sp, flap: baselines; amp: the paper's scores")
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="dtype the weights are stored and written in (default: the checkpoint's own)")
    p.add_argument("--compute-dtype", default="auto", choices=DTYPES,
                   help="dtype a resident layer computes in (default: the stored one; float32 on a CPU)")
    p.add_argument("--offload", default="auto", choices=OFFLOADS,
                   help="where calibration activations live (default: decided from free memory)")
    p.add_argument("--no-stream", action="store_true",
                   help="load the whole model into host memory instead of streaming it layer by layer")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (e.g. 5GB, 500MB)")
    p.add_argument("--allocation", default="auto", choices=ALLOCATIONS,
                   help="per-layer budgets: auto (default: for every criterion that reads calibration data, "
                        "the kl allocation and the paper's recipe (amp, uniform) are both pruned and the one with "
                        "the lower KL on the held-back windows is kept; uniform for the data-free ones), uniform "
                        "(the paper), depth (share rising with depth), sensitivity "
                        "(measured output change, one budget solve), kl (every layer's attention and MLP error "
                        "curve from its Gram, weighted by the output Fisher measured on calibration windows: one "
                        "solve in predicted KL divergence from the dense model)")
    p.add_argument("--holdout", type=int, default=8,
                   help="kl allocation: calibration samples held back (besides --nsamples) to measure the "
                        "divergence from the dense model on")
    p.add_argument("--heads", default="auto", choices=HEADS,
                   help="GQA models: prune whole KV groups or single query heads (auto: group when uniform)")
    p.add_argument("--moe", default="auto", choices=MOE,
                   help="mixture-of-experts layers: remove whole experts, expert neurons (the same count in every "
                        "expert of a layer), or let the budget decide (auto)")
    p.add_argument("--multiple-of", type=int, default=1,
                   help="kept neurons per layer (and expert widths), and the attention's width (kept query heads x "
                        "head_dim), are multiples of this, e.g. 64 or 128, so that GEMM shapes tile well")
    p.add_argument("--mlp-multiple-of", default="auto", type=_auto_or_int,
                   help="kept MLP and expert widths are also multiples of this, so that every llama.cpp "
                        "quantization keeps ffn_down's rows (blocks of 32; 256 for K-quants); auto: the coarsest of "
                        "256, 32, 1 whose budget lands within 0.5 %% of the parameters; 1: widths as the budget chose")
    p.add_argument("--min-keep", type=float, default=0.1,
                   help="per-layer floor: every layer keeps at least this share of its heads and of its neurons")
    p.add_argument("--depth-range", default="0.5,1.5",
                   help="depth allocation: first and last layer's share of the budget, times the uniform share")
    p.add_argument("--compensate", default="auto", choices=COMPENSATIONS,
                   help="fold what removed channels carried into o_proj / down_proj: their calibration mean into "
                        "the bias, a damped least-squares refit of the kept columns, or both (auto: bias for "
                        "flap, else the measured default)")
    p.add_argument("--damp", type=float, default=0.01,
                   help="refit damping, relative to the mean diagonal of the input Gram matrix")
    p.add_argument("--refit-target", default="pruned", choices=REFIT_TARGETS,
                   help="what a refit under sequential statistics fits: pruned (default: the layer's dense output "
                        "on the pruned model's input) or dense (the dense model's own output, GPTAQ-style)")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="calibrate each layer on the outputs of the already-pruned layers before it (default: on "
                        "when calibration data is used); --no-sequential: on the dense model's outputs, as the "
                        "paper does")
    p.add_argument("--export", default=None, choices=sorted(FORMATS),
                   help="then export the result for a serving engine (vllm: vLLM, every family; decilm: vLLM / SGLang / "
                        "TensorRT-LLM; gguf: "
                        "llama.cpp) into --export-out (default OUT-FORMAT)")
    p.add_argument("--export-out", default=None, help="where --export writes (default: OUT-decilm / OUT-gguf)")
    p.add_argument("--recover", action="store_true",
                   help="then fine-tune (LoRA, and distillation when --teacher is given) into the same --out")
    _recovery_flags(p, prefix="recover-")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _eval_parser(sub):
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model folder (lm-eval)")
    p.add_argument("model_dir")
    p.add_argument("--tasks", default=None,
                   help="comma list, or 'none' (default: the seven whose data files are present)")
    p.add_argument("--ppl", default=None,
                   help="comma list of corpora, or 'none' (default: wikitext2 and c4 where their files are present)")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window (papers use 2048 or 128)")
    p.add_argument("--max-windows", type=int, default=None, help="cap perplexity windows (default: all; c4 256)")
    p.add_argument("--data-dir", default=None, help="folder with text/ and tasks/ ($AMP_DATA_DIR)")
    p.add_argument("--limit", type=int, default=None, help="first N rows of each task, for quick runs")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--baseline", default=None, help="a dense model folder to compare with")
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--accelerate", action="store_true", help="evaluate through the fused attention and MLP")
    p.add_argument("--backend", default="transformers", choices=("transformers", "vllm"),
                   help="in process (transformers), or lm-eval's vLLM backend on the model (a per-layer result "
                        "is exported to DeciLM first)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM backend: GPUs per model copy")
    p.add_argument("--data-parallel-size", type=int, default=1, help="vLLM backend: model copies")
    p.add_argument("--vllm-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="vLLM backend: the dtype it computes in (auto: the checkpoint's)")
    p.add_argument("--vllm-python", default=None,
                   help="vLLM backend: a Python with vLLM and lm-eval (default: $AMP_VLLM_PYTHON, this one, or "
                        "the environment serve_check --install makes)")
    p.add_argument("--quiet", action="store_true")


def _servable(folder: str, backend: str, stack: contextlib.ExitStack, quiet: bool) -> str:
    """The folder vLLM will load: a per-layer result is exported to DeciLM in a temporary folder first."""
    from pathlib import Path
    config = Path(folder) / "config.json"
    if backend != "vllm" or not config.is_file() or "amp_per_layer" not in json.loads(config.read_text()):
        return folder
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="amp-eval-"))) / "vllm"
    report = export_checkpoint(folder, "vllm", tmp, progress=not quiet)
    form = "DeciLM" if report["vllm_form"] == "decilm" else "amp-vllm plugin"
    print(f"note: {folder} is a per-layer result; vLLM evaluates its --format vllm export ({form} form, "
          f"{padded_structures(report)} padded in, {report['padding_share']:.2%} parameters)")
    return str(tmp)


def cmd_eval(args) -> int:
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise AmpError("--device cuda was asked for, but this machine has no CUDA device")
    tasks = None if args.tasks is None else [] if args.tasks in ("none", "") else \
        [t for t in args.tasks.split(",") if t]  # 'none' as for --ppl: perplexity only
    ppl = None if args.ppl is None else [] if args.ppl in ("none", "") else args.ppl.split(",")
    vllm = dict(tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
                dtype=args.vllm_dtype, vllm_python=args.vllm_python)
    kwargs = dict(tasks=tasks, ppl=ppl, seqlen=args.seqlen, data_dir=args.data_dir, limit=args.limit,
                  batch_size=args.batch_size, device=args.device, max_windows=args.max_windows,
                  progress=not args.quiet, accelerate=args.accelerate, backend=args.backend, vllm=vllm)
    with contextlib.ExitStack() as stack:
        result = evaluate(_servable(args.model_dir, args.backend, stack, args.quiet), **kwargs)
        baseline = evaluate(_servable(args.baseline, args.backend, stack, args.quiet),
                            **{**kwargs, "tasks": list(result["tasks"])}) if args.baseline else None
    if baseline:
        result["baseline"] = baseline
    print(markdown(result, baseline))
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def _generate_parser(sub):
    p = sub.add_parser("generate", help="greedy continuation of a prompt, with tokens/s")
    p.add_argument("model_dir")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--accelerate", action="store_true", help="run the fused attention and MLP (amp.accelerate_)")
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16", "float64"))


def cmd_generate(args) -> int:
    r = generate_text(args.model_dir, args.prompt, args.max_new_tokens, args.accelerate, args.device, args.dtype)
    print(r["text"])
    print(f"[{r['path']}: {r['new_tokens']} new tokens in {r['seconds']:.2f} s = {r['tokens_per_s']:.1f} tokens/s; "
          f"prefill of {r['prompt_tokens']} prompt tokens {r['prefill_s'] * 1000:.0f} ms]")
    return 0


def _recovery_flags(p, prefix: str = ""):
    """The recovery knobs, shared by `amp recover` and `amp prune --recover` (there with a `recover-` prefix
    where a prune flag of the same name exists)."""
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(f"--{prefix}steps", type=int, default=None, help="optimizer steps")
    budget.add_argument(f"--{prefix}epochs", type=float, default=None, help="passes over the data (default 2)")
    budget.add_argument(f"--{prefix}tokens", type=int, default=None, help="a training-token budget")
    p.add_argument(f"--{prefix}data", default="alpaca", help="alpaca | .json / .jsonl / .txt file")
    p.add_argument("--teacher", default=None, help="dense model to distill from (KL on the logits)")
    p.add_argument("--kd-weight", type=float, default=0.5, help="weight of the KL term (LM loss: 1 - w)")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (0: deterministic)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(f"--{prefix}seqlen", type=int, default=256, help="records are truncated to this many tokens")
    p.add_argument(f"--{prefix}batch-size", type=int, default=8)
    p.add_argument("--max-records", type=int, default=None, help="use this many records of the data")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (0: never)")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="one process, data-parallel or fully sharded; auto follows the launcher (accelerate "
                        "launch / torchrun: FSDP when accelerate's config asks for it, else DDP)")
    p.add_argument("--teacher-on-each-rank", action="store_true",
                   help="under FSDP: keep a whole teacher on every rank instead of sharding it")


def _recover_config(args, prefix: str = ""):
    get = lambda name: getattr(args, (prefix + name).replace("-", "_"))  # noqa: E731
    return RecoverConfig(data=get("data"), steps=get("steps"), epochs=get("epochs"), tokens=get("tokens"),
                         lora_r=args.lora_r, lora_dropout=args.lora_dropout, lr=args.lr, seqlen=get("seqlen"),
                         batch_size=get("batch-size"),
                         kd_weight=args.kd_weight, temperature=args.temperature, max_records=args.max_records,
                         checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device,
                         strategy=args.strategy, shard_teacher=not args.teacher_on_each_rank)


def _export_parser(sub):
    p = sub.add_parser("export", help="write a model folder in the form a serving engine loads (vllm: a plain "
                                      "checkpoint, DeciLM or the amp-vllm plugin's form; decilm: vLLM, SGLang, "
                                      "TensorRT-LLM; gguf: llama.cpp)")
    p.add_argument("model_dir")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--out", required=True, help="output folder (appears only when complete)")
    p.add_argument("--gguf-dtype", default="f16", choices=GGUF_DTYPES,
                   help="GGUF tensor type; q8_0, q6_k, q5_k_m, q4_k_m, q4_0 are quantized by llama.cpp's own quantizer "
                        "(llama-cpp-python)")
    p.add_argument("--llama-cpp-python", default=None,
                   help="a Python that imports llama_cpp, for the quantized GGUF types (default: this one, "
                        "AMP_LLAMA_CPP_PYTHON, or the runtime environment serve_check installs)")
    p.add_argument("--against-dense", action="store_true",
                   help="GGUF: also export the dense model the folder was pruned from the same way, and report both "
                        "file sizes")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")


def _print_export(report: dict, out) -> None:
    print(f"exported {report['source']} as {report['format']} to {out}: {padded_structures(report)} padded in, "
          f"{report['params_added_by_padding']:,} parameters ({report['padding_share']:.2%} of the model)")
    for note in report["notes"]:
        print(f"note: {note}")
    held = report.get("gguf")
    if held:
        by_bytes = sorted(held["types"].items(), key=lambda kv: -kv[1]["bytes"])
        types = ", ".join(f"{k} {v['tensors']}" for k, v in by_bytes)
        line = f"{report['dtype'].upper()}: {held['file_bytes'] / 1e6:.1f} MB (tensors by type: {types})"
        if "dense" in report:
            line += f"; the dense model the same way: {report['dense']['file_bytes'] / 1e6:.1f} MB " \
                    f"({report['size_vs_dense']:.2f}x)"
        print(line)
    form = report.get("vllm_form")
    how = {"decilm": f"vllm serve {out} --trust-remote-code", "gguf": f"llama-cli -m {out}/model.gguf",
           "vllm": f"vllm serve {out}" + (" --trust-remote-code" if form == "decilm" else "")}
    if form == "plugin":
        print(f"install the vLLM plugin into vLLM's environment once: {report['plugin_install']}")
    print(f"serve it: {how[report['format']]}")


def cmd_export(args) -> int:
    report = export_checkpoint(args.model_dir, args.format, args.out, overwrite=args.overwrite,
                               progress=not args.quiet, dtype=args.gguf_dtype if args.format == "gguf" else None,
                               llama_cpp_python=args.llama_cpp_python, against_dense=args.against_dense)
    _print_export(report, args.out)
    return 0


def _recover_parser(sub):
    p = sub.add_parser("recover", help="LoRA fine-tuning (optionally distilled from the dense model) of a pruned "
                                       "model, merged into its weights")
    p.add_argument("pruned_dir")
    p.add_argument("--out", required=True, help="output folder (appears only when the run is complete)")
    _recovery_flags(p)
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="training dtype (auto: fp32 CPU, bf16 CUDA)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")


def _print_recovery(r: dict, out) -> None:
    print(f"recovered: {r['steps']} steps, {r['tokens']:,} tokens, loss {r['loss_first']:.3f} -> "
          f"{r['loss_last']:.3f} ({'distilled, ' if r['teacher'] else ''}LoRA r {r['lora_r']}), "
          f"{r['seconds']:.0f} s, peak host RSS {r['peak_rss_mb'] or 0:,.0f} MB; written to {out} "
          "(loss curve: recovery_loss.png)")


def cmd_recover(args) -> int:
    report = recover_checkpoint(args.pruned_dir, args.out, _recover_config(args), args.teacher,
                                data_dir=args.data_dir, overwrite=args.overwrite, resume=args.resume,
                                progress=not args.quiet, dtype=args.dtype)
    if is_main_process():
        _print_recovery(report["recovery"], args.out)
    return 0


def _info_parser(sub):
    p = sub.add_parser("info", help="print structure and parameter counts of a model folder")
    p.add_argument("folder")


def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise AmpError(f"--depth-range must be two numbers such as 0.5,1.5, got {text!r}") from None
    return lo, hi


def cmd_prune(args) -> int:
    config = PruneConfig(ratio=args.ratio, iteration=args.iteration, criterion=args.criterion, calib=args.calib,
                         nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, seed=args.seed,
                         device=args.device, dtype=args.dtype, compute_dtype=args.compute_dtype,
                         offload=args.offload, stream=not args.no_stream, max_shard_size=args.max_shard_size,
                         allocation=args.allocation, heads=args.heads, min_keep=args.min_keep,
                         depth_range=_pair(args.depth_range), compensate=args.compensate, damp=args.damp,
                         refit_target=args.refit_target,
                         sequential=args.sequential, moe=args.moe,
                         multiple_of=args.multiple_of, mlp_multiple_of=args.mlp_multiple_of,
                         ratio_of=args.ratio_of, holdout=args.holdout)
    recovery = _recover_config(args, prefix="recover-") if args.recover else None
    if not args.recover and args.teacher:
        raise AmpError("--teacher is a recovery flag: add --recover")
    export_out = args.export_out or (f"{str(args.out).rstrip('/')}-{args.export}" if args.export else None)
    if args.export:  # checked before the prune: a taken export folder must not cost a whole prune
        from .io.folders import check_output
        check_output(export_out, args.overwrite)
    report = prune_checkpoint(args.model, config, args.out, overwrite=args.overwrite, data_dir=args.data_dir,
                              progress=not args.quiet, recover=recovery, teacher=args.teacher)
    if not is_main_process():  # under a launcher (prune --recover) rank 0 speaks and exports
        return 0
    pl = report["per_layer"]
    blocks = report["blocks"]
    asked = f"asked {report['ratio_target']:.2%}" + (" of the blocks" if report["ratio_of"] == "blocks" else "")
    print(f"pruned {report['model']} with {report['criterion']}: "
          f"{report['params_before']:,} -> {report['params_after']:,} parameters, "
          f"ratio {report['ratio_achieved']:.2%} of the model, {blocks['ratio_achieved']:.2%} of the decoder "
          f"blocks ({asked})")
    kl = report["allocation"].get("heldout_kl")
    if "selection" in report:
        chosen = report["selection"]
        print(f"allocation auto kept the {chosen['kept']} recipe "
              f"({chosen['candidates'][chosen['kept']]['recipe']}): {chosen['why']}")
    elif kl:
        print(f"divergence from the dense model on {kl['samples']} held-back samples ({kl['tokens']:,} tokens): "
              f"KL {kl['measured']:.4g} nats per token" +
              (f" (predicted by the allocation: {kl['predicted']:.4g})" if kl.get("predicted") else ""))
    if report["allocation"]["method"] == "uniform" and report["allocation"]["heads"] == "group":
        print(f"per layer: heads {pl['heads'][0]} -> {pl['heads'][1]}, kv heads {pl['kv_heads'][0]} -> "
              f"{pl['kv_heads'][1]}, neurons {pl['neurons'][0]} -> {pl['neurons'][1]}")
    else:
        heads = [len(layer["kept_heads"]) for layer in report["layers"]]
        neurons = [len(layer["kept_neurons"]) for layer in report["layers"] if "kept_neurons" in layer]
        print(f"per layer ({report['allocation']['method']}, {report['allocation']['heads']} heads): query heads "
              f"{' '.join(map(str, heads))} of {pl['heads'][0]}" +
              (f"; neurons {min(neurons)}..{max(neurons)} of {pl['neurons'][0]}" if neurons else ""))
    if "moe" in report:
        moe = report["moe"]
        experts = [len(layer["kept_experts"]) for layer in report["layers"] if "kept_experts" in layer]
        widths = [len(layer["kept_expert_neurons"][0]) for layer in report["layers"] if "kept_experts" in layer]
        before, after = moe["active_params_per_token"]
        print(f"experts ({moe['mode']}): {' '.join(map(str, experts))} of {moe['experts'][0]} per MoE layer, width "
              f"{min(widths)}..{max(widths)} of {moe['expert_width'][0]}; parameters active per token {before:,} -> "
              f"{after:,} ({moe['experts_per_token']} experts per token)")
    cal = report["calibration"]
    if cal["used"]:
        comp = report["compensation"]
        how = "sequential" if comp["sequential"] else "dense"
        print(f"calibration: {cal['source']}, {cal['samples']} samples, {cal['tokens']:,} tokens ({how} "
              f"statistics); compensation: {comp['mode']}" + (
                  f", o_proj error {comp['o_error_before']:.3f} -> {comp['o_error_after']:.3f}, down_proj "
                  f"{comp['down_error_before']:.3f} -> {comp['down_error_after']:.3f} (relative, on calibration)"
                  if "down_error_after" in comp else ""))
    phases = ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in report["phases"].items())
    print(f"time: {phases}; written to {args.out}")
    mem = report["memory"]
    peak = max(v.get("peak_rss_mb", 0) for v in report["phases"].values())
    line = (f"memory: {'streamed' if mem['streamed'] else 'in memory'}, peak host RSS {peak:,.0f} MB, "
            f"read {mem['bytes_read'] / 2**20:,.0f} MB, wrote {mem['bytes_written'] / 2**20:,.0f} MB; "
            f"computed in {report['dtype']['computed']}")
    if mem["offload"]:
        line += f"; activations on {mem['offload']['where']} ({mem['offload']['why']})"
    print(line)
    if mem.get("passes"):
        print("peak host RSS by pass: " + ", ".join(f"{k} {v['peak_rss_mb']:,.0f} MB" for k, v in mem["passes"].items())
              + (f"; kept of every layer until the budget solve: {mem['kept_bytes'] / 2**10:,.0f} KiB in all"
                 if "kept_bytes" in mem else ""))
    for note in report["notes"]:
        print(f"note: {note}")
    if "recovery" in report:
        _print_recovery(report["recovery"], args.out)
    if args.export:
        _print_export(export_checkpoint(args.out, args.export, export_out, overwrite=args.overwrite,
                                        progress=not args.quiet), export_out)
    print(f"measure what it kept: amp eval {args.out} --baseline {report['model_path']}")
    return 0


def cmd_info(args) -> int:
    print(describe(args.folder))
    return 0


def main(argv=None) -> int:
    # Nothing this tool does may reach the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = _Parser(prog="amp", description="AMP structured pruning for decoder-only LLMs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _prune_parser(sub)
    _info_parser(sub)
    _eval_parser(sub)
    _generate_parser(sub)
    _recover_parser(sub)
    _export_parser(sub)
    args = parser.parse_args(argv)
    try:
        with silenced_progress(getattr(args, "quiet", False)):
            return _run(args)
    except AmpError as e:
        print(f"amp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("amp: interrupted; nothing was written", file=sys.stderr)
        return 130


def _run(args) -> int:
    return {"prune": cmd_prune, "info": cmd_info, "eval": cmd_eval, "generate": cmd_generate,
            "recover": cmd_recover, "export": cmd_export}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

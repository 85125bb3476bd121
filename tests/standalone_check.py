"""Run in a subprocess by tests/test_standalone.py: loads per-layer model folders in plain transformers with the
engine hidden (no `amp`, no `amp_kernels` importable), as a user without the engine installed would, and saves
what it computed. Argument: a JSON job {"folders": {name: path}, "ids": path, "out": path, "lm_eval": name|null}."""
import json
import sys
import tempfile


class _HideEngine:
    """An import of the engine's packages fails, whatever sys.path holds (an editable install included)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("amp", "amp_kernels"):
            raise ModuleNotFoundError(f"{name} is hidden from this check")
        return None


sys.meta_path.insert(0, _HideEngine())

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def _without_trust(folder: str) -> str:
    try:
        AutoModelForCausalLM.from_pretrained(folder)
    except Exception as e:  # what a user sees without trust_remote_code
        return f"{type(e).__name__}: {e}"
    return "loaded"


def _lora(model, ids) -> dict:
    """peft's LoRA on every linear layer: trains a step, and merged it gives the adapted model's logits."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  exclude_modules=["lm_head"], init_lora_weights=False))
    peft_model.train()
    loss = peft_model(ids, labels=ids).loss
    loss.backward()
    grads = sum(int(p.grad is not None) for n, p in peft_model.named_parameters() if "lora_" in n)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    return {"lora_grads": grads, "lora_merge_error": float((adapted - merged).abs().max())}


def _lm_eval(folder: str, model) -> dict:
    """lm-eval's `hf` backend on the folder (trust_remote_code), against the log-likelihood computed here."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=folder, trust_remote_code=True, batch_size=1, device="cpu", dtype="float32")
    context, continuation = "The cat sat on the", " mat"
    [(got, _)] = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    whole = tokenizer(context + continuation, return_tensors="pt").input_ids
    n = len(tokenizer(context).input_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(whole).logits[0, :-1].double(), -1)
    want = float(logp[torch.arange(n - 1, whole.shape[1] - 1), whole[0, n:]].sum())
    return {"lm_eval": got, "lm_eval_direct": want, "lm_eval_class": type(lm.model).__name__}


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    ids = torch.load(job["ids"])
    results = {}
    for name, folder in job["folders"].items():
        entry = {"without_trust": _without_trust(folder)}
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        entry["class"] = f"{type(model).__module__}.{type(model).__name__}"
        entry["params"] = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            entry["logits"] = model(ids).logits
        with tempfile.TemporaryDirectory() as again:  # save_pretrained round trip, loaded back the same way
            model.save_pretrained(again)
            copy = AutoModelForCausalLM.from_pretrained(again, trust_remote_code=True, dtype=torch.float32).eval()
            with torch.no_grad():
                entry["resaved_logits"] = copy(ids).logits
            entry["resaved_config"] = json.loads(open(f"{again}/config.json").read())
        if name == job.get("lm_eval"):
            entry.update(_lm_eval(folder, model))
        entry.update(_lora(model, ids))
        results[name] = entry
    results["_engine_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("amp", "amp_kernels"))
    torch.save(results, job["out"])


if __name__ == "__main__":
    main()

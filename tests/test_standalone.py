"""Per-layer results load in plain transformers: every family's per-layer folder (MoE included) carries
modeling_amp.py and names it in auto_map, and a Python that cannot import the engine loads it with
trust_remote_code=True (tests/standalone_check.py, in a subprocess), gets the engine loader's logits, saves it
back whole, trains LoRA on it and evaluates it through lm-eval's hf backend; without trust_remote_code it stops
at transformers' own message. Uniform results stay plain checkpoints of their family."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import amp
from amp.runtime import modeling_amp, per_layer
from tiny_models import FAMILIES, MOE_FAMILIES, make_tiny, save_tiny

HERE = Path(__file__).resolve().parent
TEXT_CALIB = dict(calib="wikitext2", nsamples=4, seqlen=32, batch_size=3)
ALL = sorted(FAMILIES) + sorted(MOE_FAMILIES)


def _ids():
    return torch.randint(2, 258, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, data_dir):
    """Every family pruned to per-layer shapes with uneven query-head groups (depth budgets, query heads)."""
    root = tmp_path_factory.mktemp("standalone")
    folders = {}
    for family in ALL:
        src = save_tiny(make_tiny(family), root / f"{family}-dense")
        config = amp.PruneConfig(ratio=0.3, allocation="depth", heads="query", **TEXT_CALIB)
        amp.prune_checkpoint(str(src), config, root / family, data_dir=data_dir, progress=False)
        folders[family] = root / family
    return folders


def run_outside(folders: dict, ids: torch.Tensor, work: Path, lm_eval: str | None = None) -> dict:
    """What a Python that cannot import the engine computes on each folder (tests/standalone_check.py)."""
    torch.save(ids, work / "ids.pt")
    job = {"folders": {k: str(v) for k, v in folders.items()}, "ids": str(work / "ids.pt"), "out": str(work / "out.pt"),
           "lm_eval": lm_eval}
    (work / "job.json").write_text(json.dumps(job))
    # PYTHONPATH kept (an older transformers overlaid by benchmarks/compat_transformers); the check hides the engine
    done = subprocess.run([sys.executable, str(HERE / "standalone_check.py"), str(work / "job.json")], cwd=work,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(work / "out.pt", weights_only=False)


@pytest.fixture(scope="module")
def outside(pruned, tmp_path_factory):
    """What a Python without the engine computed on every folder."""
    return run_outside(pruned, _ids(), tmp_path_factory.mktemp("outside"), lm_eval="llama_gqa")


@pytest.mark.parametrize("family", ALL)
def test_a_per_layer_folder_loads_in_plain_transformers(family, pruned, outside):
    folder = pruned[family]
    config = json.loads((folder / "config.json").read_text())
    assert config[per_layer.KEY] and any(per_layer.is_uneven(e) or e != config[per_layer.KEY][0]
                                         for e in config[per_layer.KEY])
    assert config["model_type"].startswith(modeling_amp.PREFIX)
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert (folder / per_layer.MODELING_FILE).read_bytes() == Path(modeling_amp.__file__).read_bytes()
    assert outside["_engine_imported"] == []
    got = outside[family]
    # without trust_remote_code: transformers' own message, not a size-mismatch report
    assert "custom code" in got["without_trust"] and "trust_remote_code=True" in got["without_trust"]
    assert "size" not in got["without_trust"].split("custom code")[0]
    assert got["class"].endswith(f".{config['architectures'][0]}") and got["class"].startswith("transformers_modules")
    model, _, report = amp.load_pruned(folder)  # the engine's own loader, as before
    assert got["params"] == report["params_after"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        want = model(_ids()).logits
    torch.testing.assert_close(got["logits"], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got["resaved_logits"], want, rtol=0, atol=1e-5)
    assert got["resaved_config"]["auto_map"] == config["auto_map"]
    assert got["resaved_config"]["model_type"] == config["model_type"]
    assert got["lora_grads"] > 0 and got["lora_merge_error"] < 1e-4


def test_lm_eval_hf_backend_evaluates_a_per_layer_folder(outside):
    got = outside["llama_gqa"]
    assert got["lm_eval_class"] == "LlamaForCausalLM"
    assert got["lm_eval"] == pytest.approx(got["lm_eval_direct"], abs=1e-4)


def test_the_engine_loads_a_folder_saved_back_by_plain_transformers(pruned, tmp_path):
    """A folder written by a model loaded through the engine's registration stays whole (save_pretrained copies
    modeling_amp.py itself)."""
    model, tokenizer, _ = amp.load_pruned(pruned["mixtral_moe"])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "amp_mixtral" and (tmp_path / per_layer.MODELING_FILE).is_file()
    again, _, _ = amp.load_pruned(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(_ids()).logits, model(_ids()).logits, rtol=0, atol=0)


def test_uniform_results_stay_plain_checkpoints_of_their_family(tmp_path, data_dir):
    src = save_tiny(make_tiny("qwen2_gqa"), tmp_path / "dense")
    out = tmp_path / "uniform"
    amp.prune_checkpoint(str(src), amp.PruneConfig(ratio=0.3, criterion="amp", allocation="uniform", **TEXT_CALIB),
                         out, data_dir=data_dir, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "auto_map" not in config and per_layer.KEY not in config
    assert not (out / per_layer.MODELING_FILE).exists()


def test_the_modelling_file_imports_only_torch_and_transformers():
    tree = ast.parse(Path(modeling_amp.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import would not travel with the folder"
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "importlib", "torch", "transformers"}, imported


def test_every_family_the_engine_prunes_has_a_per_layer_form():
    from amp.arch import SPECS
    served = {(module, layer, model) for spec in SPECS for module, layer, model in spec.hf}
    known = {(m, layer, model) for m, _, _, layer, model in modeling_amp.FAMILIES.values()}
    assert served <= known
    classes = {cls for spec in SPECS for cls in spec.classes}
    assert classes <= {names[2] for names in modeling_amp.FAMILIES.values()}

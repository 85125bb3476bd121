"""The default prune (structured OBS under the kl allocation) streamed in one layer's memory: what it keeps from one
layer to the budget solve does not grow with the layer count, Grams are consumed in place or wait on disk while a
path runs (never two matrices of their size beside each other), and none of it changes what the prune decides."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import amp
from amp.io.activations import ActivationStore
from amp.prune import compensate, obs
from tiny_models import save_tiny

DEFAULT_CALIB = dict(calib="wikitext2", nsamples=16, seqlen=32, batch_size=4)  # 8 windows left after the holdout


def _checkpoint(folder, layers: int):
    config = LlamaConfig(vocab_size=258, hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    return save_tiny(LlamaForCausalLM(config).eval(), folder)


def _peak_rss(src, out, data_dir) -> tuple[int, str]:
    """Peak resident memory (the kernel's ru_maxrss) of `amp prune` with the default recipe in a fresh process."""
    cmd = [sys.executable, "-m", "amp.cli", "prune", str(src), "--ratio", "0.1", "--out", str(out), "--calib",
           "wikitext2", "--nsamples", "16", "--seqlen", "32", "--data-dir", str(data_dir), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read()
    return usage.ru_maxrss * 1024, proc.stdout.read()


def test_the_default_prune_peak_does_not_grow_with_the_layer_count(tmp_path, data_dir):
    """2 and 4 layers of the same shape: the peak differs by less than one layer (fp32, 63 MB; each down_proj
    Gram is 134 MB, so keeping one per layer, or its inverse, would show twice over), and the report's kept state
    is a few hundred floats per block, a small fraction of a layer. The least of two runs each: the allocator's
    state moves a process's peak by a few tens of MB from run to run."""
    layer_bytes = 4 * (2 * 1024 * 1024 + 2 * 1024 * 512 + 3 * 1024 * 4096 + 2 * 1024)
    peaks, reports = {}, {}
    for layers in (2, 4):
        src = _checkpoint(tmp_path / f"dense{layers}", layers)
        runs = [_peak_rss(src, tmp_path / f"out{layers}-{k}", data_dir) for k in range(2)]
        peaks[layers], out = min(r[0] for r in runs), runs[0][1]
        assert "peak host RSS by pass: calibration" in out and "fisher" in out and "curves" in out
        reports[layers] = amp.load_pruned(tmp_path / f"out{layers}-0")[2]
    for layers, report in reports.items():
        assert report["allocation"]["method"] == "kl" and report["criterion"] == "obs"
        memory = report["memory"]
        # both candidates' passes: the paper's (the Fisher pass, and its cut carrying the kl candidate's curves)
        # and the kept kl candidate's own
        assert set(memory["passes"]) >= {"calibration", "fisher", "cut + curves", "solve", "cut", "divergence"}
        assert memory["kept_bytes_per_layer"] < 0.02 * layer_bytes, memory
        assert memory["kept_bytes"] <= layers * memory["kept_bytes_per_layer"]
    assert abs(peaks[4] - peaks[2]) < layer_bytes, (peaks, layer_bytes)


def test_a_gram_waiting_on_disk_gives_the_prune_a_copy_gives(tmp_path, data_dir, monkeypatch):
    """A refit after the paths: streamed, the Grams wait in the staging folder (read back in small blocks here);
    in memory (no staging folder), the paths take copies. The same keep sets and weights, and no file left."""
    monkeypatch.setattr(obs, "SPILL_ROWS", 100)
    reads = []
    fromfile = obs.numpy.fromfile
    monkeypatch.setattr(obs.numpy, "fromfile", lambda *a, **k: reads.append(1) or fromfile(*a, **k))
    src = _checkpoint(tmp_path / "dense", 2)
    config = amp.PruneConfig(ratio=0.2, compensate="refit", **DEFAULT_CALIB)
    streamed = amp.prune_checkpoint(str(src), config, tmp_path / "s", data_dir=data_dir, progress=False)
    assert reads, "no Gram waited on disk"
    assert not [p for p in (tmp_path / "s").iterdir() if p.suffix == ".bin"]
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    calibration = amp.load_calibration(amp.load_pruned(src)[1], "wikitext2", 16, 32, data_dir=data_dir, holdout=8)
    before = len(reads)
    in_memory = amp.prune_(model, dataclasses.replace(config, stream=False), calibration, progress=False)
    assert len(reads) == before  # no staging folder: copies
    assert streamed["layers"] == in_memory["layers"]
    assert streamed["allocation"]["heldout_kl"] == in_memory["allocation"]["heldout_kl"]
    pruned = amp.load_pruned(tmp_path / "s")[0]
    for a, b in zip(pruned.model.layers, model.model.layers):
        torch.testing.assert_close(a.mlp.down_proj.weight, b.mlp.down_proj.weight)
        torch.testing.assert_close(a.self_attn.o_proj.weight, b.self_attn.o_proj.weight)


@pytest.mark.parametrize("width", [1, 4])
def test_plain_path_consuming_the_gram_equals_the_copy(width):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 24, generator=g, dtype=torch.float64)
    w = torch.randn(5, 24, generator=g, dtype=torch.float64)
    gram = x.T @ x
    kept = obs.plain_path(w, gram, width, 4, step=2)
    assert torch.equal(gram, x.T @ x)  # untouched
    consumed = obs.plain_path(w, gram, width, 4, step=2, consume=True)
    assert consumed.order == kept.order and consumed.errors == pytest.approx(kept.errors)
    assert not torch.equal(gram, x.T @ x)  # it held M in G's storage


def test_the_gram_is_summed_a_block_at_a_time(monkeypatch):
    monkeypatch.setattr(compensate, "BLOCK", 5)
    x = torch.randn(30, 13)
    gram = compensate.Gram.zeros(13, "cpu")
    gram.add(x[:17])
    gram.add(x[17:])
    each = [(part.T @ part).double() for part in (x[:17], x[17:])]  # each batch's product in fp32, as before
    torch.testing.assert_close(gram.matrix, each[0] + each[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gram.matrix, x.double().T @ x.double(), rtol=1e-5, atol=1e-5)
    assert gram.count == 30


def test_two_activation_stores_on_disk_share_a_folder(tmp_path):
    a = ActivationStore([(2, 3)], torch.float32, "disk", torch.device("cpu"), tmp_path)
    b = ActivationStore([(2, 3)], torch.float32, "disk", torch.device("cpu"), tmp_path)
    a.put(0, torch.ones(2, 3))
    b.put(0, torch.zeros(2, 3))
    assert a.get(0).sum() == 6 and a.path != b.path
    b.close()
    assert a.get(0).sum() == 6 and a.path.exists()
    a.close()
    assert not list(tmp_path.iterdir())

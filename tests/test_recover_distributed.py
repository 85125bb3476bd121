"""Recovery across processes on the CPU (gloo): two processes under torchrun, data-parallel and fully sharded,
against one process with the same global batch; an interrupted two-process run resumes bit-exactly, and with
another process count resumes at the same step.

Tolerance (fp32, LoRA dropout 0): a loss or a weight may differ by summation order only (the gradient of a global
batch is summed per rank, then across ranks), so 1e-5 relative on losses and 1e-5 absolute on merged weights."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from amp.cli import main
from amp.recover.checkpoints import checkpoint_path
from test_recover import _data, _folder

STEPS = 30
ARGS = ["--steps", str(STEPS), "--batch-size", "4", "--lr", "5e-3", "--lora-dropout", "0", "--quiet"]


def _records(tmp_path):
    words = "cat dog sun sky red blue one two six ten hat map cup pen box key".split()
    return _data(tmp_path, [{"instruction": f"Repeat {w} {i}", "input": "", "output": f"{w} " * (2 + i % 5)}
                            for i, w in enumerate(words)])


def _launch(argv, procs=2, wait=True):
    """amp under torchrun: `procs` processes on this machine with the gloo backend."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "amp.cli", *argv]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _losses(folder):
    return [h["loss"] for h in json.loads((Path(folder) / "recovery_log.json").read_text())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    pruned, data = _folder(tmp), _records(tmp)
    outs = {k: tmp / k for k in ("single", "ddp", "fsdp", "fsdp_whole_teacher")}
    teach = ["--teacher", str(pruned), "--kd-weight", "0.5"]    # self-distillation: the KL grows as it learns
    assert main(["recover", str(pruned), "--out", str(outs["single"]), "--data", str(data), *ARGS, *teach]) == 0
    proc = _launch(["recover", str(pruned), "--out", str(outs["ddp"]), "--data", str(data), *ARGS, *teach,
                    "--strategy", "ddp", "--checkpoint-every", "5"])
    _launch(["recover", str(pruned), "--out", str(outs["fsdp"]), "--data", str(data), *ARGS, *teach,
             "--strategy", "fsdp"])
    _launch(["recover", str(pruned), "--out", str(outs["fsdp_whole_teacher"]), "--data", str(data), *ARGS, *teach,
             "--strategy", "fsdp", "--teacher-on-each-rank"])
    return tmp, pruned, data, outs, proc


def test_ddp_follows_the_single_process_loss_curve(runs):
    _, _, _, outs, proc = runs
    single, ddp = _losses(outs["single"]), _losses(outs["ddp"])
    assert len(single) == len(ddp) == STEPS
    assert single[-1] < single[0]                            # it learned something
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), rtol=1e-5, atol=0)
    report = json.loads((outs["ddp"] / "amp_report.json").read_text())["recovery"]
    assert report["world_size"] == 2 and report["strategy"] == "ddp"
    assert [r["rank"] for r in report["ranks"]] == [0, 1] and all(r["peak_rss_mb"] > 0 for r in report["ranks"])
    assert proc.stdout.count("recovered:") == 1              # rank 0 speaks, once
    one = json.loads((outs["single"] / "amp_report.json").read_text())["recovery"]
    assert one["world_size"] == 1 and one["strategy"] == "single" and one["tokens"] == report["tokens"]


def test_fsdp_result_equals_ddp_result(runs):
    _, _, _, outs, _ = runs
    report = json.loads((outs["fsdp"] / "amp_report.json").read_text())["recovery"]
    assert report["strategy"] == "fsdp" and report["world_size"] == 2 and len(report["ranks"]) == 2
    assert report["fsdp_units"] >= 1 + 2 and report["teacher_placement"] == "sharded"   # the root + each layer
    assert report["teacher_fsdp_units"] >= 1 + 2
    whole = json.loads((outs["fsdp_whole_teacher"] / "amp_report.json").read_text())["recovery"]
    assert whole["teacher_placement"] == "each rank"
    assert json.loads((outs["ddp"] / "amp_report.json").read_text())["recovery"]["fsdp_units"] is None
    history = json.loads((outs["fsdp"] / "recovery_log.json").read_text())
    assert history[-1]["kd"] > history[0]["kd"] >= 0
    torch.testing.assert_close(torch.tensor(_losses(outs["fsdp"])), torch.tensor(_losses(outs["ddp"])),
                               rtol=1e-5, atol=0)
    fsdp, ddp, single = _weights(outs["fsdp"]), _weights(outs["ddp"]), _weights(outs["single"])
    whole = _weights(outs["fsdp_whole_teacher"])
    assert fsdp.keys() == ddp.keys() == single.keys() == whole.keys()
    changed = 0
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(whole[k], fsdp[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(single[k], ddp[k], rtol=0, atol=1e-5)
        changed += not torch.equal(ddp[k], _weights(runs[1])[k]) if k.endswith("q_proj.weight") else 0
    assert changed > 0, "the merged adapters changed the weights"


def test_interrupted_two_process_run_resumes_bit_exactly(runs):
    tmp, pruned, data, outs, _ = runs
    out = tmp / "killed"
    argv = ["recover", str(pruned), "--out", str(out), "--data", str(data), *ARGS, "--teacher", str(pruned),
            "--kd-weight", "0.5", "--strategy", "ddp", "--checkpoint-every", "5"]
    proc = _launch(argv, wait=False)
    ckpt = checkpoint_path(out)
    deadline = time.time() + 300
    while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    workers = psutil.Process(proc.pid).children(recursive=True)
    for p in [psutil.Process(proc.pid), *workers]:           # a power cut: no handler runs, on any rank
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(workers, timeout=30)
    assert ckpt.is_file() and not out.exists()
    step = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < step < STEPS, "the run was interrupted before its end"
    spare = tmp / "killed_1proc"                             # the same checkpoint, resumed by one process
    shutil.copytree(ckpt.parent, checkpoint_path(spare).parent)
    _launch(argv + ["--resume"])
    a, b = _weights(outs["ddp"]), _weights(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    assert _losses(out) == _losses(outs["ddp"])
    assert main(["recover", str(pruned), "--out", str(spare), "--data", str(data), *ARGS, "--teacher", str(pruned),
                 "--kd-weight", "0.5", "--resume"]) == 0
    report = json.loads((spare / "amp_report.json").read_text())["recovery"]
    assert report["resumed_from_world_size"] == 2 and "not bit-exact" in report["note"]
    c = _weights(spare)
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=0, atol=1e-5)


def test_strategy_needs_a_launcher(tmp_path, capsys):
    pruned, data = _folder(tmp_path), _records(tmp_path)
    assert main(["recover", str(pruned), "--out", str(tmp_path / "o"), "--data", str(data), "--steps", "1",
                 "--strategy", "fsdp"]) == 2
    assert "needs several processes" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_documented_accelerate_config_runs_fsdp(runs):
    """docs/accelerate/fsdp_8gpu.yaml as a user launches it (two processes instead of eight): --strategy auto
    takes FSDP from accelerate's config."""
    tmp, pruned, data, _, _ = runs
    out = tmp / "from_config"
    config = Path(__file__).resolve().parents[1] / "docs" / "accelerate" / "fsdp_8gpu.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config),
                           "--num_processes", "2", "-m", "amp.cli", "recover", str(pruned), "--out", str(out),
                           "--data", str(data), "--steps", "3", "--batch-size", "4", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "amp_report.json").read_text())["recovery"]
    assert report["strategy"] == "fsdp" and report["world_size"] == 2 and report["fsdp_units"] >= 3


def test_deepspeed_is_refused_with_the_reason(monkeypatch):
    from amp import AmpError
    from amp.recover.distributed import resolve_strategy
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(AmpError, match="DeepSpeed is not supported.*use FSDP"):
        resolve_strategy("auto", 2)


def test_prune_then_recover_under_a_launcher(runs):
    """`amp prune --recover` under torchrun: rank 0 prunes while the other waits, then both recover (DDP)."""
    from tiny_models import make_tiny, save_tiny
    tmp, _, data, _, _ = runs
    dense = save_tiny(make_tiny("llama_gqa"), tmp / "dense_for_prune")
    out = tmp / "pruned_and_recovered"
    proc = _launch(["prune", str(dense), "--ratio", "0.3", "--out", str(out), "--calib", str(data), "--nsamples",
                    "8", "--recover", "--recover-steps", "3", "--recover-data", str(data), "--recover-batch-size",
                    "4", "--strategy", "ddp", "--quiet"])
    report = json.loads((out / "amp_report.json").read_text())
    assert report["ratio_achieved"] > 0.25 and report["recovery"]["world_size"] == 2
    assert report["recovery"]["strategy"] == "ddp" and report["recovery"]["steps"] == 3
    assert proc.stdout.count("pruned ") == 1 and not checkpoint_path(out).parent.exists()

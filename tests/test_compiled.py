"""The kernels compiled for the A100 (sm_80) and the H100 (sm_90a) at the configurations the launchers choose, on
this CPU machine: no compile error, no spill, shared memory within the device's limit, and tensor cores (wgmma) on
the bf16 tile paths on sm_90a. A representative subset (the whole table is benchmarks.bench_compiled's)."""
import pytest
import torch

from amp_kernels import compiled
from amp_kernels.triton_head_norms import head_norms_config

pytest.importorskip("triton.backends.nvidia")

SUBSET = [  # family, dtype, architectures, kernels (None: all the family's)
    ("LLaMA-3-8B", "bf16", (80, 90), None),
    ("Gemma-2-9B", "bf16", (90,), ("head_norms", "gqa_attention prefill", "gqa_attention decode")),
    ("Qwen3-8B", "fp32", (80,), ("head_norms", "gqa_attention prefill", "gqa_attention decode")),
    ("SmolLM2-135M", "fp16", (90,), ("head_norms", "swiglu+stats", "gqa_attention decode")),
]


@pytest.mark.parametrize("family,dtype,archs,kernels", SUBSET, ids=[f"{f}-{d}" for f, d, _, _ in SUBSET])
def test_kernels_compile_without_spills_and_with_tensor_cores(family, dtype, archs, kernels):
    rows = compiled.table_in_subprocess([family], (dtype,), archs, kernels=kernels)
    assert rows and {r["arch"] for r in rows} == {f"sm_{a}a" if a == 90 else f"sm_{a}" for a in archs}
    bad = [f"{r['kernel']} {r['dtype']} {r['arch']} [{r['config']}]: {'; '.join(compiled.problems(r))}"
           for r in rows if compiled.problems(r)]
    assert not bad, "\n".join(bad)
    for r in rows:
        assert r["registers"] > 0 and 0 < r["occupancy"] <= 1


def test_what_is_compiled_is_what_the_launcher_would_launch():
    """The captured launch carries the launcher's own configuration for that GPU (head_norms_config)."""
    from amp_kernels.triton_head_norms import head_norms_triton
    x = torch.empty(4096, 32 * 128, dtype=torch.bfloat16, device="meta")
    w = torch.empty(4096, 32 * 128, dtype=torch.bfloat16, device="meta")
    for arch in compiled.ARCHS:
        (launch,) = compiled.capture(arch, head_norms_triton, x, w, 32)
        cfg = head_norms_config(4096, 4096, 128, torch.bfloat16, arch)
        assert {k: launch.kwargs[k] for k in cfg} == cfg
        assert launch.grid == (4096 // cfg["BLOCK_T"], 32)


def test_the_check_sees_a_spill_and_missing_tensor_cores():
    """problems() is not vacuous: a deliberately oversized tile spills, and an fp32-style report lacks wgmma."""
    big = dict(BLOCK_T=128, BLOCK_O=128, BLOCK_K=64, num_warps=4, num_stages=3)
    res = _in_fresh_process("from amp_kernels.triton_head_norms import head_norms_triton\n"
                            "x = torch.empty(4096, 32 * 128, dtype=torch.float32, device='meta')\n"
                            f"(l,) = compiled.capture(80, head_norms_triton, x, x, 32, config={big!r})\n"
                            "RES = compiled.resources(compiled.compile_launch(l, 80), 80)")
    row = {"kernel": "head_norms", "dtype": "fp32", "arch": "sm_80", **res}
    assert res["spill_stores"] > 0 and any("spills" in p for p in compiled.problems(row))
    fake = {**row, "dtype": "bf16", "arch": "sm_90a", "spill_stores": 0, "spill_loads": 0, "tensor_cores": False}
    assert compiled.problems(fake) == ["bf16 tile path without wgmma on sm_90a"]


def test_occupancy_arithmetic():
    assert compiled.occupancy(90, 32, 0, 4) == 1.0            # 16 blocks of 4 warps fill the 64 warps
    assert compiled.occupancy(90, 255, 0, 4) == 0.125         # 256 registers a thread: 8 warps resident
    assert compiled.occupancy(80, 64, 100_000, 4) == 1 / 16   # shared memory leaves room for one block


def test_memory_ops_counts_wide_and_narrow_accesses():
    """memory_ops reads access widths from PTX (synthetic lines), and on a real compile an odd bf16 width (whose row
    stride does not divide by 16 bytes) loses the 16-byte accesses that a width rounded by --multiple-of keeps."""
    ptx = ("@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n ld.global.b16 { %rs1 }, [ %rd2 + 0 ];\n"
           "st.global.v2.b32 [ %rd3 + 0 ], { %r5, %r6 };\n st.global.v4.b32 [ %rd4 + 0 ], { %r1, %r2, %r3, %r4 };")
    assert compiled.memory_ops(ptx) == {"loads_16B": 1, "loads_narrower": 1, "stores_16B": 1, "stores_narrower": 1}
    res = _in_fresh_process("from amp_kernels.triton_mlp_act import swiglu_triton\nRES = {}\n"
                            "for w in (11469, 11520):\n"
                            "    x = torch.empty(2048, w, dtype=torch.bfloat16, device='meta')\n"
                            "    (l,) = compiled.capture(90, swiglu_triton, x, x)\n"
                            "    RES[w] = compiled.memory_ops(compiled.compile_launch(l, 90).asm['ptx'])")
    odd, rounded = res.values()
    assert odd["loads_16B"] == 0 and odd["loads_narrower"] > 0 and odd["stores_16B"] == 0
    assert rounded["loads_16B"] > 0 and rounded["loads_narrower"] == 0 and rounded["stores_narrower"] == 0


def _in_fresh_process(code: str):
    """Runs `code` (with torch and amp_kernels.compiled imported) in a Python process without TRITON_INTERPRET,
    whose kernels the real compiler accepts, and returns the JSON value it leaves in RES."""
    import json
    import os
    import subprocess
    import sys
    script = f"import json, torch\nfrom amp_kernels import compiled\n{code}\nprint('RES ' + json.dumps(RES))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RES ")), None)
    assert line, proc.stderr[-2000:]
    return json.loads(line[4:])

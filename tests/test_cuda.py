"""Checks that need a GPU (benchmarks/gpu_check.sh runs them with `-m cuda`; the CPU suite deselects them)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import amp
import amp_kernels
from amp_kernels import reference
from conftest import random_calibration
from tiny_models import make_tiny

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("these tests need CUDA; the CPU suite deselects them (-m 'not cuda')")


@pytest.mark.parametrize("family", ["llama_gqa", "phi_mha", "phi3_gqa"])
def test_layerwise_prune_on_cuda_equals_cpu(family):
    samples = random_calibration()
    cpu, gpu = make_tiny(family), make_tiny(family)
    rep_cpu = amp.prune_(cpu, amp.PruneConfig(ratio=0.35, device="cpu"), samples, progress=False)
    rep_gpu = amp.prune_(gpu, amp.PruneConfig(ratio=0.35, device="cuda"), samples, progress=False)
    assert next(gpu.parameters()).device.type == "cpu", "layers must go back to the host"
    assert [layer["kept_kv_heads"] for layer in rep_cpu["layers"]] == \
        [layer["kept_kv_heads"] for layer in rep_gpu["layers"]]
    torch.testing.assert_close(torch.tensor([layer["head_scores"] for layer in rep_gpu["layers"]]),
                               torch.tensor([layer["head_scores"] for layer in rep_cpu["layers"]]),
                               rtol=1e-3, atol=1e-5)
    ids = torch.randint(2, 258, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids).logits, cpu(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_norms_on_a_llama7b_sized_layer(dtype):
    x = torch.randn(8192, 4096, device="cuda", dtype=dtype)
    w = torch.randn(4096, 4096, device="cuda", dtype=dtype) * 0.02
    got = amp_kernels.head_norms(x, w, 32)
    want = reference.head_norms(x.float(), w.float(), 32)
    torch.testing.assert_close(got, want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-3, atol=1e-2)


def test_gqa_attention_llama3_shapes_against_sdpa():
    q = torch.randn(1, 32, 2048, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 2048, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    hmap = torch.arange(32, device="cuda") // 4
    got = amp_kernels.gqa_attention(q, k, v, hmap)
    want = F.scaled_dot_product_attention(q, k[:, hmap], v[:, hmap], is_causal=True)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_fused_calibration_on_cuda_equals_hook_path():
    model = make_tiny("llama_gqa")
    plain = copy.deepcopy(model)
    plain.config.hidden_act = "silu"  # fused path
    rep = amp.prune_(plain, amp.PruneConfig(ratio=0.3, device="cuda"), random_calibration(), progress=False)
    rep_cpu = amp.prune_(model, amp.PruneConfig(ratio=0.3, device="cpu"), random_calibration(), progress=False)
    assert [layer["kept_neurons"] for layer in rep["layers"]] == [layer["kept_neurons"] for layer in rep_cpu["layers"]]

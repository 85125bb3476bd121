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


def test_streamed_prune_peak_device_memory_is_two_layers_plus_activations(tmp_path):
    """A bf16 checkpoint of 8 layers streamed through the GPU: the device's peak (every phase, CUDA's own
    counter) stays under two layers plus the calibration activations."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from tiny_models import tiny_tokenizer
    config = LlamaConfig(vocab_size=258, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    model.save_pretrained(tmp_path / "dense", max_shard_size="40MB")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"word{i % 97} and {i % 13} more" for i in range(4000)))
    report = amp.prune_checkpoint(str(tmp_path / "dense"), amp.PruneConfig(
        ratio=0.3, device="cuda", calib=str(calib), nsamples=8, seqlen=256, batch_size=2),
        tmp_path / "out", progress=False)
    assert report["memory"]["streamed"] and report["dtype"]["computed"] == "bfloat16"
    peak = max(p.get("peak_cuda_mb", 0) for p in report["phases"].values()) * 2**20
    bound = 2 * layer_bytes + report["memory"]["offload"]["activation_bytes"]
    print(f"peak device memory {peak / 2**20:.1f} MiB; bound {bound / 2**20:.1f} MiB (layer {layer_bytes / 2**20:.1f})")
    assert layer_bytes < peak < bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama_gqa", "phi_mha", "phi3_gqa"])
def test_accelerated_model_on_cuda_equals_stock(family, dtype):
    """amp.accelerate_ on the GPU (the Triton attention and activation kernels) against stock transformers."""
    model = make_tiny(family)
    amp.prune_(model, amp.PruneConfig(ratio=0.35), random_calibration(), progress=False)
    model = model.to("cuda", dtype)
    ids = torch.randint(2, 258, (2, 21), device="cuda")
    with torch.no_grad():
        want = model(ids).logits.float()
        want_gen = model.generate(ids, max_new_tokens=8, do_sample=False)
        amp.accelerate_(model)
        got = model(ids).logits.float()
        got_gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got, want, **tol)
    if dtype == torch.float32:
        assert torch.equal(got_gen, want_gen)


def test_refit_and_recovery_on_cuda_match_cpu():
    """The refit's Gram matrices accumulate on the device; recovery trains there (bf16 base, fp32 adapters)."""
    samples = random_calibration(n=8, lo=20, hi=40)
    cpu, gpu = make_tiny("llama_gqa"), make_tiny("llama_gqa")
    rep_cpu = amp.prune_(cpu, amp.PruneConfig(ratio=0.4, compensate="bias+refit", device="cpu"), samples,
                         progress=False)
    rep_gpu = amp.prune_(gpu, amp.PruneConfig(ratio=0.4, compensate="bias+refit", device="cuda"), samples,
                         progress=False)
    assert [x["kept_neurons"] for x in rep_cpu["layers"]] == [x["kept_neurons"] for x in rep_gpu["layers"]]
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    from amp import RecoverConfig, recover_model
    data = [torch.randint(2, 10, (24,), generator=torch.Generator().manual_seed(i)) for i in range(16)]
    result = recover_model(gpu.to(torch.bfloat16), None, RecoverConfig(steps=10, lr=1e-2, batch_size=4,
                                                                        device="cuda", checkpoint_every=0),
                           teacher=copy.deepcopy(cpu).to(torch.bfloat16), samples=data, progress=False)
    assert result["peak_cuda_mb"] > 0 and result["merge_max_abs_diff"] < 0.5
    assert next(result["model"].parameters()).device.type == "cuda"

"""Every Triton kernel against its pure-torch twin, and every twin against an independent computation.

On a CUDA machine the kernels run on the GPU; on a CPU they run under Triton's interpreter (TRITON_INTERPRET=1,
set here before the kernel modules are first imported), on small shapes. bf16: the interpreter's tl.dot is wrong
for bf16 operands (errors of 1e11 seen with Triton 3.9), so under the interpreter the kernels upcast bf16 tiles to
fp32 before the dot (a constexpr switch, UPCAST); on a GPU the bf16 tensor-core path itself is what is tested.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import amp_kernels
from amp_kernels import reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    """Forces the Triton path: the GPU where there is one, the interpreter otherwise."""
    if not amp_kernels.TRITON_AVAILABLE:
        pytest.fail("triton is not installed: the kernel tests need it (pip install triton)")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


# ---------------------------------------------------------------- head_norms
HEAD_CASES = ([(t, 3, 64) for t in (1, 7, 123, 257)] + [(7, h, 64) for h in (1, 9, 32)]
              + [(123, 3, d) for d in (80, 96, 128)])


@pytest.mark.parametrize("tokens,heads,d", HEAD_CASES)
@pytest.mark.parametrize("p", [1, 2])
def test_head_norms_kernel_matches_twin(tokens, heads, d, p):
    x, w = _rand(tokens, heads * d, seed=1), _rand(40, heads * d, scale=0.05, seed=2)
    got = amp_kernels.head_norms(x, w, heads, p=p)
    want = reference.head_norms(x.cpu(), w.cpu(), heads, p=p)
    assert got.dtype == torch.float32 and got.shape == (heads,)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_head_norms_kernel_dtypes(dtype):
    x, w = _rand(123, 9 * 64, dtype=dtype, seed=3), _rand(72, 9 * 64, dtype=dtype, scale=0.05, seed=4)
    got = amp_kernels.head_norms(x, w, 9)
    want = reference.head_norms(x.cpu().float(), w.cpu().float(), 9)  # same rounded inputs, fp32 math
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3)


def test_head_norms_accumulates_across_calls():
    x1, x2, w = _rand(57, 3 * 64, seed=5), _rand(20, 3 * 64, seed=6), _rand(48, 3 * 64, scale=0.1, seed=7)
    out = torch.zeros(3, dtype=torch.float32, device=DEVICE)
    amp_kernels.head_norms(x1, w, 3, out=out)
    amp_kernels.head_norms(x2, w, 3, out=out)
    want = reference.head_norms_naive(torch.cat([x1, x2]).cpu(), w.cpu(), 3)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("p", [1, 2])
def test_head_norms_twin_equals_naive_einsum(p, monkeypatch):
    """The twin works in chunks (here forced to tiny ones) and still equals the materializing einsum."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = torch.randn(301, 5 * 16), torch.randn(24, 5 * 16)
    biggest = []
    real_bmm = torch.bmm

    def spy(a, b):
        out = real_bmm(a, b)
        biggest.append(out.numel())
        return out
    monkeypatch.setattr(reference, "_HEAD_NORM_CHUNK_ELEMS", 5 * 24 * 10)
    monkeypatch.setattr(torch, "bmm", spy)
    got = reference.head_norms(x, w, 5, p=p)
    torch.testing.assert_close(got, reference.head_norms_naive(x, w, 5, p=p), rtol=1e-5, atol=1e-4)
    assert max(biggest) <= 5 * 24 * 10 < 301 * 5 * 24, "the twin materialized more than one chunk"


@pytest.mark.parametrize("bad", ["width", "heads", "w_o", "p", "out", "rank"])
def test_head_norms_rejects_bad_arguments_before_launch(bad):
    x, w = _rand(7, 128), _rand(16, 128)
    args = {"width": (x[:, :100], w, 2), "heads": (x, w, 3), "w_o": (x, w[:, :64], 2), "p": (x, w, 2),
            "out": (x, w, 2), "rank": (x[None], w, 2)}[bad]
    kwargs = {"p": 3} if bad == "p" else {"out": torch.zeros(3, device=DEVICE)} if bad == "out" else {}
    with pytest.raises(ValueError, match="head_norms"):
        amp_kernels.head_norms(*args, **kwargs)


# ---------------------------------------------------------------- MLP activations
@pytest.mark.parametrize("shape", [(1, 7), (7, 123), (123, 1023), (2, 5, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["swiglu", "geglu", "gelu"])
def test_mlp_activation_kernels_match_twins(shape, dtype, kind):
    gate, up = _rand(*shape, dtype=dtype, seed=8), _rand(*shape, dtype=dtype, seed=9)
    stats = torch.zeros(shape[-1], dtype=torch.float32, device=DEVICE)
    stats_ref = torch.zeros(shape[-1], dtype=torch.float32)
    for _ in range(2):  # statistics accumulate across calls
        if kind in ("swiglu", "geglu"):
            got = getattr(amp_kernels, kind)(gate, up, neuron_stats=stats)
            want = getattr(reference, kind)(gate.cpu(), up.cpu(), neuron_stats=stats_ref)
        else:
            got = amp_kernels.gelu_mlp_act(gate, neuron_stats=stats)
            want = reference.gelu_mlp_act(gate.cpu(), neuron_stats=stats_ref)
    assert got.dtype == dtype and got.shape == shape
    torch.testing.assert_close(got.cpu(), want, **TOL[dtype])
    torch.testing.assert_close(stats.cpu(), stats_ref, rtol=1e-4, atol=1e-3)


def test_mlp_twins_equal_torch_definitions():
    g, u = torch.randn(9, 33), torch.randn(9, 33)
    stats = torch.zeros(33)
    torch.testing.assert_close(reference.swiglu(g, u, stats), F.silu(g) * u)
    torch.testing.assert_close(stats, (F.silu(g) * u).abs().sum(0))
    from transformers.activations import ACT2FN
    torch.testing.assert_close(reference.gelu_mlp_act(g), ACT2FN["gelu_new"](g))
    torch.testing.assert_close(reference.geglu(g, u), ACT2FN["gelu_pytorch_tanh"](g) * u)


def test_mlp_activation_rejects_mismatches():
    with pytest.raises(ValueError, match="swiglu"):
        amp_kernels.swiglu(_rand(3, 8), _rand(3, 9))
    with pytest.raises(ValueError, match="geglu"):
        amp_kernels.geglu(_rand(3, 8), _rand(3, 9))
    with pytest.raises(ValueError, match="neuron_stats"):
        amp_kernels.gelu_mlp_act(_rand(3, 8), neuron_stats=torch.zeros(9, device=DEVICE))


# ---------------------------------------------------------------- attention with an uneven head map
ATTN_CASES = {
    "prefill_uneven_with_unused_kv": (2, [0, 0, 0, 2, 2], 3, 7, 7, 64, True),
    "prefill_long": (1, [1, 0, 1], 2, 123, 123, 128, True),
    "decode": (2, [0, 1, 1, 1], 3, 1, 37, 80, True),
    "non_causal": (1, [0, 1], 2, 7, 19, 64, False),
    "chunked_prefill": (1, [0, 0, 1], 2, 5, 70, 64, True),
    # the decode kernel (T <= 16): uneven groups, caches of odd lengths cut into many slices, batch > 1
    "decode_uneven_long_cache": (3, [2, 0, 0, 2, 2, 1], 3, 1, 1023, 64, True),
    "decode_three_tokens_odd_cache": (2, [0, 0, 1], 2, 3, 7, 32, True),
    "decode_one_key": (1, [0], 1, 1, 1, 16, True),
    "decode_non_causal_unused_kv": (2, [2, 2, 0], 3, 2, 77, 128, False),
    "prefill_past_the_decode_kernel": (1, [0, 1, 1], 2, 17, 17, 16, True),
}


@pytest.mark.parametrize("case", sorted(ATTN_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gqa_attention_kernel_matches_twin(case, dtype):
    b, head_map, hkv, t, s, d, causal = ATTN_CASES[case]
    q = _rand(b, len(head_map), t, d, dtype=dtype, seed=10)
    k, v = _rand(b, hkv, s, d, dtype=dtype, seed=11), _rand(b, hkv, s, d, dtype=dtype, seed=12)
    hm = torch.tensor(head_map)
    got = amp_kernels.gqa_attention(q, k, v, hm.to(DEVICE), causal=causal)
    want = reference.gqa_attention(q.cpu(), k.cpu(), v.cpu(), hm, causal=causal)
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got.cpu(), want, **TOL[dtype])


def test_decode_reads_each_kv_head_once():
    """A decode step's launch: programs over KV heads (each serving all its query heads) and cache slices, so the
    cache is read once; the per-query-head prefill kernel would read it once per query head."""
    from amp_kernels.compiled import captured_launches
    from amp_kernels.triton_gqa_decode import decode_bytes
    from amp_kernels.triton_gqa_decode import gqa_decode_triton
    hm = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    q, k = torch.empty(2, 8, 1, 64, device="meta"), torch.empty(2, 2, 300, 64, device="meta")
    with captured_launches() as calls:
        gqa_decode_triton(q, k, k, amp_kernels.decode_groups(hm, 2))
    decode, combine = calls
    assert decode.kernel.fn.__name__ == "_gqa_decode_kernel" and decode.grid[:2] == (2, 2)
    split = decode.kwargs["SPLIT"]
    assert decode.grid[2] * split >= 300 > (decode.grid[2] - 1) * split  # the slices cover the cache once
    assert combine.grid == (2 * 8 * 1,)
    b = decode_bytes(2, 8, 2, 1, 300, 64, 2)
    assert b["grouped"] == b["minimum"] == b["per_query_head"] // 4


@pytest.mark.parametrize("causal", [True, False])
def test_gqa_attention_twin_equals_sdpa_with_expanded_kv(causal):
    os.environ.pop("TRITON_INTERPRET", None)
    q, k, v = torch.randn(2, 5, 9, 16), torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)
    hm = torch.tensor([2, 2, 0, 0, 0])  # KV head 1 serves nobody
    want = F.scaled_dot_product_attention(q, k[:, hm], v[:, hm], is_causal=causal)
    torch.testing.assert_close(reference.gqa_attention(q, k, v, hm, causal=causal), want, rtol=1e-5, atol=1e-5)
    # decode: the single query sees every key
    want = F.scaled_dot_product_attention(q[:, :, -1:], k[:, hm], v[:, hm])
    torch.testing.assert_close(reference.gqa_attention(q[:, :, -1:], k, v, hm), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["map_length", "map_range", "head_dim", "dtype", "rank"])
def test_gqa_attention_rejects_bad_arguments(bad):
    q, k, v = _rand(1, 2, 4, 16), _rand(1, 2, 4, 16), _rand(1, 2, 4, 16)
    hm = torch.tensor([0, 1], device=DEVICE)
    args = {"map_length": (q, k, v, hm[:1]), "map_range": (q, k, v, hm + 1), "head_dim": (q[..., :8], k, v, hm),
            "dtype": (q.half(), k, v, hm), "rank": (q[0], k, v, hm)}[bad]
    with pytest.raises(ValueError, match="gqa_attention"):
        amp_kernels.gqa_attention(*args)


def test_dispatcher_takes_the_triton_path_here(monkeypatch):
    """Guards the suite's meaning: with the twins disabled, every public op still answers (the kernels ran)."""
    def refuse(*a, **k):
        raise AssertionError("the twin ran instead of the kernel")
    for name in ("head_norms", "swiglu", "swiglu_matmul", "gelu_mlp_act", "gqa_attention"):
        monkeypatch.setattr(reference, name, refuse)
    x = _rand(5, 64)
    amp_kernels.head_norms(x, _rand(8, 64), 1)
    amp_kernels.swiglu(x, x)
    amp_kernels.gelu_mlp_act(x)
    amp_kernels.swiglu_matmul(x, _rand(16, 64), _rand(16, 64))
    q = _rand(1, 1, 3, 16)
    amp_kernels.gqa_attention(q, q, q, torch.zeros(1, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("n,hidden,inter", [(1, 64, 96), (7, 80, 123), (123, 128, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_swiglu_matmul_kernel_matches_twin(n, hidden, inter, dtype):
    x = _rand(n, hidden, dtype=dtype, seed=13)
    wg, wu = _rand(inter, hidden, dtype=dtype, scale=0.1, seed=14), _rand(inter, hidden, dtype=dtype, scale=0.1, seed=15)
    stats = torch.zeros(inter, device=DEVICE)
    stats_ref = torch.zeros(inter)
    got = amp_kernels.swiglu_matmul(x, wg, wu, stats)
    want = reference.swiglu_matmul(x.cpu().float(), wg.cpu().float(), wu.cpu().float(), stats_ref)
    torch.testing.assert_close(got.cpu().float(), want, **TOL[dtype])
    torch.testing.assert_close(stats.cpu(), stats_ref, rtol=1e-2 if dtype != torch.float32 else 1e-4, atol=1e-3)


def test_swiglu_matmul_rejects_mismatches():
    with pytest.raises(ValueError, match="swiglu_matmul"):
        amp_kernels.swiglu_matmul(_rand(3, 8), _rand(5, 8), _rand(5, 9))

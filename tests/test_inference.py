"""amp.accelerate_: the fused attention and MLP swapped into loaded models equal the stock path (prefill, decode,
greedy generate, padded batches), uneven head maps equal an explicit per-head computation, undo is exact."""
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import amp
import amp.runtime.attention as inference
from conftest import random_calibration
from test_cli import assert_clean_failure, run_cli
from tiny_models import make_tiny, save_tiny


def _ids(b=2, t=13, seed=1):
    return torch.randint(2, 258, (b, t), generator=torch.Generator().manual_seed(seed))


def _pruned(family):
    model = make_tiny(family)
    amp.prune_(model, amp.PruneConfig(ratio=0.35, batch_size=3), random_calibration(), progress=False)
    return model


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
def test_accelerated_equals_stock(family, pruned):
    model = _pruned(family) if pruned else make_tiny(family)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        want_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
        amp.accelerate_(model)
        assert model.config._attn_implementation == inference.ATTN_NAME
        got = model(ids).logits
        got_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_gen, want_gen), "greedy decoding through the KV cache must give the same tokens"


def test_padded_batch_generation_equals_stock():
    """Left-padded prompts: the mask path (index-based attention with the padding mask) through generate."""
    model = _pruned("qwen2_gqa")
    ids = _ids(3, 9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        amp.accelerate_(model)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_undo_restores_bit_identical_stock_logits():
    model = _pruned("phi3_gqa")
    ids = _ids()
    with torch.no_grad():
        stock = model(ids).logits
        amp.accelerate_(model)
        amp.accelerate_(model)  # twice is harmless
        model(ids)
        amp.accelerate_(model, enable=False)
        again = model(ids).logits
    assert torch.equal(stock, again)
    assert model.config._attn_implementation == "sdpa"
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)


def _kernel_device(monkeypatch) -> str:
    """Where the Triton kernels run: the GPU if there is one, else the interpreter on the CPU."""
    if not inference.amp_kernels.TRITON_AVAILABLE:
        pytest.fail("triton is not installed")
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


def _kernel_config(**kw):
    base = dict(vocab_size=258, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, eos_token_id=1)
    return LlamaConfig(**{**base, **kw})


def test_kernel_path_under_the_triton_interpreter_equals_stock(monkeypatch):
    """The Triton kernels themselves (gqa_attention, swiglu) inside the model, prefill and decode."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(_kernel_config()).eval()
    ids = _ids(1, 7)
    calls = []
    for name in ("gqa_attention", "swiglu"):
        real = getattr(inference.amp_kernels, name)
        monkeypatch.setattr(inference.amp_kernels, name,
                            lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    with torch.no_grad():
        want = model(ids).logits
        want_gen = model.generate(ids, max_new_tokens=3, do_sample=False)
        amp.accelerate_(model)
        device = _kernel_device(monkeypatch)
        model.to(device)
        got = model(ids.to(device)).logits.cpu()
        got_gen = model.generate(ids.to(device), max_new_tokens=3, do_sample=False).cpu()
    assert {"gqa_attention", "swiglu"} <= set(calls), "the kernel path did not run"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got_gen, want_gen)


def _explicit_attention(layer, x, head_map, positions):
    """Per head h, by hand: softmax(q_h k_{map[h]}^T / sqrt(d) + causal) v_{map[h]}, concatenated, then o_proj."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    attn = layer.self_attn
    d = attn.head_dim
    t = x.shape[1]
    q = attn.q_proj(x).view(1, t, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(1, t, -1, d).transpose(1, 2)
    v = attn.v_proj(x).view(1, t, -1, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *positions)
    outs = []
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    for h, g in enumerate(head_map):
        scores = (q[0, h] @ k[0, g].T) / math.sqrt(d)
        scores = scores.masked_fill(~causal, float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ v[0, g])
    return attn.o_proj(torch.cat(outs, dim=-1)[None])


@pytest.mark.parametrize("kernel", [False, True], ids=["indexed", "triton"])
def test_uneven_head_map_equals_explicit_per_head_attention(kernel, monkeypatch):
    """A hand-built layer with 5 query heads on 2 KV heads (3 + 2), which stock attention cannot run."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(_kernel_config(num_hidden_layers=1)).eval()
    layer, d, hidden = model.model.layers[0], 16, 64
    attn = layer.self_attn
    attn.q_proj = torch.nn.Linear(hidden, 5 * d, bias=False)
    attn.o_proj = torch.nn.Linear(5 * d, hidden, bias=False)
    attn.amp_head_map = torch.tensor([0, 0, 0, 1, 1])
    amp.accelerate_(model)
    device = _kernel_device(monkeypatch) if kernel else "cpu"
    model.to(device)
    x = torch.randn(1, 9, hidden, device=device)
    pos = torch.arange(9, device=device)[None]
    positions = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        got = attn(x, attention_mask=None, position_embeddings=positions)[0]
        want = _explicit_attention(layer, x, [0, 0, 0, 1, 1], positions)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_indexed_attention_equals_the_twin_on_uneven_maps():
    from amp_kernels import reference
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, n, t, 16, generator=g) for n, t in ((5, 6), (3, 11), (3, 11)))
    head_map = torch.tensor([2, 0, 0, 2, 1])
    for causal in (True, False):
        torch.testing.assert_close(inference.indexed_attention(q, k, v, head_map, causal=causal),
                                   reference.gqa_attention(q, k, v, head_map, causal=causal), rtol=1e-5, atol=1e-5)
    # A decode step on an even map packs each group's queries onto its KV head instead of copying the cache.
    q1, even = torch.randn(2, 6, 1, 16, generator=g), torch.arange(6) // 2
    torch.testing.assert_close(inference.indexed_attention(q1, k, v, even, group=2),
                               reference.gqa_attention(q1, k, v, even), rtol=1e-5, atol=1e-5)
    # Plain multi-head attention (the identity map) gathers nothing.
    identity = torch.arange(3)
    torch.testing.assert_close(inference.indexed_attention(q[:, :3], k, v, identity, group=1),
                               reference.gqa_attention(q[:, :3], k, v, identity), rtol=1e-5, atol=1e-5)


# ---- bad input -------------------------------------------------------------------------------------------------

def test_unsupported_class_and_dtype_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(amp.AmpError, match="GPT2LMHeadModel.*supported: .*LlamaForCausalLM"):
        amp.accelerate_(gpt2)
    model = make_tiny("llama_gqa").to(torch.float64)
    with pytest.raises(amp.AmpError, match="float64 on cpu"):
        amp.accelerate_(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(make_tiny("mistral_gqa"), tmp_path_factory.mktemp("tiny_generate"))


def test_generate_cli_prints_the_continuation_and_speed(tiny_dir, capsys):
    code, plain, _ = run_cli(capsys, "generate", tiny_dir, "Hello there", "--max-new-tokens", 5)
    assert code == 0 and "tokens/s" in plain
    code, fused, _ = run_cli(capsys, "generate", tiny_dir, "Hello there", "--max-new-tokens", 5, "--accelerate")
    assert code == 0 and "fused" in fused
    assert plain.rsplit("\n[", 1)[0] == fused.rsplit("\n[", 1)[0]  # the same greedy continuation


@pytest.mark.parametrize("case", ["not_a_model", "empty_prompt", "zero_tokens", "float64"])
def test_generate_bad_input(case, tiny_dir, tmp_path, capsys):
    argv = {"not_a_model": [tmp_path, "hi"], "empty_prompt": [tiny_dir, "  "],
            "zero_tokens": [tiny_dir, "hi", "--max-new-tokens", 0],
            "float64": [tiny_dir, "hi", "--accelerate", "--dtype", "float64"]}[case]
    code, _, err = run_cli(capsys, "generate", *argv)
    assert_clean_failure(code, err, None)


def test_eval_through_the_fused_path_gives_the_same_perplexity(tiny_dir, tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    (text / "wikitext2_test.txt").write_text(" = Heading = \n Some words about a game and its release .\n" * 30)
    kwargs = dict(tasks=[], ppl=["wikitext2"], seqlen=32, data_dir=tmp_path, progress=False)
    stock = amp.evaluate(tiny_dir, **kwargs)
    fused = amp.evaluate(tiny_dir, accelerate=True, **kwargs)
    assert fused["accelerated"] and not stock["accelerated"]
    assert fused["perplexity"]["wikitext2@32"] == pytest.approx(stock["perplexity"]["wikitext2@32"], rel=1e-5)

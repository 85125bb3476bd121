"""Shared fixtures: tiny random models of every supported family, a byte-level tokenizer, the real SmolLM2."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # Triton builds its own library functions (tl.sum, tl.sigmoid, ...) at import time, for the interpreter only
    # if TRITON_INTERPRET=1 then. Import it so here, then switch the flag off again: the engine's tests run the
    # pure-torch twins, and the kernel tests switch the interpreter on for themselves (test_kernels.py).
    # The kernel modules too: whichever test imports them first, the kernel tests find interpreted kernels
    # (amp_kernels.compiled rebuilds compilable ones from them).
    try:
        os.environ["TRITON_INTERPRET"] = "1"
        import triton.language  # noqa: F401

        import amp_kernels.triton_gqa_attention  # noqa: F401
        import amp_kernels.triton_gqa_decode  # noqa: F401
        import amp_kernels.triton_head_norms  # noqa: F401
        import amp_kernels.triton_mlp_act  # noqa: F401
        import amp_kernels.triton_swiglu_matmul  # noqa: F401
    except ImportError:
        pass
    finally:
        os.environ["TRITON_INTERPRET"] = "0"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tiny_models import FAMILIES, make_tiny, tiny_tokenizer  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA_DIR = Path(os.environ.get("AMP_DATA_DIR", SHARED_DATA))


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny LLaMA (GQA) folder with tokenizer, for CLI tests."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    model = make_tiny("llama_gqa")
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real bundled model, dequantized once into the AMP cache."""
    from amp.io.models import default_model_dir
    return default_model_dir()


@pytest.fixture(scope="session")
def data_dir():
    if not (DATA_DIR / "text" / "wikitext2_test.txt").is_file():
        pytest.fail(f"test data not found under {DATA_DIR}; set AMP_DATA_DIR to shared/data")
    return DATA_DIR


def random_calibration(n=6, vocab=258, lo=5, hi=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g)
            for _ in range(n)]

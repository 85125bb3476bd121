"""Every Triton kernel compiled for GPUs that are not here (A100: sm_80, H100: sm_90a), at the launch configurations
the launchers themselves choose, and the resources ptxas reports.

A launch is captured by calling the real launcher on meta tensors of real shapes with Triton's `JITFunction.run`
intercepted (nothing runs); the captured arguments go through Triton's own argument specialization (the JIT's
binder and `_pack_args`, for a backend of the target GPU) into `triton.compile`, so what is compiled is what the JIT
would compile on that GPU: same constexprs, same divisibility attributes, same num_warps / num_stages. The launch
configuration itself comes from each kernel's one `*_config` function (the launcher calls it with the device's
architecture; here `target_arch` sets it), so tiles can differ per GPU.

Collected per compiled kernel: registers, spill stores and loads, stack frame (`ptxas -v` on the PTX), shared
memory (Triton's metadata), whether tensor-core instructions are used (mma.sync on sm_80, wgmma on sm_90a), and
the theoretical occupancy those imply. Works with Triton 3.6 (the GPU machine's) and 3.9.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .dispatch import target_arch

ARCHS = (80, 90)
# Per SM: registers, shared memory usable by blocks, the most a block may opt into, warps and blocks resident.
LIMITS = {80: dict(regs=65536, smem=167936, smem_block=166912, warps=64, blocks=32),
          90: dict(regs=65536, smem=233472, smem_block=232448, warps=64, blocks=32)}
MMA = {80: "mma.sync", 90: "wgmma"}


@dataclass
class Launch:
    kernel: object      # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple


@contextmanager
def captured_launches():
    """Collects every Triton launch made inside the context instead of running it (compiled kernels and, where
    the kernel modules were imported under TRITON_INTERPRET=1, interpreted ones alike); the launchers see a GPU,
    not the interpreter, so they choose what they would choose there."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    calls: list[Launch] = []
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def run(self, *args, grid, warmup, **kwargs):
        calls.append(Launch(self, args, kwargs, grid))
        return None
    interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    for cls in originals:
        cls.run = run
    try:
        yield calls
    finally:
        for cls, original in originals.items():
            cls.run = original
        if interpret is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = interpret


def capture(arch: int, launcher, *args, **kwargs) -> list[Launch]:
    """The launches `launcher(*args, **kwargs)` makes on a GPU of `arch` (arguments: meta tensors)."""
    with target_arch(arch), captured_launches() as calls:
        launcher(*args, **kwargs)
    return calls


def _jit(kernel):
    """The JITFunction of a kernel (one imported under the interpreter is rebuilt from its Python function)."""
    from triton.runtime.jit import JITFunction
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def compile_launch(launch: Launch, arch: int):
    """triton.compile of one captured launch for `arch`, specialized as the JIT would specialize it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = _jit(launch.kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _ptxas_report(ptx: str, arch: int) -> str:
    import triton
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        errors = []
        for exe in ("ptxas", "ptxas-blackwell"):  # the one that accepts this Triton's PTX version
            path = os.path.join(bindir, exe)
            if not os.path.exists(path):
                continue
            proc = subprocess.run([path, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True,
                                  text=True)
            if proc.returncode == 0:
                return proc.stdout + proc.stderr
            errors.append(proc.stderr.strip().splitlines()[-1:] or [""])
        raise RuntimeError(f"no bundled ptxas assembled the PTX for {gpu}: {errors}")
    finally:
        os.unlink(f.name)


def _number(pattern: str, text: str) -> int:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else 0


def occupancy(arch: int, regs: int, shared: int, warps: int) -> float:
    """Theoretical occupancy (resident warps over the SM's maximum) from registers, shared memory and warps."""
    lim = LIMITS[arch]
    warp_regs = -(-max(regs, 1) * 32 // 256) * 256          # registers are allocated per warp, 256 at a time
    by_regs = (lim["regs"] // warp_regs) // warps
    by_smem = lim["smem"] // (shared + 1024) if shared else lim["blocks"]  # 1 KB of shared is reserved per block
    blocks = min(by_regs, by_smem, lim["blocks"], lim["warps"] // warps)
    return blocks * warps / lim["warps"]


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[a-z0-9]+)*)")
_BITS = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16, "bf16": 16, "b32": 32, "u32": 32,
         "s32": 32, "f32": 32, "b64": 64, "u64": 64, "s64": 64, "f64": 64}


def memory_ops(ptx: str) -> dict:
    """The global loads and stores in a kernel's PTX by width: how many move 16 bytes per thread (ld/st.global.v4
    of 32-bit words) and how many move less. Triton emits the wide form only where it can prove 16-byte
    alignment, that is where every row stride of the tensor divides by 16 bytes: an odd kept width in bf16
    (11,469 x 2 bytes) turns each wide access into eight 2-byte ones."""
    out = {"loads_16B": 0, "loads_narrower": 0, "stores_16B": 0, "stores_narrower": 0}
    for op, suffix in _ACCESS.findall(ptx):
        parts = suffix.strip(".").split(".")
        lanes = int(next((p[1:] for p in parts if p in ("v2", "v4", "v8")), "1"))
        bits = next((_BITS[p] for p in parts if p in _BITS), 0)
        wide = lanes * bits >= 128
        out[f"{'loads' if op == 'ld' else 'stores'}_{'16B' if wide else 'narrower'}"] += 1
    return out


def resources(kernel, arch: int) -> dict:
    report = _ptxas_report(kernel.asm["ptx"], arch)
    regs = _number(r"Used (\d+) registers", report)
    meta = kernel.metadata
    shared = int(meta.shared)
    warps = int(meta.num_warps)
    return {"registers": regs,
            "spill_stores": _number(r"(\d+) bytes spill stores", report),
            "spill_loads": _number(r"(\d+) bytes spill loads", report),
            "stack_frame": _number(r"(\d+) bytes stack frame", report),
            "shared_bytes": shared, "shared_over_limit": shared > LIMITS[arch]["smem_block"],
            "num_warps": warps, "num_stages": int(meta.num_stages),
            "tensor_cores": MMA[arch] in kernel.asm["ptx"],
            "occupancy": round(occupancy(arch, regs, shared, warps), 3)}


# ---------------------------------------------------------------- what runs, at the sizes people run

# hidden, query heads, KV heads, head_dim, MLP width, MLP kind (swiglu | geglu | gelu; experts: the expert width)
FAMILIES = {
    "SmolLM2-135M": (576, 9, 3, 64, 1536, "swiglu"),
    "LLaMA-2-7B": (4096, 32, 32, 128, 11008, "swiglu"),
    "LLaMA-3-8B": (4096, 32, 8, 128, 14336, "swiglu"),
    "LLaMA-3-70B": (8192, 64, 8, 128, 28672, "swiglu"),
    "Mistral-7B": (4096, 32, 8, 128, 14336, "swiglu"),
    "Qwen2.5-7B": (3584, 28, 4, 128, 18944, "swiglu"),
    "Qwen3-8B": (4096, 32, 8, 128, 12288, "swiglu"),
    "Qwen3-32B": (5120, 64, 8, 128, 25600, "swiglu"),
    "Phi-3-mini": (3072, 32, 32, 96, 8192, "swiglu"),
    "Gemma-2-9B": (3584, 16, 8, 256, 14336, "geglu"),
    "Gemma-3-12B": (3840, 16, 8, 256, 15360, "geglu"),
    "Mixtral-8x7B": (4096, 32, 8, 128, 14336, "experts"),
    "Qwen3-30B-A3B": (2048, 32, 4, 128, 768, "experts"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CALIB_TOKENS = 8 * 512        # one calibration batch: --batch-size 8 x --seqlen 512
PREFILL, CACHE = 2048, 8192   # attention: a prefill of 2,048 tokens; a decode step against 8,192 cached tokens


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def workloads(family: str, dtype: torch.dtype, width: int | None = None) -> list[tuple[str, object, tuple, dict]]:
    """(name, launcher, args, kwargs) of every kernel the engine launches for this family: calibration scores and
    MLP statistics, and inference (activation, attention prefill and decode). `width`: the MLP width a pruned
    model keeps, instead of the family's full intermediate size."""
    from . import decode_groups
    from .triton_gqa_attention import gqa_attention_triton
    from .triton_gqa_decode import gqa_decode_triton
    from .triton_head_norms import head_norms_triton
    from .triton_mlp_act import geglu_triton, gelu_triton, swiglu_triton
    from .triton_swiglu_matmul import swiglu_matmul_triton
    hidden, heads, kv, d, full_width, kind = FAMILIES[family]
    width = width or full_width
    m = lambda *s: _meta(*s, dtype=dtype)  # noqa: E731
    out = [("head_norms", head_norms_triton, (m(CALIB_TOKENS, heads * d), m(hidden, heads * d), heads), {})]
    if kind != "experts":  # mixture-of-experts blocks run transformers' own expert loop, no fused kernel
        act = {"swiglu": swiglu_triton, "geglu": geglu_triton, "gelu": gelu_triton}[kind]
        stats = torch.empty(width, dtype=torch.float32, device="meta")
        pair = (m(CALIB_TOKENS, width), m(CALIB_TOKENS, width)) if kind != "gelu" else (m(CALIB_TOKENS, width),)
        out.append((f"{kind}+stats", act, (*pair, stats), {}))
        out.append((kind, act, tuple(m(PREFILL, width) for _ in pair), {}))
        if kind == "swiglu":
            out.append(("swiglu_matmul", swiglu_matmul_triton, (m(CALIB_TOKENS, hidden), m(width, hidden),
                                                                 m(width, hidden)), {}))
    head_map = torch.empty(heads, dtype=torch.long, device="meta")
    groups = decode_groups(torch.arange(heads) // (heads // kv), kv)
    out.append(("gqa_attention prefill", gqa_attention_triton,
                (m(1, heads, PREFILL, d), m(1, kv, PREFILL, d), m(1, kv, PREFILL, d), head_map), {"causal": True}))
    out.append(("gqa_attention decode", gqa_decode_triton,
                (m(1, heads, 1, d), m(1, kv, CACHE, d), m(1, kv, CACHE, d), groups), {"causal": True}))
    return out


def table(families=None, dtypes=("bf16", "fp16", "fp32"), archs=ARCHS, progress=None, kernels=None) -> list[dict]:
    """One row per (family, kernel, dtype, arch, launch): the launch configuration and its resources. Identical
    compilations (same kernel, specialization and options) are compiled once. `kernels`: only these workloads."""
    cache: dict = {}
    rows = []
    for family in families or FAMILIES:
        for dname in dtypes:
            for name, launcher, args, kwargs in workloads(family, DTYPES[dname]):
                if kernels is not None and name not in kernels:
                    continue
                for arch in archs:
                    for i, launch in enumerate(capture(arch, launcher, *args, **kwargs)):
                        const = {k: v for k, v in launch.kwargs.items()}
                        key = (launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else str(launch.kernel),
                               arch, dname, tuple(sorted(map(str, const.items()))),
                               tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__
                                     for a in launch.args))
                        if key not in cache:
                            if progress:
                                progress(f"{family} {name} {dname} sm_{arch}")
                            try:
                                cache[key] = resources(compile_launch(launch, arch), arch)
                            except Exception as e:  # noqa: BLE001 - a compile error is a finding, reported
                                cache[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                        rows.append({"family": family, "kernel": name + (f" [{i}]" if i else ""), "dtype": dname,
                                     "arch": f"sm_{arch}a" if arch == 90 else f"sm_{arch}",
                                     "grid": "x".join(map(str, launch.grid)),
                                     "config": ", ".join(f"{k}={v}" for k, v in const.items()
                                                         if k.isupper() or k in ("num_warps", "num_stages")),
                                     **cache[key]})
    return rows


def problems(row: dict) -> list[str]:
    """What the compile check refuses: a compile error, any spill, shared memory over the limit, and a bf16 tile
    path on sm_90a that does not use wgmma."""
    if "error" in row:
        return [row["error"]]
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    if row["shared_over_limit"]:
        out.append(f"shared memory {row['shared_bytes']} B over the limit")
    tiled = row["kernel"].startswith(("head_norms", "swiglu_matmul", "gqa_attention prefill"))
    if tiled and row["dtype"] == "bf16" and row["arch"] == "sm_90a" and not row["tensor_cores"]:
        out.append("bf16 tile path without wgmma on sm_90a")
    return out


def table_in_subprocess(families, dtypes, archs, kernels=None) -> list[dict]:
    """`table` in a fresh Python process: a process whose Triton runs kernels under TRITON_INTERPRET=1 (the CPU
    test suite) holds interpreted language functions that the real compiler refuses."""
    import json
    import subprocess
    import sys
    code = ("import json, sys; from amp_kernels import compiled; a = json.loads(sys.argv[1]); "
            "print('ROWS ' + json.dumps(compiled.table(a['f'], tuple(a['d']), tuple(a['a']), kernels=a['k'])))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    args = json.dumps({"f": list(families), "d": list(dtypes), "a": list(archs),
                       "k": list(kernels) if kernels else None})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, env=env, cwd=root)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")), None)
    if line is None:
        raise RuntimeError(f"the compile check failed to run:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("ROWS "):])

"""The search behind the launch-configuration rules in amp_kernels (head_norms_config, gqa_attention_config,
decode_config, swiglu_matmul_config): every candidate tile / warps / stages compiled for sm_80 and sm_90a at a
representative shape of each class (head_dim, dtype), and the resources ptxas reports. A candidate qualifies when
it does not spill, keeps register headroom (at most MAX_REGISTERS of the 255 a thread may hold: a candidate at the
cap spilled at other shapes of its class, Gemma's decode at sm_80 among them), fits in shared memory and, on a bf16 /
fp16 tile path on sm_90a, uses wgmma; among those the rule takes the one with the most work per program (tile area),
then the higher occupancy. No GPU is needed; a GPU run can time the qualifying candidates (benchmarks/gpu_check.sh).

    python -m benchmarks.sweep_configs [--kernels head_norms,prefill,decode,swiglu_matmul] [--name sweep_configs]
    python -m benchmarks.sweep_configs --reselect [--write]   # the rule over the last recorded sweep, no compiling;
                                                              # --write rewrites amp_kernels/configs.py's tables
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import RESULTS, record

HALF, FP32 = torch.bfloat16, torch.float32
MAX_REGISTERS = 232         # headroom under the 255-register cap (see the docstring)


def _m(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def candidates(kernel: str, dtype: torch.dtype, d: int):
    half = dtype != torch.float32
    if kernel == "head_norms":
        for bt, bo, bk, w, st in itertools.product((64, 128) if half else (16, 32, 64),
                                                   (32, 64, 128) if half else (32, 64), (32, 64), (4, 8),
                                                   (2, 3) if half else (2,)):
            if bk <= d and d % bk == 0:
                yield dict(BLOCK_T=bt, BLOCK_O=bo, BLOCK_K=bk, num_warps=w, num_stages=st)
    elif kernel == "prefill":
        for bm, bn, w, st in itertools.product((64, 128) if half else (16, 32, 64), (32, 64) if half else (16, 32),
                                               (4, 8), (1, 2, 3) if half else (1, 2)):
            yield dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
    elif kernel == "decode":
        for bn, w, st in itertools.product((32, 64, 128), (4, 8), (1, 2)):
            yield dict(BLOCK_N=bn, num_warps=w, num_stages=st)
    elif kernel == "swiglu_matmul":
        for bn, bi, bk, w, st in itertools.product((64, 128), (32, 64, 128), (32, 64), (4, 8), (2, 3)):
            yield dict(BLOCK_N=bn, BLOCK_I=bi, BLOCK_K=bk, num_warps=w, num_stages=st)


def launch(kernel: str, dtype: torch.dtype, d: int, cfg: dict):
    """(launcher, args, kwargs) of one representative call with the configuration forced."""
    from amp_kernels import decode_groups
    from amp_kernels.triton_gqa_attention import gqa_attention_triton
    from amp_kernels.triton_gqa_decode import decode_config, gqa_decode_triton
    from amp_kernels.triton_head_norms import head_norms_triton
    from amp_kernels.triton_swiglu_matmul import swiglu_matmul_triton
    heads, kv, hidden = 32, 8, 4096
    if kernel == "head_norms":
        return head_norms_triton, (_m(4096, heads * d, dtype=dtype), _m(hidden, heads * d, dtype=dtype), heads), \
            {"config": cfg}
    if kernel == "prefill":
        return gqa_attention_triton, (_m(1, heads, 2048, d, dtype=dtype), _m(1, kv, 2048, d, dtype=dtype),
                                      _m(1, kv, 2048, d, dtype=dtype), torch.empty(heads, dtype=torch.long,
                                                                                   device="meta")), {"config": cfg}
    if kernel == "decode":
        base = decode_config(1, kv, heads // kv, 1, 8192, d, dtype, 90)
        full = {**base, **cfg}
        full["SPLIT"] = -(-base["SPLIT"] // cfg["BLOCK_N"]) * cfg["BLOCK_N"]
        full["splits"] = -(-8192 // full["SPLIT"])
        groups = decode_groups(torch.arange(heads) // (heads // kv), kv)
        return gqa_decode_triton, (_m(1, heads, 1, d, dtype=dtype), _m(1, kv, 8192, d, dtype=dtype),
                                   _m(1, kv, 8192, d, dtype=dtype), groups), {"config": full}
    return swiglu_matmul_triton, (_m(4096, hidden, dtype=dtype), _m(14336, hidden, dtype=dtype),
                                  _m(14336, hidden, dtype=dtype)), {"config": cfg}


def qualifies(row: dict) -> bool:
    """The rule's filter (row: a sweep row, from this run or from the recorded CSV)."""
    if row.get("error") or str(row.get("registers", "")) in ("", "None"):
        return False
    half, arch = row["dtype"] != "float32", int(str(row["arch"]).replace("sm_", ""))
    return not int(row["spill_stores"]) and not int(row["spill_loads"]) and \
        str(row["shared_over_limit"]) == "False" and int(row["registers"]) <= MAX_REGISTERS and \
        (not half or arch != 90 or row["kernel"] == "decode" or str(row["tensor_cores"]) == "True")


def choose(rows: list[dict]) -> dict:
    """Per (kernel, dtype, head_dim, arch): the qualifying row with the largest tile, then the higher occupancy."""
    best = {}
    for row in rows:
        if not qualifies(row):
            continue
        key = (row["kernel"], row["dtype"], int(row["head_dim"]), int(str(row["arch"]).replace("sm_", "")))
        rank = (int(row["tile"]), float(row["occupancy"]))
        if key not in best or rank > (int(best[key]["tile"]), float(best[key]["occupancy"])):
            best[key] = row
    return best


def summarize(rows: list[dict], best: dict, kernels: list[str], dims: list[int]) -> list[str]:
    lines = []
    for key, row in sorted(best.items()):
        cfg = {k: int(v) for k, v in row.items() if (k.startswith("BLOCK") or k in ("num_warps", "num_stages"))
               and str(v) not in ("", "None")}
        lines.append(f"{key}: {cfg} -> registers {row['registers']}, shared {row['shared_bytes']}, occupancy "
                     f"{row['occupancy']}, tensor cores {row['tensor_cores']}")
    missing = {(k, dt, d, a) for k in kernels for dt in ("bfloat16", "float32")
               for d in ([128] if k == "swiglu_matmul" else dims) for a in (80, 90)} - set(best)
    lines.append(f"classes without a qualifying candidate: {sorted(missing) or 'none'}")
    return lines


TABLES = {"head_norms": ("HEAD_NORMS", ("BLOCK_T", "BLOCK_O", "BLOCK_K")), "prefill": ("PREFILL", ("BLOCK_M", "BLOCK_N")),
          "decode": ("DECODE", ("BLOCK_N",)), "swiglu_matmul": ("SWIGLU_MATMUL", ("BLOCK_N", "BLOCK_I", "BLOCK_K"))}


def write_configs(best: dict, path: Path) -> None:
    """Rewrites the tables of amp_kernels/configs.py from the chosen rows (keys: fp32, head_dim, arch)."""
    import re
    text = path.read_text()
    for kernel, (table, blocks) in TABLES.items():
        entries = sorted(((dt == "float32", d, a), row) for (k, dt, d, a), row in best.items() if k == kernel)
        if not entries:
            continue
        body = "".join(f"    {key!r}: {dict({b: int(row[b]) for b in blocks}, num_warps=int(row['num_warps']), num_stages=int(row['num_stages']))!r},\n"
                       for key, row in entries)
        text, n = re.subn(rf"^{table} = \{{\n.*?^\}}\n", f"{table} = {{\n{body}}}\n", text, flags=re.S | re.M)
        assert n == 1, table
    path.write_text(text)


def reselect(name: str, write: bool = False) -> int:
    """The rule over the last recorded sweep (rows of its newest commit), printed (and with `write`, written into
    amp_kernels/configs.py); nothing is compiled."""
    import csv
    rows = list(csv.DictReader(open(Path(RESULTS) / f"{name}.csv")))
    last = rows[-1]["date"]
    rows = [r for r in rows if r["date"] == last]
    kernels = sorted({r["kernel"] for r in rows})
    dims = sorted({int(r["head_dim"]) for r in rows})
    best = choose(rows)
    for line in summarize(rows, best, kernels, dims):
        print(line)
    if write:
        write_configs(best, Path(__file__).resolve().parents[1] / "amp_kernels" / "configs.py")
    return 0


def main(argv=None) -> int:
    from amp_kernels import compiled
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default="head_norms,prefill,decode,swiglu_matmul")
    p.add_argument("--dims", default="64,96,128,256")
    p.add_argument("--name", default="sweep_configs")
    p.add_argument("--reselect", action="store_true", help="apply the rule to the last recorded sweep")
    p.add_argument("--write", action="store_true", help="with --reselect: rewrite amp_kernels/configs.py's tables")
    args = p.parse_args(argv)
    if args.reselect:
        return reselect(args.name, args.write)
    rows = []
    start = time.perf_counter()
    for kernel in args.kernels.split(","):
        dims = [128] if kernel == "swiglu_matmul" else [int(x) for x in args.dims.split(",")]
        for dtype, d, arch in itertools.product((HALF, FP32), dims, compiled.ARCHS):
            for cfg in candidates(kernel, dtype, d):
                launcher, a, kw = launch(kernel, dtype, d, cfg)
                calls = compiled.capture(arch, launcher, *a, **kw)
                try:
                    res = compiled.resources(compiled.compile_launch(calls[0], arch), arch)
                except Exception as e:  # noqa: BLE001 - a failed candidate is a row, not a crash
                    res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
                tile = 1
                for k, v in cfg.items():
                    if k.startswith("BLOCK") and k != "BLOCK_K":
                        tile *= v
                row = {"kernel": kernel, "dtype": str(dtype).replace("torch.", ""), "head_dim": d,
                       "arch": f"sm_{arch}", **cfg, "tile": tile, **res}
                row["qualifies"] = qualifies(row)
                rows.append(row)
                print(f"{kernel} {row['dtype']} d={d} sm_{arch} {cfg}: " +
                      (res.get("error") or f"regs {res['registers']} spill {res['spill_stores']} shared "
                       f"{res['shared_bytes']} tc {res['tensor_cores']} occ {res['occupancy']}"), file=sys.stderr)
    kernels, dims = args.kernels.split(","), [int(x) for x in args.dims.split(",")]
    summary = [f"{len(rows)} candidates compiled in {time.perf_counter() - start:.0f} s; the chosen per class:",
               *summarize(rows, choose(rows), kernels, dims)]
    for line in summary:
        print(line)
    record(args.name, rows, summary, Path(RESULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())

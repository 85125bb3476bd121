"""Every Triton kernel compiled for the A100 (sm_80) and the H100 (sm_90a) at the launch configurations the
launchers choose, for every supported family's layer shapes and bf16 / fp16 / fp32: registers, spills, stack,
shared memory, tensor-core instructions and theoretical occupancy (amp_kernels/compiled.py), and the checks the
default suite applies to a subset (no spill, shared memory within the limit, wgmma on bf16 tile paths on sm_90a).

    python -m benchmarks.bench_compiled [--families F1,F2] [--dtypes bf16,fp16,fp32] [--name bench_compiled]

No GPU is needed: Triton compiles for a target that is not there. The table goes to benchmarks/results/ with the
Triton version and commit (harness.record).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.harness import RESULTS, record


def main(argv=None) -> int:
    from amp_kernels import compiled
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(compiled.FAMILIES))
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--name", default="bench_compiled", help="results file name")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = compiled.table(args.families.split(","), tuple(args.dtypes.split(",")),
                          progress=lambda s: print(f"compiling {s}", file=sys.stderr, flush=True))
    for row in rows:
        row["problems"] = "; ".join(compiled.problems(row))
    bad = [r for r in rows if r["problems"]]
    distinct = {(r["kernel"].split(" [")[0], r["dtype"], r["arch"], r["config"]) for r in rows}
    import triton
    summary = [f"Triton {triton.__version__}: {len(rows)} (family, kernel, dtype, arch) launches, {len(distinct)} distinct "
               f"compilations, in {time.perf_counter() - start:.0f} s; {len(bad)} with a problem (spill, shared memory "
               "over the limit, or a bf16 tile path without wgmma on sm_90a)."]
    for kernel in sorted({r["kernel"] for r in rows}):
        mine = [r for r in rows if r["kernel"] == kernel and "registers" in r]
        if mine:
            summary.append(f"{kernel}: registers {min(r['registers'] for r in mine)}-{max(r['registers'] for r in mine)}, "
                           f"spill stores up to {max(r['spill_stores'] for r in mine)} B, occupancy "
                           f"{min(r['occupancy'] for r in mine):.3f}-{max(r['occupancy'] for r in mine):.3f}, "
                           f"{sum(bool(r['problems']) for r in mine)} of {len(mine)} with a problem.")
    for line in summary:
        print(line)
    record(args.name, rows, summary, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

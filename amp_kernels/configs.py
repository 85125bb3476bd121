"""Launch configurations per GPU architecture, head_dim and precision class, chosen by compiling every candidate for
sm_80 and sm_90a (`python -m benchmarks.sweep_configs`, benchmarks/results/sweep_configs.md): among candidates that do
not spill, fit in shared memory and (bf16 / fp16 tile paths on sm_90a) use wgmma, the one with the most work per
program, then the highest occupancy. Keys: (fp32, head_dim, arch); a head_dim between classes takes the next larger
class's tiles. No GPU timed these; benchmarks/gpu_check.sh times the kernels where one is lent."""
from __future__ import annotations

import torch


HEAD_NORMS = {
    (False, 64, 80): {'BLOCK_T': 128, 'BLOCK_O': 128, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 2},
    (False, 64, 90): {'BLOCK_T': 128, 'BLOCK_O': 128, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 2},
    (False, 96, 80): {'BLOCK_T': 128, 'BLOCK_O': 128, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 3},
    (False, 96, 90): {'BLOCK_T': 128, 'BLOCK_O': 128, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 2},
    (False, 128, 80): {'BLOCK_T': 128, 'BLOCK_O': 128, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 2},
    (False, 128, 90): {'BLOCK_T': 128, 'BLOCK_O': 128, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 2},
    (False, 256, 80): {'BLOCK_T': 128, 'BLOCK_O': 128, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 2},
    (False, 256, 90): {'BLOCK_T': 128, 'BLOCK_O': 128, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 2},
    (True, 64, 80): {'BLOCK_T': 64, 'BLOCK_O': 64, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 2},
    (True, 64, 90): {'BLOCK_T': 64, 'BLOCK_O': 64, 'BLOCK_K': 64, 'num_warps': 8, 'num_stages': 2},
    (True, 96, 80): {'BLOCK_T': 64, 'BLOCK_O': 64, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 2},
    (True, 96, 90): {'BLOCK_T': 64, 'BLOCK_O': 64, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 2},
    (True, 128, 80): {'BLOCK_T': 64, 'BLOCK_O': 64, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 2},
    (True, 128, 90): {'BLOCK_T': 64, 'BLOCK_O': 64, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 2},
    (True, 256, 80): {'BLOCK_T': 64, 'BLOCK_O': 64, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 2},
    (True, 256, 90): {'BLOCK_T': 64, 'BLOCK_O': 64, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 2},
}


PREFILL = {
    (False, 64, 80): {'BLOCK_M': 128, 'BLOCK_N': 64, 'num_warps': 8, 'num_stages': 1},
    (False, 64, 90): {'BLOCK_M': 128, 'BLOCK_N': 64, 'num_warps': 8, 'num_stages': 1},
    (False, 96, 80): {'BLOCK_M': 128, 'BLOCK_N': 64, 'num_warps': 8, 'num_stages': 1},
    (False, 96, 90): {'BLOCK_M': 128, 'BLOCK_N': 64, 'num_warps': 8, 'num_stages': 1},
    (False, 128, 80): {'BLOCK_M': 128, 'BLOCK_N': 64, 'num_warps': 8, 'num_stages': 1},
    (False, 128, 90): {'BLOCK_M': 128, 'BLOCK_N': 64, 'num_warps': 8, 'num_stages': 1},
    (False, 256, 80): {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_warps': 8, 'num_stages': 1},
    (False, 256, 90): {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_warps': 8, 'num_stages': 1},
    (True, 64, 80): {'BLOCK_M': 64, 'BLOCK_N': 32, 'num_warps': 8, 'num_stages': 1},
    (True, 64, 90): {'BLOCK_M': 64, 'BLOCK_N': 32, 'num_warps': 4, 'num_stages': 1},
    (True, 96, 80): {'BLOCK_M': 64, 'BLOCK_N': 32, 'num_warps': 8, 'num_stages': 2},
    (True, 96, 90): {'BLOCK_M': 64, 'BLOCK_N': 32, 'num_warps': 8, 'num_stages': 2},
    (True, 128, 80): {'BLOCK_M': 64, 'BLOCK_N': 32, 'num_warps': 8, 'num_stages': 2},
    (True, 128, 90): {'BLOCK_M': 64, 'BLOCK_N': 32, 'num_warps': 8, 'num_stages': 2},
    (True, 256, 80): {'BLOCK_M': 32, 'BLOCK_N': 32, 'num_warps': 8, 'num_stages': 1},
    (True, 256, 90): {'BLOCK_M': 32, 'BLOCK_N': 32, 'num_warps': 8, 'num_stages': 2},
}


DECODE = {
    (False, 64, 80): {'BLOCK_N': 128, 'num_warps': 8, 'num_stages': 2},
    (False, 64, 90): {'BLOCK_N': 128, 'num_warps': 8, 'num_stages': 2},
    (False, 96, 80): {'BLOCK_N': 128, 'num_warps': 8, 'num_stages': 1},
    (False, 96, 90): {'BLOCK_N': 128, 'num_warps': 8, 'num_stages': 2},
    (False, 128, 80): {'BLOCK_N': 128, 'num_warps': 8, 'num_stages': 1},
    (False, 128, 90): {'BLOCK_N': 128, 'num_warps': 8, 'num_stages': 2},
    (False, 256, 80): {'BLOCK_N': 128, 'num_warps': 8, 'num_stages': 1},
    (False, 256, 90): {'BLOCK_N': 128, 'num_warps': 8, 'num_stages': 1},
    (True, 64, 80): {'BLOCK_N': 128, 'num_warps': 8, 'num_stages': 1},
    (True, 64, 90): {'BLOCK_N': 128, 'num_warps': 8, 'num_stages': 2},
    (True, 96, 80): {'BLOCK_N': 64, 'num_warps': 8, 'num_stages': 1},
    (True, 96, 90): {'BLOCK_N': 128, 'num_warps': 8, 'num_stages': 2},
    (True, 128, 80): {'BLOCK_N': 64, 'num_warps': 8, 'num_stages': 1},
    (True, 128, 90): {'BLOCK_N': 128, 'num_warps': 8, 'num_stages': 2},
    (True, 256, 80): {'BLOCK_N': 32, 'num_warps': 8, 'num_stages': 1},
    (True, 256, 90): {'BLOCK_N': 64, 'num_warps': 8, 'num_stages': 1},
}


SWIGLU_MATMUL = {
    (False, 128, 80): {'BLOCK_N': 128, 'BLOCK_I': 128, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 3},
    (False, 128, 90): {'BLOCK_N': 128, 'BLOCK_I': 128, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 2},
    (True, 128, 80): {'BLOCK_N': 128, 'BLOCK_I': 32, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 3},
    (True, 128, 90): {'BLOCK_N': 64, 'BLOCK_I': 64, 'BLOCK_K': 32, 'num_warps': 8, 'num_stages': 2},
}



def lookup(table: dict, dtype: torch.dtype, head_dim: int, arch: int) -> dict:
    """The table's entry for this precision class, architecture and head_dim (the next larger class, else the
    largest); an architecture not in the table (a newer GPU) takes sm_90a's."""
    fp32 = dtype == torch.float32
    arch = arch if any(a == arch for _, _, a in table) else 90
    dims = sorted(d for f, d, a in table if f == fp32 and a == arch)
    d = next((x for x in dims if x >= head_dim), dims[-1])
    return dict(table[(fp32, d, arch)])

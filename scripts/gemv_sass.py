"""The 16-bit one-launch GEMV's machine code for sm_90, compiled on a machine without a GPU: registers, stack
(spills) and shared memory per launch shape, as scripts/nf4_sass.py does for the NF4 kernel (its docstring says
how to install Triton 3.6, the GPU machines' version):

  PYTHONPATH=/tmp/triton36:src python scripts/gemv_sass.py [--rows 6,32,128] [--group q/k/v] [--set MODULE.CONST=V]

Each row compiles `engine/gemv_kernels._gemv_kernel` as `_launch` would launch it for a Qwen2.5-1.5B layer's group
(LoRA r=32, the shrink in the launch, bf16 x, the launcher's tile options and split for an H100/H200's 132 SMs), with
the integer arguments specialised as the launch specialises them (`nf4_sass.specialised`).
"""
from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ahazero.engine import gemv_kernels as gk  # noqa: E402
from ahazero.engine import lora_kernels as lk  # noqa: E402
from ahazero.models import nf4_kernels as nk  # noqa: E402
from nf4_sass import cuobjdump, specialised  # noqa: E402
from rollout import set_constant  # noqa: E402  (bench/rollout.py's --set)

GROUPS = {"q/k/v": (1536, [1536, 256, 256], True), "o": (1536, [1536], False), "gate/up": (1536, [8960, 8960], False),
          "down": (8960, [1536], False)}  # K, the outputs, bias
R, SMS = 32, 132


def compile_group(group: str, rows: int):
    """(the compiled kernel, its launch options) for `group` at `rows` rows, as gemv_kernels._launch sets them."""
    K, outs, bias = GROUPS[group]
    block_o, block_k, num_warps, num_stages = ((gk.BLOCK_O, gk.BLOCK_K, gk.NUM_WARPS, None) if rows <= 32
                                               else gk.LARGE_CONFIG)
    ends = list(itertools.accumulate(triton.cdiv(o, block_o) for o in outs))
    tiles = ends[-1]
    all_rows = max(16, triton.next_power_of_2(rows))
    block_n = min(all_rows, gk.ROWS_PER_PROGRAM)
    row_tiles = triton.cdiv(rows, block_n)
    jobs = tiles * row_tiles
    if num_stages is None:
        num_stages = gk.WIDE_STAGES if jobs >= SMS else gk.NUM_STAGES
    shrink_splits, shrink_span = nk.shrink_splits(K, nk.SHRINK_K)
    producers = len(outs) * shrink_splits
    splits, per_split = nk.split_k(jobs, K, SMS, gk.PROGRAMS_PER_SM, gk.MIN_K_PER_SPLIT, block_k,
                                   gk.BALANCED_SPLITS, producers)
    ints = dict(N=rows, K=K, R=R, G=len(outs), x_row_stride=K, tiles=tiles, producers=producers,
                row_tiles=row_tiles, end0=ends[0], end1=ends[min(1, len(ends) - 1)],
                **{f"o{g}": outs[min(g, len(outs) - 1)] for g in range(3)})
    types = {"x_ptr": "*bf16", "xa_ptr": "*fp32", "partial_ptr": "*fp32", "count_ptr": "*i32"}
    for g in range(3):
        types.update({f"w{g}": "*bf16", f"bias{g}": "*bf16", f"la{g}": "*fp32", f"lb{g}": "*fp32",
                      f"y{g}": "*bf16", f"s{g}": "fp32"})
    constants = dict(K_PER_SPLIT=per_split, SHRINK_SPLITS=shrink_splits, SHRINK_K=shrink_span,
                     SHRINK_BLOCK_K=nk.SHRINK_BLOCK_K, SHRINK_ROWS=all_rows, HAS_BIAS=bias, HAS_LORA=True,
                     BLOCK_N=block_n, BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_R=nk.block_r(R), DOT_F32=False,
                     PRECISION=lk.DOT_PRECISION, SPLITS=splits, USE_PDL=True)
    signature, constants, attrs = specialised(gk._gemv_kernel, types, constants, ints)
    kernel = triton.compile(ASTSource(gk._gemv_kernel, signature, constants, attrs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    return kernel, dict(programs=producers + jobs * splits, splits=splits, block_n=block_n, stages=num_stages)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="6,32,128")
    ap.add_argument("--group", default=",".join(GROUPS), help="comma-separated: " + ", ".join(GROUPS))
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.CONSTANT=VALUE")
    args = ap.parse_args()
    for setting in args.set:
        set_constant(setting)
    print(f"triton {triton.__version__}, sm_90, {SMS} SMs")
    print("| group | rows | programs | splits | rows a program | stages | registers, stack, shared bytes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for group in args.group.split(","):
        for rows in map(int, args.rows.split(",")):
            kernel, launch = compile_group(group, rows)
            usage = " ".join(re.findall(r"REG:\d+|STACK:\d+", cuobjdump(kernel, "--dump-resource-usage")))
            print(f"| {group} | {rows} | {launch['programs']} | {launch['splits']} | {launch['block_n']} | "
                  f"{launch['stages']} | {usage} SHARED:{kernel.metadata.shared} |", flush=True)


if __name__ == "__main__":
    main()

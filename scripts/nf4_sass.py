"""The fused NF4 GEMV's machine code for sm_90, compiled on a machine without a GPU: registers, spills and the
main loop's SASS instructions a block, by opcode (how the sixteenth session weighed the NF4 lookups offline,
bench/RESULTS.md).

Triton compiles for a target without a driver (`triton.compile` with a `GPUTarget`) and ships `cuobjdump`. The
GPU machines run Triton 3.6, whose code differs from newer releases', so compile with that one:

  pip install --target /tmp/triton36 --no-deps "triton==3.6.0"
  PYTHONPATH=/tmp/triton36:src python scripts/nf4_sass.py [--rows 32] [--set ahazero.models.nf4_kernels.LOOKUP=nibbles]
      [--dump FILE]

The loop is found as the backward branch after the last 16-bit HGMMA (the dot of a block); the kernel is compiled
with the LoRA shrink in the launch, 16-bit x, the launcher's constants (the LoRA dots' TF32x3 precision) and its
specialisation of the integer arguments (`launch_ints`). Its registers match what ncu reports for the launch on an
H200 (166 at 32 rows); the sixteenth session's counts (294 instructions, 159 registers at 32 rows) came from a
compile without those two and overstated the loop (x's loads were not vectorised).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ahazero.engine import lora_kernels as lk  # noqa: E402
from ahazero.models import nf4_kernels as nk  # noqa: E402
from rollout import set_constant  # noqa: E402  (bench/rollout.py's --set)


def launch_ints(rows: int) -> dict[str, int]:
    """The integer arguments of `nf4_gemv`'s launch for Qwen2.5-1.5B's gate/up group (K 1536, two weights of
    8,960 rows) on an H100/H200's 132 SMs, with the LoRA shrink (r=32) in the launch; and `splits`, its SPLITS,
    and `shrink_span`, its SHRINK_K."""
    K, O, G, R = 1536, 8960, 2, 32
    row_blocks = K // nk.QBLOCK
    tiles = G * triton.cdiv(O, nk.BLOCK_O)
    splits, per_split = nk._splits(tiles, row_blocks, 132, rows <= nk.FMA_MAX_ROWS)
    shrink_splits, shrink_span = nk.shrink_splits(K, nk.SHRINK_K)
    return dict(N=rows, K=K, R=R, G=G, row_blocks=row_blocks, x_stride=K, x_row_stride=K // 2,
                blocks_per_split=per_split, tiles=tiles, splits=splits, shrink_span=shrink_span,
                producers=G * shrink_splits,
                o0=O, o1=O, o2=O, end0=tiles // 2, end1=tiles)


def compile_kernel(rows: int, lookup: str):
    """`_nf4_gemv_kernel` for sm_90 as `nf4_gemv` launches it for bf16 x of `rows` rows (LoRA r=32, the shrink in
    the launch, no bias), with the launcher's specialisation of the integer arguments (`launch_ints`): one equal
    to 1 becomes a constant, one divisible by 16 is marked so (what lets Triton vectorise loads whose strides are
    those integers; without it the code differs from the GPU's)."""
    fn = nk._nf4_gemv_kernel
    ints = launch_ints(rows)
    splits, shrink_span = ints.pop("splits"), ints.pop("shrink_span")
    block_n = max(16, triton.next_power_of_2(rows))
    types = {"x_ptr": "*bf16", "xa_ptr": "*fp32", "partial_ptr": "*fp32", "count_ptr": "*i32"}
    for g in range(3):
        types.update({f"packed{g}": "*u8", f"absq{g}": "*u8", f"abs2_{g}": "*fp32", f"offset{g}": "*fp32",
                      f"table{g}": "*fp32", f"dyn{g}": "*fp32", f"bias{g}": "*bf16", f"la{g}": "*fp32",
                      f"lb{g}": "*fp32", f"y{g}": "*bf16", f"s{g}": "fp32", f"o{g}": "i32"})
    constants = dict(HAS_BIAS=False, HAS_LORA=True, BLOCK_N=block_n, BLOCK_O=nk.BLOCK_O, BLOCK_R=32,
                     X_PAIRS=True, DOT_F32=False, FMA=False, LOOKUP=lookup,
                     PERMUTE_PTX=nk.permute_lookup_ptx(torch.bfloat16) if lookup == "permute" else "",
                     PREFETCH=nk.PREFETCH, PRECISION=lk.DOT_PRECISION,
                     SHRINK_SPLITS=ints["producers"] // ints["G"], SHRINK_K=shrink_span,
                     SHRINK_BLOCK_K=nk.SHRINK_BLOCK_K, SHRINK_ROWS=block_n, SPLITS=splits, USE_PDL=True)
    signature, constants, attrs = specialised(fn, types, constants, ints)
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=nk.NUM_WARPS, num_stages=1, enable_fp_fusion=False))


def specialised(fn, types: dict[str, str], constants: dict, ints: dict[str, int]):
    """(signature, constants, attributes) for `ASTSource` as a launch specialises a kernel `fn` on its integer
    arguments `ints` (those not in its do_not_specialize): one equal to 1 becomes a constant, one divisible by 16
    and every pointer are marked so. types: the non-i32 arguments' types; constants: the constexprs."""
    kept = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}  # the kernel's do_not_specialize
    ints = {name: value for name, value in ints.items() if name not in kept}
    constants = dict(constants, **{name: 1 for name, value in ints.items() if value == 1})
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        signature[name] = "constexpr" if name in constants else types.get(name, "i32")
        if signature[name].startswith("*") or (signature[name] == "i32" and ints.get(name, 1) % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def cuobjdump(kernel, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True, check=True).stdout


def main_loop(sass: str) -> list[str]:
    """The instructions of the loop over a split's blocks: the first backward branch after the last 16-bit HGMMA
    (the block's dot; the LoRA epilogue's float32 dots are TF32 HGMMAs), from its target to the branch."""
    lines = [(int(m.group(1), 16), m.group(2).strip()) for m in
             re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass, re.M)]
    last_dot = max(i for i, (_, ins) in enumerate(lines) if re.search(r"HGMMA\S*\.(BF16|F16)\b", ins))
    for at, ins in lines[last_dot:]:
        target = re.search(r"BRA (0x[0-9a-f]+)", ins)
        if target and int(target.group(1), 16) < at:
            return [i for a, i in lines if int(target.group(1), 16) <= a <= at]
    raise SystemExit("no loop found after the last 16-bit HGMMA")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.CONSTANT=VALUE",
                    help="a module constant, as bench/rollout.py's --set (nf4_kernels' LOOKUP, BLOCK_O, NUM_WARPS, "
                         "PREFETCH), repeatable")
    ap.add_argument("--dump", help="write the whole SASS here")
    args = ap.parse_args()
    for setting in args.set:
        set_constant(setting)
    kernel = compile_kernel(args.rows, nk.LOOKUP)
    print(f"triton {triton.__version__}, sm_90, {args.rows} rows, LOOKUP {nk.LOOKUP}:",
          " ".join(re.findall(r"REG:\d+|STACK:\d+|LOCAL:\d+", cuobjdump(kernel, "--dump-resource-usage"))))
    sass = cuobjdump(kernel, "--dump-sass")
    if args.dump:
        Path(args.dump).write_text(sass)
    loop = main_loop(sass)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0] for ins in loop)
    print(f"main loop: {len(loop)} instructions a block;", ", ".join(f"{op} {n}" for op, n in ops.most_common(16)))


if __name__ == "__main__":
    main()

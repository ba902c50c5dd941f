"""Where a decode GEMV's fixed time goes (issue 4): one Qwen2.5-1.5B layer's projection groups at a decode batch,
each launched alone by engine/gemv_kernels.py's `_launch` with parts of its work taken away, beside cuBLAS, an
empty launch of the same grid (the floor of a launch in a CUDA graph) and the bytes at the copy bandwidth.

  L               the engine's launch: K split as it splits it, the LoRA shrink in the launch, the expand in the
                  tile's epilogue
  -               the same without the adapter (no shrink producers, no wait for them, no expand)
  -/-/-/u         no LoRA, one program a tile (no split-K partials' round trip)
  L/-/-/1792/2    the adapter on, K split for 2 programs per SM in parts of at least 1,792 columns
  L/-/-/-/-/-/32  the adapter on, 32 rows of x a program (at --batch 128: 4 programs a tile)
  16/512/3        no LoRA, tiles of 16 weight rows, 512 columns a step, 3 stages (split as the engine splits)
  L16/512/3/u     the adapter on, the same tiles unsplit

Each time is the median of CUDA-graph replays (triton.testing.do_bench_cudagraph) over LAYERS distinct copies of
the weights (more than the L2), per launch, in microseconds; every variant is first checked against PyTorch.
Run on a GPU machine from the repository root:  python bench/gemv_latency.py [--batch 6] [--set MODULE.CONST=VAL]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from ahazero.models.nf4_kernels import wait_for_inputs  # noqa: E402

LAYERS = 28
H, I, KV, R = 1536, 8960, 256, 32  # Qwen2.5-1.5B: hidden, intermediate, k/v width; LoRA rank
GROUPS = {"q/k/v": (H, [H, KV, KV]), "o": (H, [H]), "gate/up": (H, [I, I]), "down": (I, [H])}
DEFAULT_VARIANTS = "L,-,-/-/-/u,32,16,16/-/-/u,L16,L16/-/-/u"


def variant(spec: str) -> tuple[bool, dict]:
    """A variant's (with LoRA, _launch's keyword arguments) from
    "[L]BLOCK_O[/BLOCK_K[/STAGES[/SPLIT[/PPS[/SK[/ROWS]]]]]]": L puts the adapter on; SPLIT is u (K unsplit) or the
    least columns a split reads (MIN_K_PER_SPLIT), PPS the programs per SM K is split for, SK the columns of K per
    LoRA shrink producer, ROWS x's rows per program; "-" or an absent field is the engine's own (so "L" is the
    engine's launch and "-" the same without LoRA)."""
    lora = spec.startswith("L")
    fields = (spec[1:] if lora else spec).split("/")
    kw = {k: int(v) for k, v in zip(("block_o", "block_k", "num_stages"), fields) if v not in ("", "-")}
    if len(fields) > 3 and fields[3] not in ("", "-"):
        kw["min_k_per_split"] = 1 << 30 if fields[3] == "u" else int(fields[3])
    kw.update({k: int(v) for k, v in zip(("programs_per_sm", "shrink_k", "rows_per_program"), fields[4:])
               if v not in ("", "-")})
    return lora, kw


@triton.jit
def _empty_kernel(out_ptr, USE_PDL: tl.constexpr):
    wait_for_inputs(USE_PDL)
    tl.store(out_ptr + tl.program_id(0), 1.0)


def bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, return_mode="median") * 1e3 / LAYERS  # us per launch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--groups", default=",".join(GROUPS))
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated; see the module docstring")
    p.add_argument("--copy-tbps", type=float, default=4.0, help="the copy bandwidth for the bytes column, TB/s")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.CONSTANT=VALUE")
    args = p.parse_args()
    from rollout import set_constant  # bench/ is the script's folder
    for setting in args.set:
        set_constant(setting)
    from ahazero.engine import gemv_kernels as gk
    from ahazero.models import nf4_kernels as nk
    dev, N = torch.device("cuda"), args.batch
    names = args.variants.split(",")
    print(f"| group (N = {N}) | MB | at {args.copy_tbps:g} TB/s | cuBLAS | empty launch | " + " | ".join(names) + " |")
    print("| --- " * (len(names) + 5) + "|", flush=True)
    for gname in args.groups.split(","):
        K, outs = GROUPS[gname]
        layers = []
        for _ in range(LAYERS):
            w = [torch.randn(O, K, device=dev, dtype=torch.bfloat16) * K ** -0.5 for O in outs]
            bias = [torch.randn(O, device=dev, dtype=torch.bfloat16) for O in outs] if gname == "q/k/v" else None
            a = [torch.randn(R, K, device=dev) * K ** -0.5 for _ in outs]  # float32, as PEFT's
            b = [torch.randn(O, R, device=dev) * R ** -0.5 for O in outs]
            layers.append((w, bias, a, b))
        x = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        mb = sum(O * K * 2 for O in outs) / 1e6
        row = [f"{mb:.1f}", f"{mb / args.copy_tbps:.1f}"]

        def cublas():
            for w, bias, _, _ in layers:
                for i, wi in enumerate(w):
                    torch.nn.functional.linear(x, wi, None if bias is None else bias[i])
        row.append(f"{bench(cublas):.1f}")
        flags = torch.empty(1 << 16, device=dev)
        tiles = sum(triton.cdiv(O, gk.BLOCK_O) for O in outs)
        grid = (tiles * nk.split_k(tiles, K, nk.sm_count(dev), gk.PROGRAMS_PER_SM, gk.MIN_K_PER_SPLIT, gk.BLOCK_K,
                                     gk.BALANCED_SPLITS)[0],)

        def empty():
            for _ in layers:
                _empty_kernel[grid](flags, **nk.pdl_options(dev))
        row.append(f"{bench(empty):.1f}")
        for name in names:
            lora, kw = variant(name)

            def run(layer):
                w, bias, a, b = layer
                return gk._launch(x, w, bias, None, b if lora else None, [2.0] * len(w), lora_a=a if lora else None,
                                  **kw)
            w, bias, a, b = layers[0]
            try:
                got = run(layers[0])
            except Exception as e:  # noqa: BLE001 - e.g. a tile that does not compile: the table goes on
                row.append(f"{type(e).__name__}")
                print(f"{gname} {name}: {type(e).__name__}: {e}"[:300], file=sys.stderr)
                continue
            err = 0.0
            for i, wi in enumerate(w):
                want = torch.nn.functional.linear(x, wi, None if bias is None else bias[i]).float()
                if lora:
                    want += 2.0 * (x.float() @ a[i].t()) @ b[i].t()
                err = max(err, ((got[i].float() - want).norm() / want.norm()).item())
            if not err < 1e-2:
                row.append(f"error {err:.1e}")
                continue

            def all_layers():
                for layer in layers:
                    run(layer)
            row.append(f"{bench(all_layers):.1f}")
        print(f"| {gname} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()

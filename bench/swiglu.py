"""The MLP tiles' SwiGLU with LoRA terms inside (models/swiglu_kernels.py, issue 5), per kernel configuration,
beside the path it replaced and the memory floor. GPU only.

One tile of Qwen2.5-1.5B's MLP at 16k-token rows: M = 1,024 tokens (TILE_TOKENS) x I = 8,960, LoRA r = 32, bf16.
  forward   hidden = silu(gate + S_g B_g^T) (up + S_u B_u^T): reads gate, up, writes hidden (3 [M, I] tensors)
  backward  reads grad_hidden, gate, up, writes dgate, dup over gate and up (5 [M, I] tensors), adding the
            down projection's dS (sA) into grad_hidden and recomputing gate's and up's LoRA sums
The replaced path: `addmm_` of each LoRA term into its [M, I] product, then fused_math's compiled
`swiglu` / `swiglu_backward_` (forward 2 addmm_ + swiglu, backward 1 addmm_ + swiglu_backward_). The floor is
the bytes each moves at the bandwidth a device-to-device copy reaches here.

Each time is the median of CUDA-graph replays (triton.testing.do_bench_cudagraph) over SETS distinct sets of
tensors (so they come from memory, not from L2), divided by SETS. Every configuration is first checked against
the replaced path.

Run on a GPU machine, from the repository root:  python bench/swiglu.py [--tokens 1024]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

SETS = 8
I, R = 8960, 32
CONFIGS = [  # (BLOCK_M, BLOCK_N, NUM_WARPS), each timed as both kernels' configuration. H200, thirteenth
    # session (RESULTS.md), 1,024-token tiles: 64/64/4 (the default) 24.5 / 41.9 us, 64/128/8 29.8 / 47.1, larger
    # blocks slower (128/128/8 43.0 / 63.5); the base product as tl.dot's accumulator changed nothing (dropped)
    (64, 128, 8), (32, 128, 4), (32, 128, 2), (16, 128, 4), (16, 128, 2), (32, 64, 4), (32, 64, 2), (64, 64, 4),
    (64, 64, 8), (16, 64, 2), (32, 128, 8), (16, 256, 4), (16, 256, 8)]


def bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, return_mode="median") * 1e3 / SETS  # us per tile


def rel(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    import triton.testing
    ms = triton.testing.do_bench_cudagraph(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    args = p.parse_args()
    from ahazero.models import swiglu_kernels as k
    from ahazero.models.fused_math import swiglu, swiglu_backward_
    M, dev, dt = args.tokens, "cuda", torch.bfloat16
    torch.manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(dt)

    sets = [dict(gate=rand(M, I, scale=2.0), up=rand(M, I, scale=2.0), grad=rand(M, I), s_g=rand(M, R),
                 s_u=rand(M, R), ds_d=rand(M, R), b_g=rand(I, R, scale=0.3), b_u=rand(I, R, scale=0.3),
                 a_d=rand(R, I, scale=0.3)) for _ in range(SETS)]
    work = [{n: t.clone() for n, t in s.items() if n in ("gate", "up", "grad")} for s in sets]

    def old_forward_in_place():  # addmm_ into the fresh products, as the tiles did (no extra allocation timed)
        for s, w in zip(sets, work):
            w["gate"].addmm_(s["s_g"], s["b_g"].t())
            w["up"].addmm_(s["s_u"], s["b_u"].t())
            w["hidden"] = swiglu(w["gate"], w["up"])

    def old_backward():
        for s, w in zip(sets, work):
            swiglu_backward_(w["grad"].addmm_(s["ds_d"], s["a_d"]), w["gate"], w["up"])

    def new_forward():
        for s, w in zip(sets, work):
            w["hidden"] = k.swiglu_lora(s["gate"], s["up"], (s["s_g"], s["b_g"]), (s["s_u"], s["b_u"]))

    def new_backward():
        for s, w in zip(sets, work):
            k.swiglu_lora_backward_(s["grad"], w["gate"], w["up"], (s["s_g"], s["b_g"]), (s["s_u"], s["b_u"]),
                                    (s["ds_d"], s["a_d"]))

    # references on set 0
    s0 = sets[0]
    g_ref = torch.addmm(s0["gate"], s0["s_g"], s0["b_g"].t())
    u_ref = torch.addmm(s0["up"], s0["s_u"], s0["b_u"].t())
    hidden_ref = swiglu(g_ref, u_ref)
    dg_ref, du_ref = g_ref.clone(), u_ref.clone()
    swiglu_backward_(torch.addmm(s0["grad"], s0["ds_d"], s0["a_d"]), dg_ref, du_ref)

    bandwidth = copy_bandwidth()
    tile_bytes = M * I * 2
    floor_f, floor_b = 3 * tile_bytes / bandwidth * 1e6, 5 * tile_bytes / bandwidth * 1e6
    old_f = bench(old_forward_in_place)
    old_b = bench(old_backward)
    print(f"tile {M} x {I}, r = {R}, bf16; copy bandwidth {bandwidth / 1e12:.2f} TB/s; us per tile\n")
    print("| path | forward us | backward us | forward / floor | backward / floor | max rel. error |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| memory floor (3 / 5 [M, I] tensors) | {floor_f:.1f} | {floor_b:.1f} | 1.00 | 1.00 | |")
    print(f"| replaced: addmm_ + compiled swiglu | {old_f:.1f} | {old_b:.1f} | {old_f / floor_f:.2f} | "
          f"{old_b / floor_b:.2f} | |")
    saved, times = (k.FORWARD_CONFIG, k.BACKWARD_CONFIG), {}
    for config in CONFIGS:
        k.FORWARD_CONFIG = k.BACKWARD_CONFIG = config
        try:
            hidden = k.swiglu_lora(s0["gate"], s0["up"], (s0["s_g"], s0["b_g"]), (s0["s_u"], s0["b_u"]))
            dg, du = s0["gate"].clone(), s0["up"].clone()
            k.swiglu_lora_backward_(s0["grad"], dg, du, (s0["s_g"], s0["b_g"]), (s0["s_u"], s0["b_u"]),
                                    (s0["ds_d"], s0["a_d"]))
            error = max(rel(hidden, hidden_ref), rel(dg, dg_ref), rel(du, du_ref))
            for w, s in zip(work, sets):
                w["gate"].copy_(s["gate"]), w["up"].copy_(s["up"])
            f, b = times[config] = bench(new_forward), bench(new_backward)
            print(f"| kernels {config} | {f:.1f} | {b:.1f} | {f / floor_f:.2f} | {b / floor_b:.2f} | {error:.1e} |",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile is reported, not fatal
            print(f"| kernels {config} | failed: {type(e).__name__}: {str(e)[:80]} | | | | |", flush=True)
    k.FORWARD_CONFIG, k.BACKWARD_CONFIG = saved
    if times:
        best_f, best_b = (min(times, key=lambda c: times[c][i]) for i in (0, 1))
        print(f"\nfastest: forward {best_f} {times[best_f][0]:.1f} us, backward {best_b} {times[best_b][1]:.1f} us; "
              f"defaults forward {saved[0]}, backward {saved[1]}")


if __name__ == "__main__":
    main()

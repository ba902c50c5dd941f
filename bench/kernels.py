"""Decode-kernel tuning (issues 4 and 6): one decoder layer's LoRA and NF4 work at decode batch sizes,
per kernel configuration, beside the torch path it replaces. GPU only.

  lora  engine/lora_kernels.py's grouped shrink + expand for the 4 groups of a Qwen2.5-1.5B layer (q/k/v,
        o, gate/up, down; r = 32), by (split_k, block_k, shrink warps, expand block_o[, rows per program]
        above 32 rows); the torch row is F.linear + addmm per projection (the engine's path without the
        kernels).
  gemv  engine/gemv_kernels.py: the layer's 4 groups of projections (bf16 weights, q/k/v biases, LoRA r = 32 on
        all), each the LoRA shrink + one lora_gemv launch, by (BLOCK_O, BLOCK_K, NUM_WARPS, NUM_STAGES,
        PROGRAMS_PER_SM); beside the path it replaces, cuBLAS (F.linear) per projection + shrink + expand,
        and cuBLAS alone (no LoRA: the weights' floor). Above 32 rows (GEMV_LARGE_CONFIGS) the engine takes
        cuBLAS + the LoRA kernels; the table says whether one launch would do better there.
  sample     engine/sample_kernels.py's one-pass sampling (temperature 1) over Qwen's 151,936 logits, by
        (PROGRAMS_PER_SM, MIN_V_PER_SPLIT, BLOCK_V, NUM_WARPS); us per call.
  attention  engine/attention_kernels.py's decode attention (Qwen2.5-1.5B's 12 query and 2 KV heads, W1's slot of
        768 positions, 8 completions a prompt of 61-141 tokens) early, midway and late in a 512-token rollout, by
        (CHUNK, BLOCK_T, NUM_WARPS); us per layer.
  nf4   models/nf4_kernels.py's fused dequantise-GEMV for the layer's 4 groups with LoRA, one launch per group
        (engine/gemv_kernels.py's nf4 path), by (LOOKUP, BLOCK_O, NUM_WARPS, PROGRAMS_PER_SM,
        MIN_BLOCKS_PER_SPLIT, PREFETCH); beside it the same groups on 16-bit weights through the
        one-launch projections, and the NF4 kernel launched per projection + the LoRA kernels.

Each time is the median of CUDA-graph replays (triton.testing.do_bench_cudagraph: GPU time, as the
engine's graphs run it) over LAYERS distinct layers (so the weights come from memory, not from L2),
divided by LAYERS: microseconds per layer. Every configuration is first checked against the reference.

Run on a GPU machine, from the repository root:  python bench/kernels.py [--only lora|gemv|nf4|sample|attention]
[--batches 1,6,32]
[--set MODULE.CONSTANT=VALUE]
[--nf4-configs LOOKUP/BO/W/PPS/MBS/PF[/CONSTANT=VALUE...],...]  (nf4: these configurations instead of NF4_CONFIGS)
[--nf4-groups]  (nf4: each group alone over 28 layers, bf16 and NF4, with and without LoRA)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

LAYERS = 8
H, I, KV, R = 1536, 8960, 256, 32  # Qwen2.5-1.5B: hidden, intermediate, k/v width; LoRA rank
GROUPS = [(H, [H, KV, KV]), (H, [H]), (H, [I, I]), (I, [H])]  # (in, outs) of q/k/v, o, gate/up, down
LORA_CONFIGS = [  # (split_k, block_k, shrink warps, expand block_o, precision). H200, sixth session (RESULTS.md):
    # 64/64/2/128 tf32x3 (the default) 34.2 / 48.7 us at N = 6 / 128, 128/64/2/128 tf32x3 33.3 / 44.1, ieee 44.5 / 92.0
    (64, 64, 2, 128, "tf32x3"), (128, 64, 2, 128, "tf32x3"), (128, 64, 4, 128, "tf32x3"), (128, 128, 4, 128, "tf32x3"),
    (256, 64, 2, 128, "tf32x3"), (64, 64, 2, 128, "ieee")]
LORA_LARGE_CONFIGS = [  # (split_k, block_k, shrink warps, expand block_o, precision, rows per program) above 32 rows
    (64, 64, 2, 128, "tf32x3", 16), (64, 64, 2, 128, "tf32x3", 32), (64, 64, 4, 128, "tf32x3", 64),
    (128, 64, 4, 128, "tf32x3", 64), (256, 64, 4, 128, "tf32x3", 64), (128, 64, 4, 64, "tf32x3", 32),
    (256, 128, 4, 64, "tf32x3", 64), (128, 64, 4, 256, "tf32x3", 32), (512, 64, 4, 128, "tf32x3", 128)]
GEMV_CONFIGS = [  # (BLOCK_O, BLOCK_K, NUM_WARPS, NUM_STAGES, PROGRAMS_PER_SM). H200, sixth session (RESULTS.md,
    # ten configurations): 64/128/4/4/1 (the default) fastest per layer at N = 1 and 6, 32/128/4/4/2 at N = 32;
    # gate/up alone preferred 64/64/4/6/2, o alone 16/512/4/3/1
    (64, 128, 4, 4, 1), (64, 64, 4, 6, 1), (32, 128, 4, 4, 1), (32, 128, 4, 4, 2), (16, 512, 4, 3, 1),
    (64, 128, 8, 4, 1), (64, 128, 4, 3, 2), (64, 128, 4, 3, 3), (64, 64, 4, 4, 2), (32, 128, 4, 3, 2),
    (128, 128, 8, 3, 1)]
GEMV_LARGE_CONFIGS = [  # the same above 32 rows, where a tile's x^T operand is 64 or 128 wide
    (64, 64, 4, 4, 1), (64, 64, 8, 4, 1), (64, 128, 4, 3, 1), (128, 64, 8, 3, 1), (128, 64, 4, 4, 1),
    (64, 64, 4, 3, 2), (128, 128, 8, 3, 1)]
NF4_CONFIGS = [  # (LOOKUP, BLOCK_O, NUM_WARPS, PROGRAMS_PER_SM, MIN_BLOCKS_PER_SPLIT, PREFETCH). H100, seventh session
    # (RESULTS.md): the [16] code ("nibbles") 85.6-113 us a layer against the pair table's 100-121; PREFETCH 1-3 within
    # noise. (A `for` loop that Triton software-pipelines, 2-4 stages, took 284-572 us on an H200: dropped.)
    # H200, sixteenth session: the byte permutes ("permute") 61.6-67.3 / 78.3-94.6 us at N = 6 / 32 against the [16]
    # code's 90.2 / 98.7; (2 programs per SM, 8 blocks) the fastest of 4 / 4, 3 / 4, 6 / 4, 2 / 8 and 128 x 8 warps
    ("permute", 64, 4, 2, 8, 2), ("permute", 64, 4, 2, 6, 2), ("permute", 64, 4, 2, 12, 2), ("permute", 64, 4, 3, 8, 2),
    ("permute", 64, 4, 1, 8, 2), ("permute", 64, 4, 2, 8, 1), ("permute", 64, 4, 2, 8, 3), ("nibbles", 64, 4, 4, 4, 2)]


SAMPLE_CONFIGS = [  # (PROGRAMS_PER_SM, MIN_V_PER_SPLIT, BLOCK_V, NUM_WARPS)
    (2, 4096, 1024, 4), (4, 4096, 1024, 4), (8, 4096, 1024, 4), (16, 2048, 1024, 4), (8, 4096, 2048, 8),
    (8, 4096, 1024, 8), (4, 4096, 2048, 8), (16, 4096, 2048, 8)]
ATTENTION_CONFIGS = [  # (CHUNK, BLOCK_T, NUM_WARPS); CHUNK None: chunk_for's choice
    (None, 64, 4), (128, 64, 4), (64, 64, 4), (128, 32, 4), (64, 32, 4), (256, 64, 8), (128, 64, 8), (256, 128, 8)]


def bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, return_mode="median") * 1e3 / LAYERS  # us per layer


def rel(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def lora_table(batches):
    def configs(N):
        return LORA_CONFIGS if N <= 32 else LORA_LARGE_CONFIGS

    from ahazero.engine import lora_kernels as lk
    dev = torch.device("cuda")
    layers = []
    for _ in range(LAYERS):
        groups = []
        for K, outs in GROUPS:
            a = [torch.randn(R, K, device=dev) * K ** -0.5 for _ in outs]  # PEFT keeps the adapter in float32
            b = [torch.randn(O, R, device=dev) * R ** -0.5 for O in outs]
            groups.append((K, a, b))
        layers.append(groups)
    rows = []
    for N in batches:
        xs = {K: torch.randn(N, K, device=dev, dtype=torch.bfloat16) for K in (H, I)}
        ys = [[[torch.zeros(N, O, device=dev, dtype=torch.bfloat16) for O in outs] for _, outs in GROUPS]
              for _ in range(LAYERS)]

        def torch_path():
            for groups, yl in zip(layers, ys):
                for (K, a, b), yg in zip(groups, yl):
                    for A, B, y in zip(a, b, yg):
                        xa = torch.nn.functional.linear(xs[K].to(A.dtype), A)
                        y.copy_(torch.addmm(y.to(B.dtype), xa, B.t(), alpha=2.0))

        def kernels(cfg):
            split_k, block_k, warps, block_o, precision, block_n = (*cfg, lk.BLOCK_N)[:6]
            for groups, yl in zip(layers, ys):
                for (K, a, b), yg in zip(groups, yl):
                    xa = lk._shrink(xs[K], a, split_k=split_k, block_k=block_k, num_warps=warps, precision=precision,
                                    block_n=block_n)
                    lk._expand_add(xa, b, yg, [2.0] * len(a), block_o=block_o, precision=precision, block_n=block_n)

        row = {"N": N, "torch": bench(torch_path)}
        for cfg in configs(N):
            K, a, b = layers[0][3]
            block_n = (*cfg, lk.BLOCK_N)[5]
            y = torch.zeros(N, H, device=dev, dtype=torch.bfloat16)
            xa = lk._shrink(xs[K], a, *cfg[:3], precision=cfg[4], block_n=block_n)
            lk._expand_add(xa, b, [y], [2.0], block_o=cfg[3], precision=cfg[4], block_n=block_n)
            want_xa = xs[K].float() @ a[0].t()
            want = 2.0 * want_xa @ b[0].t()
            err = rel(y, want)
            print(f"LoRA {cfg} N={N}: xa relative error {rel(xa[0], want_xa):.1e}, output {err:.1e}", flush=True)
            row[cfg] = bench(lambda: kernels(cfg)) if err < 1e-2 else float("nan")
        rows.append(row)
    print(f"\nLoRA, us per layer (4 groups, r={R}); torch = F.linear + addmm per projection")
    for row in rows:
        cfgs = configs(row["N"])
        names = ["split %d bk %d w %d bo %d %s" % c[:5] + (" bn %d" % c[5] if len(c) > 5 else "") for c in cfgs]
        print("| N | torch | " + " | ".join(names) + " |")
        print("| --- " * (len(cfgs) + 2) + "|")
        print(f"| {row['N']} | {row['torch']:.1f} | " + " | ".join(f"{row[c]:.1f}" for c in cfgs) + " |")


def gemv_table(batches, gemv_configs_small, shrink_ks, fused_configs=False):
    """Per group and per layer (rows printed as they finish, so a timeout keeps what was measured): each
    configuration with the shrink's own launch (fused_configs: in the launch, nf4_kernels.SHRINK_K columns
    a producer), then the default configuration with the shrink in the launch (gemv_kernels.FUSED_SHRINK)
    for each of shrink_ks (columns of K per producer)."""
    from ahazero.engine import gemv_kernels as gk
    from ahazero.engine import lora_kernels as lk
    from ahazero.models import nf4_kernels as nk
    dev = torch.device("cuda")
    layers = []
    for _ in range(LAYERS):
        groups = []
        for gi, (K, outs) in enumerate(GROUPS):
            w = [torch.randn(O, K, device=dev, dtype=torch.bfloat16) * K ** -0.5 for O in outs]
            bias = [torch.randn(O, device=dev, dtype=torch.bfloat16) for O in outs] if gi == 0 else None
            a = [torch.randn(R, K, device=dev) * K ** -0.5 for _ in outs]  # PEFT keeps the adapter in float32
            b = [torch.randn(O, R, device=dev) * R ** -0.5 for O in outs]
            groups.append((K, w, bias, a, b))
        layers.append(groups)
    names = ["q/k/v", "o", "gate/up", "down"]
    print(f"\nProjections + LoRA, us per layer (bf16, r={R}; rows: one group, then all 4); cublas = F.linear alone "
          "(no LoRA); cublas+lora = the engine's path before gemv_kernels; shrink = lora_shrink alone")
    default = (gk.BLOCK_O, gk.BLOCK_K, gk.NUM_WARPS, None, gk.PROGRAMS_PER_SM)  # stages: _launch's choice
    for N in batches:
        gemv_configs = gemv_configs_small if N <= 32 else GEMV_LARGE_CONFIGS
        print("| N | group | cublas | cublas+lora | shrink | " + " | ".join("BO %s BK %s w %s st %s pps %s" % c
                                                                           + (" (shrink in)" if fused_configs else "")
                                                                           for c in gemv_configs)
              + "".join(f" | default, shrink in the launch ({k} columns a producer)" for k in shrink_ks) + " |")
        print("| --- " * (len(gemv_configs) + len(shrink_ks) + 5) + "|", flush=True)
        xs = {K: torch.randn(N, K, device=dev, dtype=torch.bfloat16) for K in (H, I)}
        for which in [[0], [1], [2], [3], [0, 1, 2, 3]]:
            def cublas(lora: bool):
                for groups in layers:
                    for K, w, bias, a, b in (groups[i] for i in which):
                        ys = [torch.nn.functional.linear(xs[K], wi, None if bias is None else bias[i])
                              for i, wi in enumerate(w)]
                        if lora:
                            lk.lora_expand_add(lk.lora_shrink(xs[K], a), b, ys, [2.0] * len(w))

            def shrink():
                for groups in layers:
                    for K, w, bias, a, b in (groups[i] for i in which):
                        lk.lora_shrink(xs[K], a)

            def one_launch(K, w, bias, a, b, cfg, shrink_k):
                """shrink_k 0: the shrink's own launch first; else the shrink in the launch."""
                block_o, block_k, warps, stages, pps = cfg
                options = dict(block_o=block_o, block_k=block_k, num_warps=warps, num_stages=stages,
                               programs_per_sm=pps)
                if shrink_k:
                    return gk._launch(xs[K], w, bias, None, b, [2.0] * len(w), lora_a=a, shrink_k=shrink_k, **options)
                return gk._launch(xs[K], w, bias, lk.lora_shrink(xs[K], a), b, [2.0] * len(w), **options)

            def fused(cfg, shrink_k):
                for groups in layers:
                    for K, w, bias, a, b in (groups[i] for i in which):
                        one_launch(K, w, bias, a, b, cfg, shrink_k)

            row = [bench(lambda: cublas(False)), bench(lambda: cublas(True)), bench(shrink)]
            in_launch = nk.SHRINK_K if fused_configs else 0
            for cfg, shrink_k in [(c, in_launch) for c in gemv_configs] + [(default, k) for k in shrink_ks]:
                t = float("nan")  # a configuration that fails to compile or disagrees
                try:
                    K, w, bias, a, b = layers[0][which[0]]
                    want = [torch.nn.functional.linear(xs[K], wi, None if bias is None else bias[i]).float()
                            + 2.0 * (xs[K].float() @ a[i].t()) @ b[i].t() for i, wi in enumerate(w)]
                    got = one_launch(K, w, bias, a, b, cfg, shrink_k)
                    err = max(rel(g, r) for g, r in zip(got, want))
                    if err < 1e-2:
                        t = bench(lambda: fused(cfg, shrink_k))
                    else:
                        print(f"gemv {cfg} N={N} shrink_k {shrink_k}: relative error {err:.1e}")
                except Exception as e:  # noqa: BLE001 - report it, time the others
                    print(f"gemv {cfg} N={N} shrink_k {shrink_k}: {type(e).__name__}: {str(e)[:200]}")
                row.append(t)
            group = names[which[0]] if len(which) == 1 else "layer"
            print(f"| {N} | {group} | " + " | ".join(f"{t:.1f}" for t in row) + " |", flush=True)


def nf4_config(spec: str) -> tuple:
    """"LOOKUP/BLOCK_O/NUM_WARPS/PROGRAMS_PER_SM/MIN_BLOCKS_PER_SPLIT/PREFETCH[/CONSTANT=VALUE...]" -> NF4_CONFIGS'
    tuple, then the other models/nf4_kernels.py constants to set for it (integers), e.g. SHRINK_K=512."""
    lookup, *fields = spec.split("/")
    numbers, extra = fields[:5], [f.split("=") for f in fields[5:]]
    if len(numbers) != 5 or any(len(e) != 2 for e in extra):
        raise SystemExit(f"--nf4-configs takes LOOKUP/BO/W/PPS/MBS/PF[/CONSTANT=VALUE...], got {spec!r}")
    return (lookup, *map(int, numbers), *((name, int(value)) for name, value in extra))


def nf4_layers(dev, count: int = LAYERS) -> list:
    """count copies of a Qwen2.5-1.5B layer's 4 groups: [(K, bf16 linears, their Linear4bit, LoRA A, LoRA B)]."""
    from ahazero.models.linear4bit import Linear4bit
    layers = []
    for _ in range(count):
        groups = []
        for gi, (K, outs) in enumerate(GROUPS):
            lins = [torch.nn.Linear(K, O, bias=gi == 0, dtype=torch.bfloat16, device=dev) for O in outs]
            a = [torch.randn(R, K, device=dev) * K ** -0.5 for _ in outs]  # PEFT keeps the adapter in float32
            b = [torch.randn(O, R, device=dev) * R ** -0.5 for O in outs]
            groups.append((K, lins, [Linear4bit.from_linear(lin) for lin in lins], a, b))
        layers.append(groups)
    return layers


def nf4_group_table(batches):
    """Each group of a layer alone (us per launch, the default configurations): the one launch over bf16 and
    over NF4 weights, with LoRA (the shrink in the launch) and without, beside each one's bytes at 4 TB/s. Over
    28 copies of the layer, as bench/gemv_latency.py (a small group's 8 NF4 copies would fit in the L2)."""
    import triton.testing
    from ahazero.engine import gemv_kernels as gk
    from ahazero.models.linear4bit import Linear4bit
    dev = torch.device("cuda")
    copies = 28
    layers = nf4_layers(dev, copies)
    Linear4bit.fused_kernel = True
    names = ["q/k/v", "o", "gate/up", "down"]
    print("\nEach group alone, us per launch (Qwen2.5-1.5B, LoRA r=32; bytes of the weights at 4 TB/s)")
    print("| N | group | bf16 MB | bf16 at 4 TB/s | bf16 | bf16, no LoRA | NF4 MB | NF4 at 4 TB/s | NF4 "
          "| NF4, no LoRA |")
    print("| --- " * 10 + "|", flush=True)
    for N in batches:
        xs = {K: torch.randn(N, K, device=dev, dtype=torch.bfloat16) for K in (H, I)}
        for gi, name in enumerate(names):
            K, lins, qs, _, _ = layers[0][gi]
            mb = sum(lin.weight.numel() for lin in lins) * 2 / 1e6
            mb4 = sum(q.nf4_weight().packed.numel() + q.nf4_weight().absmax_q.numel() for q in qs) / 1e6
            row = []
            for kind in ("dense", "nf4"):
                for lora in (True, False):
                    def run():
                        for groups in layers:
                            K, lins, qs, a, b = groups[gi]
                            gk._run(xs[K], kind, lins if kind == "dense" else qs, a if lora else [],
                                    b if lora else [], [2.0] * len(qs))
                    row.append(triton.testing.do_bench_cudagraph(run, return_mode="median") * 1e3 / copies)
            print(f"| {N} | {name} | {mb:.1f} | {mb / 4e6 * 1e6:.1f} | {row[0]:.1f} | {row[1]:.1f} | {mb4:.1f} | "
                  f"{mb4 / 4e6 * 1e6:.1f} | {row[2]:.1f} | {row[3]:.1f} |", flush=True)
    Linear4bit.fused_kernel = None


def nf4_table(batches, nf4_configs):
    """A layer's 4 groups with LoRA, rows printed as they finish: bf16 through the engine's one-launch
    projections (the speed to match), with the LoRA shrink in the launch and in its own; NF4 per projection
    + the LoRA kernels (the engine's path before the NF4 group launch); the NF4 group launch per
    configuration (the shrink in the launch), and the default's with the shrink's own launch."""
    from ahazero.engine import gemv_kernels as gk
    from ahazero.engine import lora_kernels as lk
    from ahazero.engine.layers import Projection, base_output
    from ahazero.models import nf4_kernels as nk
    from ahazero.models.linear4bit import Linear4bit
    dev = torch.device("cuda")
    layers = nf4_layers(dev)
    Linear4bit.fused_kernel = True
    print(f"\nNF4, us per layer (4 groups of a Qwen2.5-1.5B layer, LoRA r={R} on all, shrink included); bf16 gemv = "
          "the 16-bit weights through engine/gemv_kernels (the speed to match); nf4 each = one NF4 launch per "
          "projection + shrink + expand; then the NF4 group launch per configuration")
    default = (nk.LOOKUP, nk.BLOCK_O, nk.NUM_WARPS, nk.PROGRAMS_PER_SM, nk.MIN_BLOCKS_PER_SPLIT, nk.PREFETCH)
    print("| N | bf16 gemv | bf16 gemv, shrink launch | nf4 each | "
          + " | ".join("%s BO %d w %d pps %d mbs %d pf %d" % c[:6] + "".join(" %s %d" % e for e in c[6:])
                       for c in nf4_configs) + " | default, shrink launch |")
    print("| --- " * (len(nf4_configs) + 5) + "|", flush=True)
    for N in batches:
        xs = {K: torch.randn(N, K, device=dev, dtype=torch.bfloat16) for K in (H, I)}

        def run(kind: str):
            for groups in layers:
                for K, lins, qs, a, b in groups:
                    if kind == "each":
                        lk.grouped_lora(xs[K], [Projection(q, ai, bi, 2.0) for q, ai, bi in zip(qs, a, b)],
                                        base_output)
                    else:
                        gk._run(xs[K], kind, lins if kind == "dense" else qs, a, b, [2.0] * len(qs))

        row = [bench(lambda: run("dense"))]
        gk.FUSED_SHRINK = False
        row += [bench(lambda: run("dense")), bench(lambda: run("each"))]
        for cfg, fused in [(c, True) for c in nf4_configs] + [(default, False)]:
            nk.LOOKUP, nk.BLOCK_O, nk.NUM_WARPS, nk.PROGRAMS_PER_SM, nk.MIN_BLOCKS_PER_SPLIT, nk.PREFETCH = cfg[:6]
            extra = {name: getattr(nk, name) for name, _ in cfg[6:]}  # put back after this configuration
            for name, value in cfg[6:]:
                setattr(nk, name, value)
            gk.FUSED_SHRINK = fused
            t = float("nan")  # a configuration that fails to compile or disagrees
            try:
                K, lins, qs, a, b = layers[0][2]
                got = gk._run(xs[K], "nf4", qs, a, b, [2.0] * len(qs))
                want = [xs[K].float() @ q.dequantized_weight().float().t() + 2.0 * (xs[K].float() @ ai.t()) @ bi.t()
                        for q, ai, bi in zip(qs, a, b)]
                err = max(rel(g, w) for g, w in zip(got, want))
                if err < 1e-2:
                    t = bench(lambda: run("nf4"))
                else:
                    print(f"NF4 {cfg} N={N}: relative error {err:.1e}")
            except Exception as e:  # noqa: BLE001 - report it, time the others
                print(f"NF4 {cfg} N={N}: {type(e).__name__}: {str(e)[:200]}")
            for name, value in extra.items():
                setattr(nk, name, value)
            row.append(t)
        print(f"| {N} | " + " | ".join(f"{t:.1f}" for t in row) + " |", flush=True)
        nk.LOOKUP, nk.BLOCK_O, nk.NUM_WARPS, nk.PROGRAMS_PER_SM, nk.MIN_BLOCKS_PER_SPLIT, nk.PREFETCH = default
        gk.FUSED_SHRINK = True
    Linear4bit.fused_kernel = None


def sample_table(batches):
    """engine/sample_kernels.py at temperature 1, each configuration checked against the first (the same
    Philox noise whatever the split: the same tokens)."""
    from ahazero.engine import sample_kernels as sk
    default = (sk.PROGRAMS_PER_SM, sk.MIN_V_PER_SPLIT, sk.BLOCK_V, sk.NUM_WARPS)
    V = 151936
    print("\nSampling, us per call (temperature 1, V = 151,936, bf16 logits)")
    print("| N | " + " | ".join("pps %d minV %d BV %d w %d" % c for c in SAMPLE_CONFIGS) + " |")
    print("| --- " * (len(SAMPLE_CONFIGS) + 1) + "|")
    for N in batches:
        logits = [torch.randn(N, V, device="cuda", dtype=torch.bfloat16) * 3 for _ in range(LAYERS)]  # [N, V] each
        want = None
        row = []
        for cfg in SAMPLE_CONFIGS:
            sk.PROGRAMS_PER_SM, sk.MIN_V_PER_SPLIT, sk.BLOCK_V, sk.NUM_WARPS = cfg
            tokens, logprobs = sk.sample_unfiltered(logits[0], 1.0, 1234)
            if want is None:
                want = (tokens, logprobs)
            ok = torch.equal(tokens, want[0]) and torch.allclose(logprobs, want[1], atol=1e-4)
            row.append(bench(lambda: [sk.sample_unfiltered(x, 1.0, 1234) for x in logits]) if ok else float("nan"))
        print(f"| {N} | " + " | ".join(f"{t:.1f}" for t in row) + " |", flush=True)
    sk.PROGRAMS_PER_SM, sk.MIN_V_PER_SPLIT, sk.BLOCK_V, sk.NUM_WARPS = default


def attention_table(batches):
    """engine/attention_kernels.py over a W1-like cache: rows in groups of 8 sharing a prompt length of 61-141,
    `new` tokens generated; each configuration checked against the first."""
    from ahazero.engine import attention_kernels as ak
    default = (ak.BLOCK_T, ak.NUM_WARPS)
    Hq, Hkv, D, T = 12, 2, 128, 768
    gen = torch.Generator().manual_seed(0)
    print("\nDecode attention, us per layer (Hq 12, Hkv 2, D 128, slots of 768 positions; early/mid/late: 32, 256, "
          "500 tokens generated)")
    print("| N | tokens generated | " + " | ".join("chunk %s BT %d w %d" % c for c in ATTENTION_CONFIGS) + " |")
    print("| --- " * (len(ATTENTION_CONFIGS) + 2) + "|")
    for N in batches:
        caches = [(torch.randn(N, Hkv, T, D, device="cuda", dtype=torch.bfloat16),
                   torch.randn(N, Hkv, T, D, device="cuda", dtype=torch.bfloat16)) for _ in range(LAYERS)]
        q = torch.randn(N, Hq, D, device="cuda", dtype=torch.bfloat16)  # [N, Hq, D]
        prompts = torch.randint(61, 142, (-(-N // 8),), generator=gen).repeat_interleave(8)[:N]  # [N]
        for new in (32, 256, 500):
            positions = (prompts + new - 1).to("cuda")  # [N]
            want = None
            row = []
            for chunk, block_t, warps in ATTENTION_CONFIGS:
                ak.BLOCK_T, ak.NUM_WARPS = block_t, warps
                out = ak._decode_attention(q, *caches[0], positions, D ** -0.5, chunk=chunk)
                if want is None:
                    want = out
                ok = rel(out, want) < 1e-2
                row.append(bench(lambda: [ak._decode_attention(q, k, v, positions, D ** -0.5, chunk=chunk)
                                          for k, v in caches]) if ok else float("nan"))
            print(f"| {N} | {new} | " + " | ".join(f"{t:.1f}" for t in row) + " |", flush=True)
    ak.BLOCK_T, ak.NUM_WARPS = default


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("lora", "gemv", "nf4", "sample", "attention"))
    p.add_argument("--batches", default="1,6,32,128", help="the nf4 table takes those up to nf4_kernels.MAX_ROWS")
    p.add_argument("--default-only", action="store_true",
                   help="gemv and nf4 up to 32 rows: time the default configuration only, not the lists above")
    p.add_argument("--fused-configs", action="store_true",
                   help="gemv: time each configuration with the LoRA shrink in the launch, not in its own")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.CONSTANT=VALUE",
                   help="set a module constant first, as bench/rollout.py's --set (repeatable)")
    p.add_argument("--shrink-k", default="512", help="gemv: the default configuration with the LoRA shrink in the "
                   "launch, for each of these columns of K per producer (comma-separated; '' for none)")
    p.add_argument("--nf4-groups", action="store_true",
                   help="nf4: each group alone, bf16 and NF4, with and without LoRA, instead of the configurations")
    p.add_argument("--nf4-configs", metavar="LOOKUP/BO/W/PPS/MBS/PF,...",
                   help="nf4: time these configurations instead of NF4_CONFIGS, e.g. permute/32/4/2/8/2")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    from rollout import set_constant  # bench/ is the script's folder
    for setting in args.set:
        set_constant(setting)
    print(torch.cuda.get_device_name(), torch.__version__)
    from ahazero.engine import gemv_kernels as gk
    from ahazero.models import nf4_kernels as nk
    if args.only in (None, "lora"):
        lora_table(batches)
    if args.only in (None, "gemv"):
        default = [(gk.BLOCK_O, gk.BLOCK_K, gk.NUM_WARPS, None, gk.PROGRAMS_PER_SM)]  # stages: _launch's choice
        gemv_table(batches, default if args.default_only else GEMV_CONFIGS,
                   [int(k) for k in args.shrink_k.split(",") if k], args.fused_configs)
    if args.only in (None, "sample"):
        sample_table(batches)
    if args.only in (None, "attention"):
        attention_table(batches)
    if args.only in (None, "nf4"):
        default = [(nk.LOOKUP, nk.BLOCK_O, nk.NUM_WARPS, nk.PROGRAMS_PER_SM, nk.MIN_BLOCKS_PER_SPLIT, nk.PREFETCH)]
        configs = default if args.default_only else NF4_CONFIGS
        if args.nf4_configs:
            configs = [nf4_config(spec) for spec in args.nf4_configs.split(",")]
        if args.nf4_groups:
            nf4_group_table([b for b in batches if b <= nk.MAX_ROWS])
        else:
            nf4_table([b for b in batches if b <= nk.MAX_ROWS], configs)


if __name__ == "__main__":
    main()

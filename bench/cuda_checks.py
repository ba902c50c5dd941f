"""CUDA-only paths against their references, on the GPU machine (the CPU test suite cannot reach them).

Each check runs a path that only CUDA takes and compares it with the reference the CPU tests use:
  varlen      torch's varlen FlashAttention (packed forwards) vs float64 dense block-diagonal attention
  packing     padding-free vs padded log-probs and LoRA gradients, bf16, tiny models of each architecture
  offload     offloaded checkpointing (side stream, pinned memory) vs no checkpointing, LoRA gradients
  nf4-gemv    the fused NF4 dequantise-GEMV Triton kernel vs dequantise-then-matmul, and its speed against
              a bf16 matmul of the same shape (4-bit decode should read a quarter of the bytes)
  engine      the engine's CUDA-graph decode vs transformers' greedy generate (float32, token-identical),
              also from a 4-bit base (graphs vs eager, token-identical)
Run from the repository root: `python bench/cuda_checks.py`. Prints one table row per check; exits 1
if any failed.
"""
from __future__ import annotations

import copy
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
DEV = torch.device(os.environ.get("AHAZERO_CHECK_DEVICE", "cuda"))  # cpu: checks the script only
ROWS: list[tuple[str, str, str]] = []


def check(name):
    def run(fn):
        t0 = time.time()
        try:
            detail = fn()
            ROWS.append((name, "ok", f"{detail} ({time.time() - t0:.1f} s)"))
        except Exception as err:  # noqa: BLE001 - one row per failed check
            traceback.print_exc()
            ROWS.append((name, "FAIL", f"{type(err).__name__}: {str(err)[:300]}"))
        return fn
    return run


def on_cuda(tiny):
    """tiny.tiny_model, built on the GPU."""
    build = tiny.tiny_model
    tiny.tiny_model = lambda *a, **k: build(*a, **k).to(DEV)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main():
    import tiny
    on_cuda(tiny)

    @check("varlen")
    def _():
        from test_varlen import dense_reference
        from ahazero.models import varlen
        calls = []
        original = varlen._cuda_varlen
        varlen._cuda_varlen = lambda *a: calls.append(1) or original(*a)
        worst = 0.0
        for lengths in ([5], [1, 7, 3], [300, 1, 1000, 17]):
            S, Hq, Hkv, D = sum(lengths), 12, 2, 128
            q, k, v = (torch.randn(1, h, S, D, device=DEV, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
            pos = torch.cat([torch.arange(n) for n in lengths])[None].to(DEV)
            out, _ = varlen.varlen_attention_forward(None, q, k, v, None, scaling=D ** -0.5, position_ids=pos)
            want = dense_reference(*(t[0].transpose(0, 1).cpu() for t in (q, k, v)), lengths, D ** -0.5)
            worst = max(worst, rel(out[0].cpu(), want))
        varlen._cuda_varlen = original
        assert len(calls) == 3, "the CUDA varlen path did not run"
        assert worst < 1e-2, f"relative error {worst:.2e}"
        return f"FlashAttention varlen ran; worst rel. error vs float64 {worst:.1e}"

    @check("packing")
    def _():
        from test_packing import COMPLETION_LENS, PROMPT_LENS, logps_and_lora_grads, lora_model, rollout_batch
        out = []
        for arch in tiny.ARCHS:
            model = lora_model(arch, "sdpa").to(torch.bfloat16)
            batch = rollout_batch(PROMPT_LENS, COMPLETION_LENS, seed=1).to(DEV)
            padded, _, padded_grads = logps_and_lora_grads(model, batch, padding_free=False)
            packed, _, packed_grads = logps_and_lora_grads(model, batch, padding_free=True)
            mask = batch.completion_mask > 0
            e_logp = (packed[mask] - padded[mask]).abs().max().item()
            e_grad = max(rel(packed_grads[n], g) for n, g in padded_grads.items())
            assert e_logp < 0.1 and e_grad < 0.05, f"{arch}: logp {e_logp:.2e}, grad rel {e_grad:.2e}"
            out.append(f"{arch} logp {e_logp:.1e} grad {e_grad:.1e}")
        return "bf16 packed vs padded, max |dlogp|, worst grad rel.: " + "; ".join(out)

    @check("offload")
    def _():
        from test_offload import lora_grads
        from ahazero.models.offload import _OffloadedCheckpoint
        calls = []
        original = _OffloadedCheckpoint.forward
        _OffloadedCheckpoint.forward = staticmethod(lambda ctx, *a: calls.append(1) or original(ctx, *a))
        ids = torch.tensor([tiny.tokenizer().encode("Natalia sold clips to 48 of her friends in April, and then")],
                           device=DEV)
        ref_loss, ref = lora_grads("qwen2", False, ids)
        loss, got = lora_grads("qwen2", "offload", ids)
        _OffloadedCheckpoint.forward = original
        assert calls, "the offloaded path did not run"
        worst = max(rel(got[n], ref[n]) for n in ref)
        assert abs(loss.item() - ref_loss.item()) < 1e-5 and worst < 1e-5, f"loss {loss} vs {ref_loss}, grad {worst}"
        return f"float32 grads vs no checkpointing: worst rel. {worst:.1e}"

    @check("nf4-gemv")
    def _():
        import triton.testing
        from ahazero.models.linear4bit import Linear4bit
        rows = []
        for O, K in ((8960, 1536), (1536, 8960), (151936 // 8, 1536)):
            lin = torch.nn.Linear(K, O, bias=False, dtype=torch.bfloat16, device=DEV)
            q4 = Linear4bit.from_linear(lin)
            w = q4.dequantized_weight(torch.bfloat16)  # [O, K]
            for n in (1, 8, 32):
                x = torch.randn(n, K, device=DEV, dtype=torch.bfloat16)
                Linear4bit.fused_kernel = True
                got = q4(x)
                Linear4bit.fused_kernel = False
                want = x @ w.t()
                err = rel(got, want)
                assert err < 1e-2, f"{O}x{K} n={n}: rel {err:.2e}"
                Linear4bit.fused_kernel = True
                # replayed from a CUDA graph, as the engine's decode step runs it: GPU time, no launch cost
                t4 = triton.testing.do_bench_cudagraph(lambda: q4(x), return_mode="median")
                t16 = triton.testing.do_bench_cudagraph(lambda: x @ w.t(), return_mode="median")
                rows.append(f"{O}x{K} n={n}: fused {t4 * 1e3:.1f} us vs bf16 {t16 * 1e3:.1f} us (rel {err:.0e})")
        Linear4bit.fused_kernel = None
        print("\n".join(rows))
        return "; ".join(rows[:3]) + " ..."

    @check("engine")
    def _():
        from test_engine import PROMPTS, hf_greedy
        from ahazero.engine.engine import create_generator
        from ahazero.engine.types import SamplingParams
        from ahazero.models.linear4bit import quantize_model
        tok = tiny.tokenizer()
        prompts = [tok.encode(t) for t in PROMPTS]
        params = SamplingParams(temperature=0, max_tokens=24, n=2, ignore_eos=True)
        same = total = 0
        for arch in tiny.ARCHS:
            m = tiny.tiny_model(arch, initializer_range=0.3)
            want = [hf_greedy(copy.deepcopy(m).cpu(), p, 24) for p in prompts]  # the reference, on the CPU
            gen = create_generator(m, tok, max_seq_length=128)
            assert gen.config.cuda_graphs, "graphs are off on CUDA"
            for w, out in zip(want, gen.generate(prompts, params)):
                same += sum(list(o.token_ids) == w for o in out.outputs)
                total += len(out.outputs)
        assert same >= 0.9 * total, f"{same} of {total} completions token-identical to transformers"
        m = tiny.tiny_model("qwen2", initializer_range=0.3, hidden_size=256, intermediate_size=512).to(torch.bfloat16)
        quantize_model(m, dynamic=False)
        graphs = create_generator(m, tok, max_seq_length=128).generate(prompts, params)
        eager = create_generator(m, tok, max_seq_length=128, cuda_graphs=False).generate(prompts, params)
        same4 = sum(list(a.token_ids) == list(b.token_ids) for x, y in zip(graphs, eager)
                    for a, b in zip(x.outputs, y.outputs))
        assert same4 == 2 * len(prompts), f"4-bit graphs vs eager: {same4} of {2 * len(prompts)} identical"
        return f"CUDA graphs vs transformers greedy (fp32, 4 archs): {same}/{total} identical; 4-bit graphs = eager"

    print()
    print("| check | result | detail |")
    print("| --- | --- | --- |")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")
    return 1 if any(r[1] != "ok" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The decode step's fused Triton kernels (engine/fused_kernels.py) against the torch functions they
replace, and the engine decoding through them against transformers. On a CPU through Triton's
interpreter (skipped where triton is not installed)."""
import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from ahazero.engine import fused_kernels
from ahazero.engine.layers import apply_rope, rms_norm
from ahazero.engine.types import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def same_roundings(got, want, sums=False):
    """On a GPU the kernels round as torch does: equal, except where a float32 sum (`sums`) is added in
    another order or contracted into a fused multiply-add, which moves RMSNorm's rsqrt or RoPE's
    x * cos + rotate(x) * sin by an ulp or two (measured on an H100: 1.4e-6 on values up to 5.9, float32). Triton's interpreter truncates float32 -> bfloat16 instead of rounding to nearest.
    Either way: a few steps of the dtype."""
    if DEVICE == "cuda" and not sums:
        assert torch.equal(got, want)
        return
    steps = 4
    tol = steps * torch.finfo(want.dtype).eps * want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H", [(1, 64), (6, 96), (5, 1536)])
def test_add_rms_norm_matches_the_torch_math(N, H, dtype):
    torch.manual_seed(N + H)
    h, delta = (torch.randn(N, H, device=DEVICE, dtype=dtype) for _ in range(2))
    weight = torch.randn(H, device=DEVICE, dtype=dtype)
    x, res = fused_kernels.add_rms_norm(h, delta, weight, 1e-6)
    same_roundings(res, h + delta)
    same_roundings(x, rms_norm(h + delta, weight, 1e-6), sums=True)
    same_roundings(fused_kernels.rms_norm(h, weight, 1e-6), rms_norm(h, weight, 1e-6), sums=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_cache_rotates_q_and_k_and_writes_the_slots(dtype):
    torch.manual_seed(0)
    B, HQ, HKV, D, T, slots = 3, 4, 2, 16, 12, 5
    qkv = torch.randn(B, (HQ + 2 * HKV) * D, device=DEVICE, dtype=dtype)  # one fused projection's output
    q, k, v = (t.view(B, -1, D) for t in qkv.split([HQ * D, HKV * D, HKV * D], dim=1))  # strided views
    cos, sin = torch.randn(T, D, device=DEVICE, dtype=dtype), torch.randn(T, D, device=DEVICE, dtype=dtype)
    positions = torch.tensor([0, 7, 11], device=DEVICE)
    cache_k = torch.randn(slots, HKV, T, D, device=DEVICE, dtype=dtype)
    cache_v = torch.randn(slots, HKV, T, D, device=DEVICE, dtype=dtype)
    want_k, want_v = cache_k.clone(), cache_v.clone()
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [B, 1, D]
    rows = torch.arange(B, device=DEVICE)
    want_k[rows, :, positions] = apply_rope(k, c, s)
    want_v[rows, :, positions] = v
    got_q = fused_kernels.rope_and_cache(q, k, v, cos, sin, positions, cache_k, cache_v)
    same_roundings(got_q, apply_rope(q, c, s), sums=True)
    same_roundings(cache_k, want_k, sums=True)  # rotated k at the positions, nothing else touched
    untouched = torch.ones(slots, T, dtype=torch.bool, device=DEVICE)
    untouched[rows, positions] = False
    assert torch.equal(cache_k.transpose(1, 2)[untouched], want_k.transpose(1, 2)[untouched])
    assert torch.equal(cache_v, want_v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    torch.manual_seed(1)
    gate, up = (torch.randn(7, 300, device=DEVICE, dtype=dtype) * 3 for _ in range(2))
    same_roundings(fused_kernels.silu_mul(gate, up), torch.nn.functional.silu(gate) * up, sums=True)  # exp differs


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_engine_with_fused_kernels_matches_transformers(arch):
    import tiny
    from ahazero.engine.engine import create_generator
    from test_engine import hf_greedy
    tok = tiny.tokenizer()
    m = tiny.tiny_model(arch, initializer_range=0.3)
    prompts = [tok.encode(t) for t in ("Hi", "What is the capital of France? Think step by step.", "1 + 1 =")]
    want = [hf_greedy(m, p, 8) for p in prompts]  # on the CPU
    gen = create_generator(m.to(DEVICE), tok, max_seq_length=64, attention="triton", fused_kernels=True,
                           cuda_graphs=True, graph_batch_sizes=(4, 8))
    got = gen.generate(prompts, SamplingParams(temperature=0, max_tokens=8, n=2, ignore_eos=True))
    for w, out in zip(want, got):
        assert [c.token_ids for c in out.outputs] == [w] * 2


def test_fused_kernels_need_the_triton_attention():
    from ahazero.engine.config import EngineConfig
    with pytest.raises(ValueError, match="attention='triton'"):
        EngineConfig(max_seq_length=64, device=torch.device("cpu"), dtype=torch.float32, fused_kernels=True,
                     attention="sdpa")


def test_fused_kernels_default_with_the_triton_attention_on_cuda_only():
    from ahazero.engine.config import EngineConfig
    cpu = EngineConfig(max_seq_length=64, device=torch.device("cpu"), dtype=torch.float32, attention="triton")
    assert cpu.fused_kernels is False and cpu.lora_kernels is False
    cuda = EngineConfig(max_seq_length=64, device=torch.device("cuda"), dtype=torch.bfloat16)
    assert cuda.attention == "triton" and cuda.fused_kernels is True and cuda.lora_kernels is True
    sdpa = EngineConfig(max_seq_length=64, device=torch.device("cuda"), dtype=torch.bfloat16, attention="sdpa")
    assert sdpa.fused_kernels is False


VIEWS = {"aten.t.default", "aten.view.default", "aten.unsqueeze.default", "aten.select.int", "aten.slice.Tensor",
         "aten.alias.default", "aten.expand.default", "aten._unsafe_view.default", "aten.reshape.default",
         "aten.transpose.int", "aten.as_strided.default", "aten.detach.default", "aten.split.Tensor",
         "aten.split_with_sizes.default"}


def launches_per_layer(fused, layers=(2, 4)):
    """Ops that launch work (not views) in one decode step, per decoder layer: the difference between a
    4-layer and a 2-layer model, halved. Each custom op (a Triton launcher) counts once."""
    import collections
    import tiny
    from torch.utils._python_dispatch import TorchDispatchMode
    from ahazero.engine import runner as runner_module
    from ahazero.engine.engine import create_generator

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) not in VIEWS:
                self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    tok = tiny.tokenizer()
    totals = []
    for n in layers:
        m = tiny.tiny_model("qwen2", num_hidden_layers=n).to(DEVICE)
        gen = create_generator(m, tok, max_seq_length=64, attention="triton", fused_kernels=fused, lora_kernels=False,
                               cuda_graphs=False)
        steps = []
        decode = runner_module.llama.decode

        def counted(*a, **k):
            with Count() as c:
                out = decode(*a, **k)
            steps.append(sum(c.ops.values()))
            return out

        runner_module.llama.decode = counted
        try:
            gen.generate([tok.encode("Hi")], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        finally:
            runner_module.llama.decode = decode
        totals.append(steps[-1])
    return (totals[1] - totals[0]) / (layers[1] - layers[0])


def test_the_fused_decode_step_launches_far_fewer_kernels_per_layer():
    """Per layer (no adapter, the Triton attention): the torch path's norms, RoPE, cache writes and
    activation (37 ops) against one launch each: 7 projections + 2 norms + RoPE/cache + attention + SiLU*up."""
    torch_path, fused_path = launches_per_layer(False), launches_per_layer(True)
    assert fused_path <= 12 and torch_path > 2.5 * fused_path, (fused_path, torch_path)

"""The engine's Triton kernels (grouped LoRA, split-KV decode attention) against PyTorch references;
on a CPU through Triton's interpreter (skipped where triton is not installed)."""
import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from ahazero.engine import attention_kernels, lora_kernels
from ahazero.models.nf4_kernels import split_k_workspace
from ahazero.engine.types import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x, a, b, y, scales):
    """PEFT's math: y + (x A^T B^T) * s in float32, rounded to y's dtype once."""
    return [(yi.float() + (x.float() @ ai.float().t()) @ bi.float().t() * s).to(yi.dtype)
            for ai, bi, yi, s in zip(a, b, y, scales)]


def test_lora_partial_sums_stay_small_in_a_prefill():
    """Decode splits K finely (latency); a long prefill coarsely, so its [S, G, N, R] partials stay bounded."""
    assert lora_kernels.num_splits(8960, 6) == 140
    assert lora_kernels.num_splits(8960, 16384) * 16384 * 32 * 4 < 40 * 2 ** 20


@pytest.mark.parametrize("N,K,outs,R,dtype", [(5, 100, [64, 16, 16], 8, torch.float32),
                                              (37, 1100, [70, 33], 4, torch.bfloat16),
                                              (1, 64, [64], 32, torch.float32),
                                              (19, 600, [17, 130, 9], 16, torch.bfloat16),
                                              (300, 1100, [40, 24], 8, torch.bfloat16)])  # a prefill: coarse K splits
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])  # the same in the interpreter; on a GPU, both dots
def test_grouped_lora_matches_reference(N, K, outs, R, dtype, precision):
    torch.manual_seed(0)
    x = torch.randn(N, K, dtype=dtype, device=DEVICE)  # [N, K]
    a = [torch.randn(R, K, device=DEVICE) / K ** 0.5 for _ in outs]  # each [R, K]
    b = [torch.randn(o, R, device=DEVICE) for o in outs]  # each [O, R]
    y = [torch.randn(N, o, dtype=dtype, device=DEVICE) for o in outs]  # each [N, O]
    scales = [0.5, 2.0, 1.5][:len(outs)]
    want = reference(x, a, b, y, scales)
    xa = lora_kernels._shrink(x, a, precision=precision)  # [G, N, R], the sum of the K splits' partials
    assert lora_kernels.num_splits(K, N) > 1 or K <= 64
    assert xa.shape == (len(outs), N, R)
    torch.testing.assert_close(xa, torch.stack([x.float() @ ai.t() for ai in a]), atol=1e-4, rtol=1e-4)
    assert not split_k_workspace(x.device, 1)[0].any()  # the row blocks' counters are back to 0
    lora_kernels._expand_add(xa, b, y, scales, precision=precision)
    for got, ref in zip(y, want):
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7  # one rounding step of the output dtype
        torch.testing.assert_close(got.float(), ref.float(), atol=tol * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("N,I,R,dtype", [(5, 300, 8, torch.float32), (37, 130, 32, torch.bfloat16),
                                         (128, 256, 16, torch.bfloat16)])
def test_expand_in_the_silu_mul_launch_equals_expand_then_silu_mul(N, I, R, dtype):
    """The gate/up group's expand inside SiLU * up: the same bits as lora_expand_add then fused_kernels.silu_mul,
    and near PEFT's float32 math then torch's SiLU (a few of the output dtype's roundings: the kernel's exp differs,
    as tests/test_engine_fused.py::test_silu_mul allows)."""
    from ahazero.engine import fused_kernels
    torch.manual_seed(0)
    xa = torch.randn(2, N, R, device=DEVICE)  # [2, N, R] float32, the shrink's x A^T
    b = [torch.randn(I, R, device=DEVICE) / R ** 0.5 for _ in range(2)]  # each [I, R]
    gate, up = (torch.randn(N, I, device=DEVICE).to(dtype) for _ in range(2))  # the base outputs
    scales = [0.5, 2.0]
    got = lora_kernels.lora_expand_silu_mul(xa, b, gate, up, scales)
    ys = [gate.clone(), up.clone()]
    lora_kernels.lora_expand_add(xa, b, ys, scales)
    assert torch.equal(got, fused_kernels.silu_mul(*ys))
    g, u = ((y.float() + xa[i] @ b[i].t() * scales[i]).to(dtype) for i, y in enumerate((gate, up)))
    want = (torch.nn.functional.silu(g) * u).float()
    torch.testing.assert_close(got.float(), want, rtol=2 ** -5, atol=2 ** -7 * want.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the shrink's side stream exists on a GPU only")
def test_shrink_beside_the_base_gemms_gives_the_same_bits_eagerly_and_in_a_cuda_graph(monkeypatch):
    """W1's 128-row decode group (q/k/v of Qwen2.5-1.5B, LoRA r=32): the shrink on its side stream and k and v on
    another while cuBLAS runs q, against everything on one stream, eagerly and replayed from a graph on fresh
    inputs."""
    from ahazero.engine.layers import Projection, project
    torch.manual_seed(0)
    N, K, outs, R = 128, 1536, [1536, 256, 256], 32
    ps = [Projection(torch.nn.Linear(K, o, device=DEVICE, dtype=torch.bfloat16), torch.randn(R, K, device=DEVICE)
                     / K ** 0.5, torch.randn(o, R, device=DEVICE), 2.0) for o in outs]
    x = torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16)  # [N, K], the graph's static input

    def one_stream(inp):
        monkeypatch.setattr(lora_kernels, "SHRINK_BESIDE_BASES", False)
        try:
            return project(inp, ps, lora_kernels.grouped_lora)
        finally:
            monkeypatch.setattr(lora_kernels, "SHRINK_BESIDE_BASES", True)

    want = one_stream(x)
    for got, p, ref in zip(project(x, ps, lora_kernels.grouped_lora), ps, want):
        assert torch.equal(got, ref)
        exact = (x.float() @ p.base.weight.float().t() + p.base.bias.float()
                 + (x.float() @ p.lora_a.t()) @ p.lora_b.t() * 2)  # [N, O]
        assert ((got.float() - exact).norm() / exact.norm()).item() < 1e-2
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as the engine's graphs do
        project(x, ps, lora_kernels.grouped_lora)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = project(x, ps, lora_kernels.grouped_lora)
    for _ in range(3):
        x.copy_(torch.randn(N, K, device=DEVICE))
        graph.replay()
        for got, ref in zip(out, one_stream(x.clone())):
            assert torch.equal(got, ref)


@pytest.mark.slow
def test_engine_with_lora_kernels_matches_torch_lora():
    import tiny
    from peft import LoraConfig, get_peft_model
    from ahazero.engine.engine import create_generator
    from test_engine_lora import TARGETS, merged_greedy, tokens
    tok = tiny.tokenizer()
    torch.manual_seed(0)
    m = get_peft_model(tiny.tiny_model("qwen3", initializer_range=0.3),
                       LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)).eval()
    prompts = [tok.encode(t) for t in ("Hi", "What is the capital of France? Think step by step.")]
    params = SamplingParams(temperature=0, max_tokens=6, n=2, ignore_eos=True)
    want = merged_greedy(m, prompts, max_tokens=6)  # on the CPU
    m.to(DEVICE)  # the kernels read device memory (on a CPU: the interpreter reads host memory)
    plain = create_generator(m, tok, max_seq_length=64).generate(prompts, params)
    fused = create_generator(m, tok, max_seq_length=64, lora_kernels=True).generate(prompts, params)
    assert tokens(fused) == tokens(plain) == want
    for a, b in zip(plain, fused):
        torch.testing.assert_close(torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs),
                                   atol=1e-4, rtol=1e-4)


def reference_attention(q, cache_k, cache_v, positions, scale):
    """Row b attends over positions 0..positions[b] of slot b; query head h uses KV head h // G."""
    B, H, D = q.shape
    G = H // cache_k.shape[1]
    out = []
    for b in range(B):
        L = int(positions[b]) + 1
        k = cache_k[b, :, :L].float().repeat_interleave(G, 0)  # [H, L, D]
        v = cache_v[b, :, :L].float().repeat_interleave(G, 0)  # [H, L, D]
        w = torch.softmax(torch.einsum("hd,hld->hl", q[b].float(), k) * scale, -1)  # [H, L]
        out.append(torch.einsum("hl,hld->hd", w, v))
    return torch.stack(out)  # [B, H, D]


@pytest.mark.parametrize("B,H,Hkv,D,T,dtype", [(3, 4, 2, 16, 96, torch.float32), (5, 12, 2, 32, 600, torch.float32),
                                               (2, 8, 8, 16, 300, torch.bfloat16), (4, 6, 2, 64, 256, torch.bfloat16)])
@pytest.mark.parametrize("chunk", [64, 256])  # one tile per split program; four
@pytest.mark.parametrize("merge", [True, False])  # in the partial launch (its last split); a launch of its own
def test_decode_attention_matches_reference(B, H, Hkv, D, T, dtype, chunk, merge):
    torch.manual_seed(0)
    cache_k = torch.randn(B + 2, Hkv, T, D, dtype=dtype, device=DEVICE)  # more slots than rows
    cache_v = torch.randn(B + 2, Hkv, T, D, dtype=dtype, device=DEVICE)
    q = torch.randn(B, H, D, dtype=dtype, device=DEVICE)
    positions = torch.randint(0, T, (B,), device=DEVICE)
    positions[0], positions[-1] = 0, T - 1  # one position; a full slot (several splits)
    got = attention_kernels._decode_attention(q, cache_k, cache_v, positions, D ** -0.5, chunk=chunk, merge=merge)
    want = reference_attention(q, cache_k, cache_v, positions, D ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: p and the output are rounded
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    counts = attention_kernels.split_k_workspace(q.device, B * Hkv)[0]
    assert not counts.any()  # every (row, KV head)'s counter back to 0 for the next launch


def test_decode_attention_splits_finer_for_few_short_sequences():
    chunk_for = attention_kernels.chunk_for
    assert chunk_for(B=6, Hkv=2, T=384, sms=132) == 64  # W2: 72 programs of one tile, not 24 of four
    assert chunk_for(B=128, Hkv=2, T=640, sms=132) == 256  # W1: 768 programs already
    assert chunk_for(B=6, Hkv=2, T=4096, sms=132) == 128


@pytest.mark.slow
def test_engine_with_triton_attention_matches_transformers():
    import tiny
    from ahazero.engine.engine import create_generator
    from test_engine import hf_greedy
    tok = tiny.tokenizer()
    m = tiny.tiny_model("llama", initializer_range=0.3)
    prompts = [tok.encode(t) for t in ("Hi", "What is the capital of France? Think step by step.", "1 + 1 =")]
    want = [hf_greedy(m, p, 8) for p in prompts]  # on the CPU
    params = SamplingParams(temperature=0, max_tokens=8, n=2, ignore_eos=True)
    gen = create_generator(m.to(DEVICE), tok, max_seq_length=64, attention="triton", cuda_graphs=True,
                           graph_batch_sizes=(4, 8))
    assert gen.config.kv_len_bucket == 64
    got = gen.generate(prompts, params)
    for w, out in zip(want, got):
        assert [c.token_ids for c in out.outputs] == [w] * 2


@pytest.mark.parametrize("N,K,O,dtype", [(1, 64, 64, torch.float32), (5, 320, 72, torch.float32),
                                         (3, 1152, 70, torch.bfloat16), (17, 640, 130, torch.float32),
                                         (32, 1536, 200, torch.bfloat16)])
@pytest.mark.parametrize("fma_rows", [0, 32], ids=["tensor-cores", "cuda-cores"])
def test_fused_nf4_linear_matches_dequantise_then_matmul(N, K, O, dtype, fma_rows, monkeypatch):
    """Widths past one tile (256) and one split (512), a partial tile, O not a multiple of the column block;
    the products on the tensor cores (tl.dot) and on the CUDA cores (FMA_MAX_ROWS)."""
    from ahazero.models import nf4_kernels
    from ahazero.models.linear4bit import Linear4bit
    monkeypatch.setattr(nf4_kernels, "FMA_MAX_ROWS", fma_rows)
    torch.manual_seed(0)
    plain = Linear4bit.from_linear(torch.nn.Linear(K, O).to(dtype)).to(DEVICE)
    fused = Linear4bit.from_linear(torch.nn.Linear(K, O).to(dtype)).to(DEVICE)
    fused.load_state_dict(plain.state_dict())
    plain.fused_kernel, fused.fused_kernel = False, True
    x = torch.randn(N, K, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        want = (x.float() @ plain.dequantized_weight().float().t() + plain.bias.float()).to(dtype)
        direct = nf4_kernels.nf4_gemv(x, [fused.nf4_weight()])[0]
        got = fused(x)
    assert got.dtype == dtype and got.shape == (N, O)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(direct, want, **tol)
    torch.testing.assert_close(got, direct, atol=0, rtol=0)  # the module took the kernel
    torch.testing.assert_close(plain(x), want, **tol)
    rows = nf4_kernels.MAX_ROWS + 1  # above MAX_ROWS: the plain path
    assert fused(torch.randn(rows, K, dtype=dtype, device=DEVICE)).shape == (rows, O)


def test_fused_nf4_kernel_is_only_used_where_blocks_do_not_span_rows():
    """K = 100: a 64-block spans two rows; the module takes the dequantise-then-matmul path."""
    from ahazero.models import nf4_kernels
    from ahazero.models.linear4bit import Linear4bit
    layer = Linear4bit.from_linear(torch.nn.Linear(100, 70)).to(DEVICE)
    layer.fused_kernel = True
    assert not layer.use_fused_kernel(torch.device(DEVICE))
    x = torch.randn(3, 100, device=DEVICE)
    torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().t() + layer.bias, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="K % 64"):
        nf4_kernels.nf4_gemv(x, [layer.nf4_weight()])


@pytest.mark.parametrize("N,dtype,bias", [(1, torch.bfloat16, True), (8, torch.float16, False),
                                          (16, torch.bfloat16, False), (32, torch.float16, True),
                                          (48, torch.bfloat16, True)])
@pytest.mark.parametrize("block_o,fma_rows", [(64, 0), (32, 32)], ids=["tensor-cores", "cuda-cores"])
def test_fused_nf4_kernel_splits_k_and_reduces_in_the_last_split(N, dtype, bias, block_o, fma_rows, monkeypatch):
    """K = 18 blocks split over several programs (a short last split) whose partials the tile's last split
    adds; a partial column tile; x a misaligned view (its rows are read as 32-bit pairs: the launcher
    copies it). Two calls give the same bits: the tile counters are back to 0 after each launch."""
    from ahazero.models import nf4_kernels
    from ahazero.models.linear4bit import Linear4bit
    monkeypatch.setattr(nf4_kernels, "BLOCK_O", block_o)
    monkeypatch.setattr(nf4_kernels, "FMA_MAX_ROWS", fma_rows)
    for name in ("PROGRAMS_PER_SM", "MIN_BLOCKS_PER_SPLIT", "FMA_PROGRAMS_PER_SM", "FMA_MIN_BLOCKS_PER_SPLIT"):
        monkeypatch.setattr(nf4_kernels, name, 4)  # 4 splits of 5 blocks and one of 3, whatever the defaults
    torch.manual_seed(0)
    K, O = 1152, 130
    layer = Linear4bit.from_linear(torch.nn.Linear(K, O, bias=bias).to(dtype)).to(DEVICE)
    tiles = -(-O // nf4_kernels.BLOCK_O)
    splits, per_split = nf4_kernels._splits(tiles, K // 64, nf4_kernels.sm_count(torch.device(DEVICE)), N <= fma_rows)
    assert splits > 1 and K // 64 % per_split
    x = torch.randn(N, K + 1, dtype=dtype, device=DEVICE)[:, 1:]  # [N, K], rows K + 1 apart, 2 bytes off
    with torch.no_grad():
        want = x.float() @ layer.dequantized_weight().float().t()
        if bias:
            want += layer.bias.float()
        got = nf4_kernels.nf4_gemv(x, [layer.nf4_weight()])[0]
        again = nf4_kernels.nf4_gemv(x.contiguous(), [layer.nf4_weight()])[0]
    assert got.dtype == dtype and got.shape == (N, O)
    torch.testing.assert_close(got, want.to(dtype), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(again, got, atol=0, rtol=0)


def test_engine_decodes_a_4bit_model_through_the_fused_kernel():
    import tiny
    from ahazero.engine.engine import create_generator
    from ahazero.models.linear4bit import Linear4bit, quantize_model
    model = tiny.tiny_model("qwen2", initializer_range=0.3).to(DEVICE)
    quantize_model(model)
    tok = tiny.tokenizer()
    prompts = [tok.encode("The capital of France is"), tok.encode("1 + 1 =")]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = {}
    for fused in (False, True):
        Linear4bit.fused_kernel = fused
        try:
            gen = create_generator(model, tok, max_seq_length=64)
            outs[fused] = [o.outputs[0].token_ids for o in gen.generate(prompts, params)]
        finally:
            Linear4bit.fused_kernel = None
    assert outs[True] == outs[False]


def assert_check_falls_back(check, device, module, name, wrong, monkeypatch, caplog):
    """A kernel's self-check (a functools.cache'd function of the device) turns the kernel off with a warning
    when module.name gives `wrong` results ("disagrees") and when it raises ("no kernel image")."""
    def broken(*args):
        raise RuntimeError("no kernel image for this device")

    for fake, message in ((wrong, "disagrees"), (broken, "no kernel image")):
        check.cache_clear()
        monkeypatch.setattr(module, name, fake)
        with caplog.at_level("WARNING", logger="ahazero"):
            assert not check(device)
        assert message in caplog.text
    check.cache_clear()


@pytest.mark.slow
def test_the_fused_nf4_kernel_is_checked_before_it_serves_by_default(monkeypatch, caplog):
    """Default (fused_kernel None) on a device: the kernel is compared with dequantise-then-matmul once;
    a kernel that disagrees is turned off with a warning, and the plain path serves."""
    from ahazero.models import linear4bit, nf4_kernels
    device = torch.device(DEVICE)
    linear4bit._fused_kernel_checked.cache_clear()
    assert linear4bit._fused_kernel_checked(device)
    linear4bit._fused_kernel_checked.cache_clear()
    monkeypatch.setattr(linear4bit, "_has_triton", lambda: True)
    layer = linear4bit.Linear4bit.from_linear(torch.nn.Linear(128, 64)).to(DEVICE)

    def wrong(x, weights):
        return [torch.zeros(x.shape[0], weights[0].out_features, dtype=x.dtype, device=x.device)]

    if DEVICE == "cuda":  # the module asks the check before it serves
        monkeypatch.setattr(nf4_kernels, "nf4_gemv", wrong)
        assert not layer.use_fused_kernel(device)
    assert_check_falls_back(linear4bit._fused_kernel_checked, device, nf4_kernels, "nf4_gemv", wrong, monkeypatch,
                            caplog)


@pytest.mark.parametrize("shape,dtype", [((200, 1152), torch.float32), ((7, 99), torch.float32),
                                         ((130, 192), torch.bfloat16), ((3, 64), torch.float16)])
def test_one_launch_dequantise_equals_the_torch_path(shape, dtype):
    """nf4_kernels.dequantize against nf4.dequantize_nf4 (bit-identical to bitsandbytes): float32 bit for bit,
    a last block of 35 weights and a half-used last byte (7 x 99); 16-bit bit for bit on a GPU (Triton's
    interpreter truncates float32 -> bfloat16 instead of rounding it: there, within one step of the dtype)."""
    from ahazero.models import nf4_kernels
    from ahazero.models.linear4bit import Linear4bit
    from ahazero.models.nf4 import dequantize_nf4
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(shape[1], shape[0], dtype=dtype)).to(DEVICE)
    meta = layer.quant_meta
    got = nf4_kernels.dequantize(layer.weight, layer.absmax, layer.nested_absmax, layer.offset, layer.code,
                                 layer.nested_code, meta["shape"], meta["dtype"], meta["blocksize"],
                                 meta["nested_blocksize"])
    want = dequantize_nf4(layer.weight, layer.quant_state)
    assert got.shape == want.shape == shape and got.dtype == want.dtype == dtype
    if dtype == torch.float32 or DEVICE == "cuda":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=0, rtol=torch.finfo(dtype).eps)


def test_4bit_layers_dequantise_through_the_kernel_and_fall_back_when_it_disagrees(monkeypatch, caplog):
    from ahazero.models import linear4bit, nf4_kernels
    torch.manual_seed(0)
    layer = linear4bit.Linear4bit.from_linear(torch.nn.Linear(128, 64)).to(DEVICE)
    calls, original = [], nf4_kernels.dequantize
    monkeypatch.setattr(nf4_kernels, "dequantize",  # (on a GPU the fused GEMV's own check dequantises too)
                        lambda *args: calls.append(args[0] is layer.weight) or original(*args))
    monkeypatch.setattr(linear4bit.Linear4bit, "dequant_kernel", True)
    rows = nf4_kernels.MAX_ROWS + 1  # above the fused GEMV's rows: the dequantise-then-matmul path
    x = torch.randn(rows, 128, device=DEVICE, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert sum(calls) == 2  # the forward and the backward's input gradient
    weight = linear4bit.dequantize_nf4(layer.weight, layer.quant_state)  # [64, 128]
    torch.testing.assert_close(y, x @ weight.t() + layer.bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, torch.ones(rows, 64, device=DEVICE) @ weight, atol=1e-5, rtol=1e-5)

    device = torch.device(DEVICE)
    linear4bit._dequant_kernel_checked.cache_clear()
    try:
        if DEVICE == "cuda":  # (in the interpreter its bf16 check fails: it truncates float32 -> bfloat16)
            assert linear4bit._dequant_kernel_checked(device)
            linear4bit._dequant_kernel_checked.cache_clear()
        assert_check_falls_back(linear4bit._dequant_kernel_checked, device, nf4_kernels, "dequantize",
                                lambda *args: torch.zeros(args[6], dtype=args[7], device=args[0].device),
                                monkeypatch, caplog)
    finally:
        linear4bit._dequant_kernel_checked.cache_clear()


@pytest.mark.slow
def test_the_kernels_self_checks_leave_the_random_state_alone():
    """They run once, in the middle of a user's run: their random inputs come from a generator of their own,
    so a seeded run draws the same numbers with the kernels on or off."""
    from ahazero.engine import gemv_kernels, sample_kernels
    from ahazero.models import linear4bit
    device = torch.device(DEVICE)
    checks = [lambda: gemv_kernels.checked(device, torch.float32),
              lambda: gemv_kernels.checked(device, torch.bfloat16, "nf4"),
              lambda: sample_kernels.checked(device),
              lambda: linear4bit._fused_kernel_checked(device),
              lambda: linear4bit._dequant_kernel_checked(device)]
    caches = [gemv_kernels.checked, sample_kernels.checked, linear4bit._fused_kernel_checked,
              linear4bit._dequant_kernel_checked]
    for cache in caches:
        cache.cache_clear()
    try:
        before = torch.cuda.get_rng_state(device) if DEVICE == "cuda" else torch.get_rng_state()
        for check in checks:
            check()
        after = torch.cuda.get_rng_state(device) if DEVICE == "cuda" else torch.get_rng_state()
        assert torch.equal(before, after)
    finally:
        for cache in caches:
            cache.cache_clear()

"""engine/gemv_kernels.py: a group's projections in one launch (base GEMV, bias, split-K reduction and the
LoRA expand in the epilogue) against PyTorch's math; on a CPU through Triton's interpreter."""
import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from ahazero.engine import gemv_kernels, lora_kernels
from ahazero.engine.layers import Projection, project

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x, weights, biases, a, b, scales):
    """cuBLAS's linear (float32 sums, + bias, one rounding), then PEFT's float32 adapter added and rounded."""
    ys = []
    for g, w in enumerate(weights):
        y = x.float() @ w.float().t() + (biases[g].float() if biases is not None else 0.0)
        y = y.to(x.dtype)
        if a is not None:
            y = (y.float() + (x.float() @ a[g].float().t()) @ b[g].float().t() * scales[g]).to(x.dtype)
        ys.append(y)
    return ys


def close(got, want):
    """Sums in another order, and the interpreter truncates to bfloat16: a few steps of the dtype."""
    tol = 4 * torch.finfo(want.dtype).eps * want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)


@pytest.mark.parametrize("N,K,outs,R,dtype,bias,min_k,rows", [
    (6, 192, [96, 16, 16], 8, torch.float32, True, 64, None),  # q/k/v-like with bias, K split in 3
    (1, 100, [70], 4, torch.float32, False, 256, None),  # one row, K not a multiple of the block, one split
    (13, 300, [40, 33], 16, torch.bfloat16, False, 64, None),  # gate/up-like, ragged tiles
    (32, 128, [64], 32, torch.bfloat16, True, 64, None),  # the largest batch served
    (40, 192, [48, 16], 8, torch.bfloat16, True, 64, 16),  # 3 row tiles of 16 rows, the last ragged, K split
])
@pytest.mark.parametrize("lora", ["shrink", "fused", None])
def test_lora_gemv_matches_reference(N, K, outs, R, dtype, bias, min_k, rows, lora):
    """lora "shrink": x A^T from lora_shrink's launch; "fused": the shrink's producers in the same launch (K in
    splits of 64 columns, so several partials are added, and one ragged split where K % 64 != 0). rows: x's rows
    per program (ROWS_PER_PROGRAM)."""
    torch.manual_seed(N + K)
    x = torch.randn(N, K, dtype=dtype, device=DEVICE)  # [N, K]
    weights = [torch.randn(o, K, dtype=dtype, device=DEVICE) / K ** 0.5 for o in outs]  # each [O, K]
    biases = [torch.randn(o, dtype=dtype, device=DEVICE) for o in outs] if bias else None
    a = [torch.randn(R, K, device=DEVICE) / K ** 0.5 for _ in outs] if lora else None  # float32, as PEFT's
    b = [torch.randn(o, R, device=DEVICE) for o in outs] if lora else None
    scales = [0.5, 2.0, 1.5][:len(outs)]
    xa = lora_kernels.lora_shrink(x, a) if lora == "shrink" else None  # [G, N, R]
    splits, _ = gemv_kernels.split_k(sum(-(-o // 16) for o in outs), K, 132, 2, min_k, 32)
    got = gemv_kernels._launch(x, weights, biases, xa, b, scales, block_o=16, block_k=32, min_k_per_split=min_k,
                               lora_a=a if lora == "fused" else None, shrink_k=64, rows_per_program=rows)
    for g, want in zip(got, reference(x, weights, biases, a, b, scales)):
        assert g.shape == want.shape and g.dtype == dtype
        close(g, want)
    if min_k == 64:
        assert splits > 1  # the split-K reduction ran
    # the tile counters and the fused shrink's are back to 0 for the next launch
    assert not gemv_kernels.split_k_workspace(x.device, 1)[0].any()


def busiest_sm(programs: int, sms: int, splits: int) -> float:
    """The reference for the balance: programs dealt out to the SMs one by one, the most work any SM got, in
    tiles (each program 1 / splits of one)."""
    per_sm = [0] * sms
    for p in range(programs):
        per_sm[p % sms] += 1
    return max(per_sm) / splits


@pytest.mark.parametrize("seed", range(4))
def test_balanced_split_gives_the_busiest_sm_the_least_work(seed):
    """split_k's balanced rule against dealing the programs out: of the split counts the plain rule allows, the
    one whose busiest SM does the least (the fewest splits among equals); never more than the plain rule's."""
    rng = torch.Generator().manual_seed(seed)
    for _ in range(200):
        tiles, K, sms, beside = (int(torch.randint(lo, hi, (), generator=rng)) for lo, hi in
                                 ((1, 300), (64, 20000), (8, 140), (0, 60)))
        plain, _ = gemv_kernels.split_k(tiles, K, sms, 1, 1024)
        balanced, _ = gemv_kernels.split_k(tiles, K, sms, 1, 1024, balanced=True, beside=beside)
        work = {s: busiest_sm(tiles * s + beside, sms, s) for s in range(1, plain + 1)}
        assert balanced == min(work, key=lambda s: (work[s], s))
        assert work[balanced] <= work[plain]
    # a Qwen2.5-1.5B down projection (24 tiles of 64 rows, K 8960 in steps of 128) on an H200's 132 SMs: 6 splits
    # put 12 SMs' second program after the rest; with its 35 LoRA shrink producers beside, 4
    assert gemv_kernels.split_k(24, 8960, 132, 1, 1024, 128)[0] == 6
    assert gemv_kernels.split_k(24, 8960, 132, 1, 1024, 128, balanced=True)[0] == 5
    assert gemv_kernels.split_k(24, 8960, 132, 1, 1024, 128, balanced=True, beside=35)[0] == 4


def test_lora_gemv_takes_the_shrink_output_or_the_adapters_not_both():
    x, w, a, b = (torch.randn(*shape, device=DEVICE) for shape in ((2, 64), (16, 64), (4, 64), (16, 4)))
    with pytest.raises(ValueError, match="not both"):
        gemv_kernels._launch(x, [w], None, lora_kernels.lora_shrink(x, [a]), [b], [1.0], lora_a=[a])


def quantized(linear):
    from ahazero.models.linear4bit import Linear4bit
    return Linear4bit.from_linear(linear).to(DEVICE)


@pytest.mark.parametrize("N,K,outs,R,dtype,bias,lookup,prefetch", [
    (6, 1152, [130, 64, 64], 8, torch.bfloat16, True, "pairs", 1),  # q/k/v-like with bias, K split, ragged tile
    (6, 1152, [130, 64, 64], 8, torch.bfloat16, True, "nibbles", 3),
    (1, 640, [70], 4, torch.float32, False, "nibbles", 2),  # one row (the CUDA-core products: test_engine_kernels)
    (32, 384, [64, 200], 32, torch.float16, False, "pairs", 3),  # gate/up-like, the largest batch served
    (6, 1152, [130, 64, 64], 8, torch.bfloat16, True, "permute", 2),  # the default lookup: unscaled values
    (32, 384, [64, 200], 32, torch.float16, False, "permute", 1),
    (3, 256, [64], 4, torch.float32, False, "permute", 3),  # float32: the code itself is the table
    (40, 256, [64, 70], 8, torch.bfloat16, False, "permute", 2),  # above 32 rows: x^T 64 wide
])
@pytest.mark.parametrize("lora", ["shrink", "fused", None])
def test_nf4_gemv_of_a_group_matches_the_dequantised_reference(N, K, outs, R, dtype, bias, lookup, prefetch, lora,
                                                               monkeypatch):
    """models/nf4_kernels.nf4_gemv over a group of NF4 weights, with the bias and the LoRA epilogue, against
    the reference on the dequantised weights; the NF4 lookups (a [256, 2] pair table, the [16] code, the
    unscaled values with each block's product scaled: byte permutes on a GPU, the table in x's dtype here), the
    loads of 1 to 3 blocks ahead in flight (splits shorter than that: their ends are masked); x A^T from
    lora_shrink's launch or from producers in the same launch (K in splits of 256 columns)."""
    from ahazero.models import nf4_kernels
    monkeypatch.setattr(nf4_kernels, "LOOKUP", lookup)
    monkeypatch.setattr(nf4_kernels, "PREFETCH", prefetch)
    torch.manual_seed(N + K)
    layers = [quantized(torch.nn.Linear(K, o, bias=bias).to(dtype)) for o in outs]
    x = torch.randn(N, K, dtype=dtype, device=DEVICE)  # [N, K]
    a = [torch.randn(R, K, device=DEVICE) / K ** 0.5 for _ in outs] if lora else None  # float32, as PEFT's
    b = [torch.randn(o, R, device=DEVICE) for o in outs] if lora else None
    scales = [0.5, 2.0, 1.5][:len(outs)]
    xa = lora_kernels.lora_shrink(x, a) if lora == "shrink" else None  # [G, N, R]
    with torch.no_grad():
        got = nf4_kernels.nf4_gemv(x, [layer.nf4_weight() for layer in layers], xa, b, scales,
                                   lora_a=a if lora == "fused" else None, shrink_k=256)
        weights = [layer.dequantized_weight(dtype) for layer in layers]
        biases = [layer.bias for layer in layers] if bias else None
        wants = reference(x, weights, biases, a, b, scales)
    for g, want in zip(got, wants):
        assert g.shape == want.shape and g.dtype == dtype
        close(g, want)
    assert not gemv_kernels.split_k_workspace(x.device, 1)[0].any()  # the counters are back to 0


def test_project_serves_4bit_groups_through_one_nf4_launch(monkeypatch):
    from ahazero.models.linear4bit import Linear4bit
    monkeypatch.setattr(Linear4bit, "fused_kernel", True)  # the kernel on any device (the interpreter here)
    torch.manual_seed(0)
    K = 128
    lins = [quantized(torch.nn.Linear(K, o, bias=True)) for o in (64, 96)]
    ps = tuple(Projection(lin, torch.randn(4, K, device=DEVICE), torch.randn(lin.out_features, 4, device=DEVICE),
                          0.5) for lin in lins)
    x = torch.randn(3, K, device=DEVICE)
    assert gemv_kernels.checked(x.device, x.dtype, "nf4")  # (its own launch, before the one counted)
    launches, original = [], gemv_kernels.nf4_lora_gemv
    monkeypatch.setattr(gemv_kernels, "nf4_lora_gemv", lambda *args: launches.append(args) or original(*args))
    with torch.no_grad():
        got = gemv_kernels.project(x, ps, lora_kernels.grouped_lora)
        for g, want in zip(got, project(x, ps)):
            close(g, want)
    assert len(launches) == 1
    from ahazero.models import nf4_kernels
    monkeypatch.setattr(gemv_kernels, "MAX_ROWS", 1)  # the 16-bit bound does not apply to 4-bit groups
    assert gemv_kernels.project(x, ps, lora_kernels.grouped_lora) is not None
    rows = torch.randn(nf4_kernels.MAX_ROWS + 1, K, device=DEVICE)  # 4-bit batches above it: the NF4 module's path
    assert gemv_kernels.project(rows, ps, lora_kernels.grouped_lora) is None
    dense = (ps[0], Projection(torch.nn.Linear(K, 8, device=DEVICE), torch.randn(4, K, device=DEVICE),
                               torch.randn(8, 4, device=DEVICE), 0.5))
    assert gemv_kernels.project(x, dense, lora_kernels.grouped_lora) is None  # 4-bit and 16-bit: no one launch


def test_project_serves_decode_batches_and_declines_the_rest(monkeypatch):
    monkeypatch.setattr(gemv_kernels, "MAX_ROWS", 64)  # (32 by default) so that 40 rows reach LARGE_CONFIG
    monkeypatch.setattr(gemv_kernels, "SMALL_GROUP_MAX_ROWS", 0)  # every group bound by MAX_ROWS
    torch.manual_seed(0)
    K = 64
    lins = [torch.nn.Linear(K, o, bias=True, device=DEVICE) for o in (32, 16)]
    ps = tuple(Projection(lin, torch.randn(4, K, device=DEVICE), torch.randn(lin.out_features, 4, device=DEVICE),
                          0.5) for lin in lins)
    for rows in (3, 40):  # 40: above 32 rows, the tiles of gemv_kernels.LARGE_CONFIG
        x = torch.randn(rows, K, device=DEVICE)
        got = gemv_kernels.project(x, ps, lora_kernels.grouped_lora)
        for g, want in zip(got, project(x, ps)):
            close(g, want)
    big = torch.randn(gemv_kernels.MAX_ROWS + 1, K, device=DEVICE)
    assert gemv_kernels.project(big, ps, lora_kernels.grouped_lora) is None  # a prefill: cuBLAS
    assert gemv_kernels.project(x, ps, None) is None  # LoRA through torch asked for
    mixed = (ps[0], Projection(lins[1]))  # one adapter on, one off: two ranks
    assert gemv_kernels.project(x, mixed, lora_kernels.grouped_lora) is None
    half = (Projection(torch.nn.Linear(K, 8, device=DEVICE, dtype=torch.bfloat16)),)
    assert gemv_kernels.project(x, half) is None  # weight dtype differs from x's


def test_small_groups_keep_the_one_launch_up_to_their_own_bound(monkeypatch):
    """A group of at most SMALL_GROUP_WEIGHTS weight elements takes the one launch up to SMALL_GROUP_MAX_ROWS
    rows, a larger one up to MAX_ROWS only."""
    torch.manual_seed(0)
    K = 64
    lins = [torch.nn.Linear(K, o, bias=True, device=DEVICE) for o in (32, 16)]  # 48 x 64 weight elements
    ps = tuple(Projection(lin, torch.randn(4, K, device=DEVICE), torch.randn(lin.out_features, 4, device=DEVICE),
                          0.5) for lin in lins)
    monkeypatch.setattr(gemv_kernels, "MAX_ROWS", 8)
    monkeypatch.setattr(gemv_kernels, "SMALL_GROUP_MAX_ROWS", 40)
    monkeypatch.setattr(gemv_kernels, "SMALL_GROUP_WEIGHTS", 48 * K)
    x = torch.randn(40, K, device=DEVICE)  # above MAX_ROWS, at the small groups' bound
    got = gemv_kernels.project(x, ps, lora_kernels.grouped_lora)
    for g, want in zip(got, project(x, ps)):
        close(g, want)
    assert gemv_kernels.project(torch.randn(41, K, device=DEVICE), ps, lora_kernels.grouped_lora) is None
    monkeypatch.setattr(gemv_kernels, "SMALL_GROUP_WEIGHTS", 48 * K - 1)  # now a large group
    assert gemv_kernels.project(x, ps, lora_kernels.grouped_lora) is None
    assert gemv_kernels.project(x[:8], ps, lora_kernels.grouped_lora) is not None


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_engine_decoding_through_the_gemv_kernels_equals_the_merged_weights(arch):
    """The whole engine, fused decode with its projections through lora_gemv (q/k/v biases in qwen2), LoRA
    on every linear: greedy tokens equal to PEFT's merged weights through transformers, log-probs equal to
    the decode without the gemv kernels."""
    import tiny
    from peft import LoraConfig, get_peft_model
    from ahazero.engine.engine import create_generator
    from ahazero.engine.types import SamplingParams
    from test_engine_lora import TARGETS, merged_greedy, tokens
    tok = tiny.tokenizer()
    torch.manual_seed(0)
    m = get_peft_model(tiny.tiny_model(arch, initializer_range=0.3),
                       LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)).eval()
    prompts = [tok.encode(t) for t in ("Hi", "What is the capital of France? Think step by step.")]
    params = SamplingParams(temperature=0, max_tokens=6, n=2, ignore_eos=True)
    want = merged_greedy(m, prompts, max_tokens=6)  # on the CPU
    m.to(DEVICE)
    options = dict(max_seq_length=64, attention="triton", fused_kernels=True, lora_kernels=True)
    calls = []
    original = gemv_kernels._launch

    def counted(*args, **kwargs):
        calls.append(len(args[1]))  # projections in the group
        return original(*args, **kwargs)

    gemv_kernels._launch = counted
    try:
        got = create_generator(m, tok, gemv_kernels=True, **options).generate(prompts, params)
    finally:
        gemv_kernels._launch = original
    without = create_generator(m, tok, gemv_kernels=False, **options).generate(prompts, params)
    assert tokens(got) == tokens(without) == want
    assert calls and set(calls) == {3, 1, 2}  # q/k/v, o and down, gate/up: every group went through it
    for a, b in zip(got, without):
        torch.testing.assert_close(torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_engine_decoding_a_4bit_model_through_the_nf4_group_launch_equals_its_per_projection_decode(monkeypatch):
    """A 4-bit qwen2 (q/k/v biases) with LoRA on every linear: the fused decode with every group in one NF4
    launch gives the tokens and log-probs of the decode that runs each Linear4bit and the LoRA kernels."""
    import tiny
    from peft import LoraConfig, get_peft_model
    from ahazero.engine.engine import create_generator
    from ahazero.engine.types import SamplingParams
    from ahazero.models.linear4bit import Linear4bit, quantize_model
    from test_engine_lora import TARGETS, tokens
    monkeypatch.setattr(Linear4bit, "fused_kernel", True)
    tok = tiny.tokenizer()
    torch.manual_seed(0)
    model = tiny.tiny_model("qwen2", initializer_range=0.3)
    quantize_model(model, dynamic=False)
    m = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    m.eval().to(DEVICE)
    prompts = [tok.encode(t) for t in ("Hi", "What is the capital of France? Think step by step.")]
    params = SamplingParams(temperature=0, max_tokens=6, n=2, ignore_eos=True)
    options = dict(max_seq_length=64, attention="triton", fused_kernels=True, lora_kernels=True)
    groups = []
    original = gemv_kernels.nf4_lora_gemv
    monkeypatch.setattr(gemv_kernels, "nf4_lora_gemv", lambda x, packed, *args: groups.append(len(packed)) or
                        original(x, packed, *args))
    got = create_generator(m, tok, gemv_kernels=True, **options).generate(prompts, params)
    without = create_generator(m, tok, gemv_kernels=False, **options).generate(prompts, params)
    assert tokens(got) == tokens(without)
    assert set(groups) == {3, 1, 2}  # q/k/v, o and down, gate/up: every group went through it
    for a, b in zip(got, without):
        torch.testing.assert_close(torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs),
                                   atol=1e-4, rtol=1e-4)


def test_gemv_kernels_need_the_fused_decode():
    from ahazero.engine.config import EngineConfig
    with pytest.raises(ValueError, match="gemv_kernels needs fused_kernels"):
        EngineConfig(max_seq_length=64, device=torch.device("cpu"), dtype=torch.float32, attention="triton",
                     gemv_kernels=True)
    cuda = EngineConfig(max_seq_length=64, device=torch.device("cuda"), dtype=torch.bfloat16)
    assert cuda.gemv_kernels is True


def test_a_failing_kernel_is_turned_off_with_a_warning_and_decode_takes_cublas(monkeypatch, caplog):
    """checked() runs once per device and dtype before lora_gemv serves: a kernel that fails (here: raises)
    turns it off with a warning, and project() declines, so decode takes the cuBLAS path, never a wrong one."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, device=DEVICE)
    ps = (Projection(lin),)
    x = torch.randn(3, 64, device=DEVICE)
    gemv_kernels.checked.cache_clear()
    assert gemv_kernels.checked(x.device, x.dtype)  # the real kernels pass their checks
    assert gemv_kernels.checked(x.device, torch.bfloat16, "nf4")
    gemv_kernels.checked.cache_clear()

    def broken(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(gemv_kernels, "_launch", broken)
    try:
        with caplog.at_level("WARNING", logger="ahazero"):
            assert gemv_kernels.project(x, ps) is None
        assert "failed" in caplog.text and "each projection" in caplog.text
    finally:
        gemv_kernels.checked.cache_clear()


def _run_ptx(ptx: str, operands: dict[str, int]) -> dict[str, int]:
    """The instructions `permute_lookup_ptx` uses, as the PTX ISA defines them (.b32 registers; `prmt`'s default
    mode: selector nibble k picks byte (k & 7) of {b, a} for result byte k, and with bit 3 set that byte's sign
    replicated; `lop3`'s immLut read at index (a_bit << 2 | b_bit << 1 | c_bit)); {$0, $1} unpacks the low half
    first. Returns every register and operand."""
    regs = dict(operands)
    body = ptx.strip()[1:-1]  # drop the { } scope
    for ins in filter(None, (i.strip() for i in body.split(";"))):
        op, _, args = ins.partition(" ")
        args = [a.strip() for a in args.split(",")] if not args.lstrip().startswith("{") else args
        val = lambda a: int(a, 16) if a.startswith("0x") else regs[a]  # noqa: E731
        if op == ".reg":
            continue
        if op == "mov.b32" and isinstance(args, str):  # mov.b32 {$lo, $hi}, src
            lo_hi, src = args.rsplit(",", 1)
            lo, hi = (a.strip() for a in lo_hi.strip()[1:-1].split(","))
            regs[lo], regs[hi] = val(src.strip()) & 0xFFFF, val(src.strip()) >> 16
        elif op == "mov.b32":
            regs[args[0]] = val(args[1])
        elif op == "and.b32":
            regs[args[0]] = val(args[1]) & val(args[2])
        elif op == "shr.b32":
            regs[args[0]] = val(args[1]) >> int(args[2])
        elif op == "shl.b32":
            regs[args[0]] = (val(args[1]) << int(args[2])) & 0xFFFFFFFF
        elif op == "prmt.b32":
            pool = val(args[1]) | val(args[2]) << 32  # bytes 0-3 from a, 4-7 from b
            out = 0
            for k in range(4):
                sel = (val(args[3]) >> (4 * k)) & 0xF
                byte = (pool >> (8 * (sel & 7))) & 0xFF
                if sel & 8:
                    byte = 0xFF if byte & 0x80 else 0
                out |= byte << (8 * k)
            regs[args[0]] = out
        elif op == "lop3.b32":
            a, b, c, lut = val(args[1]), val(args[2]), val(args[3]), int(args[4], 16)
            regs[args[0]] = sum(((lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1))) & 1) << i
                                for i in range(32))
        else:
            raise AssertionError(f"the PTX uses {op}, which this interpreter does not know")
    return regs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_permute_lookup_ptx_gives_every_bytes_nf4_values(dtype):
    """The PTX of the fused kernel's default lookup, interpreted instruction by instruction: for words whose
    bytes run over all 256 values in every position, $0-$3 are the values of the bytes' high nibbles and $4-$7
    of their low nibbles, bit for bit the NF4 table in `dtype`."""
    from ahazero.models import nf4, nf4_kernels
    values = [v & 0xFFFF for v in nf4.nf4_code().to(dtype).view(torch.int16).tolist()]  # [16] 16-bit patterns
    ptx = nf4_kernels.permute_lookup_ptx(dtype)
    rng = torch.Generator().manual_seed(0)
    words = [b | (b + 85) % 256 << 8 | (b + 170) % 256 << 16 | (255 - b) << 24 for b in range(256)]
    words += torch.randint(0, 2 ** 32, (64,), generator=rng, dtype=torch.int64).tolist()
    for word in words:
        regs = _run_ptx(ptx, {"$8": word})
        bytes_ = [(word >> (8 * i)) & 0xFF for i in range(4)]
        assert [regs[f"${i}"] for i in range(4)] == [values[b >> 4] for b in bytes_], hex(word)
        assert [regs[f"${i + 4}"] for i in range(4)] == [values[b & 15] for b in bytes_], hex(word)


def test_per_call_integers_compile_once():
    """Triton compiles a new variant for an integer argument equal to 1 or divisible by 16: the counts that change
    from call to call (a decode batch's rows, a prefill's or a training batch's tokens, a sequence length, the
    sampler's per-step seed) are left unspecialised, so a batch shrinking to 1 row mid-rollout, a prefill of 96
    tokens or a seed of 16 reuses the compiled kernel (each compile took 0.2-5.7 s on the H200 machines, in the
    middle of a rollout); the widths and strides stay specialised (they let Triton vectorise the loads)."""
    from ahazero.engine import fused_kernels, lora_kernels, sample_kernels
    from ahazero.models import nf4_kernels, rope, swiglu_kernels

    def unspecialised(kernel):  # (the interpreter's wrapper keeps the decorator's arguments)
        if hasattr(kernel, "params"):
            return {p.name for p in kernel.params if p.do_not_specialize}
        return set(kernel.kwargs["do_not_specialize"] or ())

    assert unspecialised(gemv_kernels._gemv_kernel) == {"N"}
    assert unspecialised(nf4_kernels._nf4_gemv_kernel) == {"N"}
    assert unspecialised(sample_kernels._sample_kernel) == {"seed"}
    assert unspecialised(lora_kernels._shrink_kernel) == unspecialised(lora_kernels._expand_kernel) == {"N"}
    assert unspecialised(swiglu_kernels._swiglu_lora_kernel) == {"M"}
    assert unspecialised(swiglu_kernels._swiglu_lora_backward_kernel) == {"M"}
    assert unspecialised(rope._rope_kernel) == {"rows", "T"}
    assert unspecialised(fused_kernels._silu_mul_kernel) == {"n"}

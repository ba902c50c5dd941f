"""AdamW8bit (grpo/optimizers.py) against slow references written here and against torch.optim.AdamW.

The references: blockwise quantisation as a loop over 256-blocks with a brute-force nearest table entry
per value (ties, within float rounding of a midpoint, may go either way); one AdamW-8bit step as
"dequantise, AdamW in float32 from the textbook formula, quantise". Measured on the CPU (torch 2.13):
small parameters (< 4096 elements, float32 state) are bit-identical to torch.optim.AdamW; on a 64x96
least-squares problem over 50 steps (lr 1e-2) the 8-bit weights stay within 3.4% (relative L2) of the
distance AdamW's weights moved, and the final loss is within 2.1% of AdamW's.
"""
import io

import pytest
import torch

from ahazero import GRPOConfig
from ahazero.grpo import optimizers
from ahazero.grpo.optimizers import (AdamW8bit, PagedAdamW32bit, adamw_update, copied_in, dequantize_blockwise,
                                     gather, init_state, pieces, quantize_blockwise, unsigned_dynamic_code)
from ahazero.grpo.trainer import make_optimizer
from ahazero.models.nf4 import dynamic_code

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BS = 256
TIE = 1e-6  # distances to two table entries this close count as a tie


def ref_quantize(x: torch.Tensor, table: torch.Tensor):
    """Per 256-block: absmax, then for each value the index of the nearest table entry to value / absmax."""
    codes, absmax = [], []
    for start in range(0, x.numel(), BS):
        block = x[start:start + BS]
        amax = block.abs().max()
        scaled = block / amax if amax > 0 else block
        codes.append((scaled[:, None] - table[None, :]).abs().argmin(dim=1))
        absmax.append(amax)
    return torch.cat(codes), torch.stack(absmax)


def ref_dequantize(codes, absmax, table):
    return torch.tensor([table[int(q)].item() * absmax[i // BS].item() for i, q in enumerate(codes)],
                        dtype=torch.float32)


def assert_nearest(codes, x, absmax, table):
    """codes are the nearest table entries to x / absmax (per block), up to ties."""
    scale = torch.where(absmax > 0, absmax, 1.0).repeat_interleave(BS)[: x.numel()]
    dist = ((x / scale)[:, None] - table[None, :]).abs()  # [n, 256]
    chosen = dist.gather(1, codes.long()[:, None])[:, 0]
    assert (chosen <= dist.min(dim=1).values + TIE).all()


def moments_input(n, seed):
    """Random values of mixed magnitudes (as moments have), a zero block and a short tail block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-6, 0, n)[torch.randperm(n, generator=g)]
    x[BS:2 * BS] = 0.0
    return x


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 255, 3 * BS, 5 * BS + 37])
def test_quantize_blockwise_matches_reference(signed, n):
    table = dynamic_code() if signed else unsigned_dynamic_code()
    x = moments_input(max(n, 2 * BS), seed=n)[:n]
    x = x if signed else x.abs()
    codes, absmax = quantize_blockwise(x, table)
    ref_codes, ref_absmax = ref_quantize(x, table)
    assert codes.dtype == torch.uint8 and codes.shape == (n,) and absmax.shape == (-(-n // BS),)
    assert torch.equal(absmax, ref_absmax)
    differ = codes.long() != ref_codes
    assert differ.sum() <= 2  # only at ties
    assert_nearest(codes, x, absmax, table)
    out = dequantize_blockwise(codes, absmax, table)
    assert torch.equal(out, ref_dequantize(codes, absmax, table))
    if n > BS:  # the all-zero block: absmax 0, exact zeros back
        assert absmax[1] == 0 and torch.equal(out[BS:2 * BS], torch.zeros(min(BS, n - BS)))


def test_unsigned_dynamic_code():
    """bnb's create_dynamic_map(signed=False): 0, 1 and 2^(i+1) midpoints per decade 10^(i-6), i = 0..6."""
    code = unsigned_dynamic_code().double()
    expect = [0.0, 1.0]
    for i in range(7):
        k = 2 ** (i + 1)
        expect += [10.0 ** (i - 6) * (0.1 + 0.9 * (j + 0.5) / k) for j in range(k)]
    assert code.shape == (256,) and (code.diff() > 0).all()
    torch.testing.assert_close(code, torch.tensor(sorted(expect), dtype=torch.float64), rtol=1e-6, atol=0)


def ref_step(p, g, m, v, t, lr, b1, b2, eps, wd):
    """Textbook AdamW (Loshchilov & Hutter 2019) in float32 from float moments m, v."""
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
    return p - lr * mhat / (vhat.sqrt() + eps), m, v


def test_step_matches_reference():
    """Each step against "dequantise (reference), AdamW, quantise (reference)" from the optimizer's state."""
    n, hyper = 4096 + 3 * BS + 41, dict(lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, wd=0.1)
    signed, unsigned = dynamic_code(), unsigned_dynamic_code()
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(n, generator=gen).requires_grad_()
    opt = AdamW8bit([p], lr=hyper["lr"], betas=(hyper["b1"], hyper["b2"]), eps=hyper["eps"], weight_decay=hyper["wd"])
    m, v = torch.zeros(n), torch.zeros(n)
    for t in range(1, 5):
        grad = torch.randn(n, generator=gen) * torch.logspace(-3, 0, n)  # [n] magnitudes over 3 decades
        grad[:BS] = 0.0  # a block whose moments stay zero
        ref_p, ref_m, ref_v = ref_step(p.detach().clone(), grad, m, v, t, **hyper)
        p.grad = grad.clone()
        opt.step()
        s = opt.state[p]
        assert s["step"] == t and s["state1"].dtype == s["state2"].dtype == torch.uint8
        torch.testing.assert_close(p.detach(), ref_p, rtol=1e-6, atol=1e-7)
        for codes, absmax, ref, table in [(s["state1"], s["absmax1"], ref_m, signed),
                                          (s["state2"], s["absmax2"], ref_v, unsigned)]:
            torch.testing.assert_close(absmax, ref_quantize(ref, table)[1], rtol=1e-6, atol=0)
            assert_nearest(codes, ref, absmax, table)
        assert s["absmax1"][0] == s["absmax2"][0] == 0
        m = ref_dequantize(s["state1"], s["absmax1"], signed)  # what the next step starts from
        v = ref_dequantize(s["state2"], s["absmax2"], unsigned)


def regression(steps, make_opt, seed=0):
    """`steps` optimizer steps of least squares X W + b ~ Y, W [64, 96] (6144 elements: 8-bit), b [96] (float32)."""
    g = torch.Generator().manual_seed(seed)
    x, w_true = torch.randn(256, 64, generator=g), torch.randn(64, 96, generator=g) * 0.3
    y = x @ w_true + 0.01 * torch.randn(256, 96, generator=g)  # [256, 96]
    w = (torch.randn(64, 96, generator=g) * 0.1).requires_grad_()
    b = torch.zeros(96, requires_grad=True)
    opt = make_opt([w, b])
    weights, losses = [w.detach().clone()], []
    for _ in range(steps):
        loss = ((x @ w + b - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        weights.append(w.detach().clone())
        losses.append(loss.item())
    return weights, losses


def test_tracks_torch_adamw():
    kw = dict(lr=1e-2, weight_decay=0.01)
    w32, loss32 = regression(50, lambda ps: torch.optim.AdamW(ps, **kw))
    w8, loss8 = regression(50, lambda ps: AdamW8bit(ps, **kw))
    assert torch.equal(w8[1], w32[1])  # step 1: zero moments are exact in 8 bit
    for a, b in zip(w8[2:], w32[2:]):
        assert (a - b).norm() < 0.06 * (b - w32[0]).norm()  # measured <= 0.034
    assert loss32[-1] < 0.1 * loss32[0]
    assert abs(loss8[-1] - loss32[-1]) < 0.05 * loss32[-1]  # measured 2.1%


def test_small_params_match_torch_adamw():
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(32, 64, generator=gen), torch.randn(7, generator=gen)]  # 2048 and 7 elements
    ours, theirs = [p.clone().requires_grad_() for p in params], [p.clone().requires_grad_() for p in params]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
    opt8, opt32 = AdamW8bit(ours, **kw), torch.optim.AdamW(theirs, **kw)
    for _ in range(10):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt8.step()
        opt32.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # measured: bit-identical on the CPU
    assert set(opt8.state[ours[0]]) == {"step", "exp_avg", "exp_avg_sq"}


def one_at_a_time(params, states, lr, betas, eps, weight_decay):
    """The update of each parameter alone (dequantise its moments, AdamW, quantise), as AdamW8bit did before it
    laid a chunk's parameters end to end."""
    signed, unsigned = dynamic_code(params[0].device), unsigned_dynamic_code(params[0].device)
    for p in params:
        if p.grad is None:
            continue
        state = states.setdefault(p, init_state(p, p.numel() >= 4096))
        state["step"] += 1
        if "state1" in state:
            m = dequantize_blockwise(state["state1"], state["absmax1"], signed)  # [n]
            v = dequantize_blockwise(state["state2"], state["absmax2"], unsigned)
        else:
            m, v = state["exp_avg"].reshape(-1), state["exp_avg_sq"].reshape(-1)
        new_p, m, v = adamw_update(p.detach().reshape(-1).float(), p.grad.reshape(-1).float(), m, v, state["step"],
                                   lr, betas[0], betas[1], eps, weight_decay)
        p.detach().copy_(new_p.view(p.shape))
        if "state1" in state:
            (state["state1"], state["absmax1"]), (state["state2"], state["absmax2"]) = (
                quantize_blockwise(m, signed), quantize_blockwise(v, unsigned))
        else:
            state["exp_avg"], state["exp_avg_sq"] = m.view(p.shape), v.view(p.shape)


@pytest.mark.parametrize("device, paged", [("cpu", False), pytest.param("cuda", False, marks=CUDA),
                                           pytest.param("cuda", True, marks=CUDA)])
def test_chunked_step_equals_each_parameter_alone(monkeypatch, device, paged):
    """Parameters laid end to end in chunks (8-bit ones with a partial last block, bf16, float32 state; chunks cut
    at 12,000 values; one parameter without a gradient for a step, so its step count differs, and then its state
    is gathered from another chunk's buffers: its last block's padding must decode to 0, which the gradient that
    undoes its first, shrinking its first moment tenfold, would show): parameters and state bit for bit those of
    updating each parameter alone, over 4 steps. On a GPU too, with the state paged to pinned memory."""
    monkeypatch.setattr(optimizers, "CHUNK_ELEMENTS", 12000)
    gen = torch.Generator().manual_seed(3)
    shapes = [(5000,), (80, 64), (33,), (4096,), (300, 20), (7, 5), (9000,)]
    ours = [(torch.randn(s, generator=gen) * 0.1).to(device, torch.bfloat16 if i == 1 else torch.float32)
            .requires_grad_() for i, s in enumerate(shapes)]
    reference = [p.detach().clone().requires_grad_() for p in ours]
    kw = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    opt, states = AdamW8bit(ours, paged=paged, **kw), {}
    copies = []  # per-tensor copies of state from another device (paged: the pinned state not laid out as the chunk)
    monkeypatch.setattr(optimizers, "copied_in", lambda *a, **k: copies.append(a) or copied_in(*a, **k))
    first = {}
    for step in range(4):
        if step == 3:
            copies.clear()  # the chunks are as the step before's: their state comes in one copy each
        for i, (a, b) in enumerate(zip(ours, reference)):
            skip = step == 1 and i == 4
            a.grad = None if skip else (torch.randn(a.shape, generator=gen) * torch.rand(1, generator=gen)).to(
                device, a.dtype)
            if step == 0:
                first[i] = a.grad
            elif step == 2 and i == 4:
                a.grad = -first[i]
            b.grad = None if skip else a.grad.clone()
        opt.step()
        one_at_a_time(reference, states, **kw)
    assert len(optimizers.update_chunks(ours, [opt.state[p] for p in ours])) >= 3
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)
        mine, want = opt.state[a], states[b]
        assert mine.keys() == want.keys() and mine["step"] == want["step"]
        for key in want:
            if torch.is_tensor(want[key]):
                assert mine[key].shape == want[key].shape and torch.equal(mine[key].to(device), want[key]), key
                assert mine[key].is_pinned() if paged else mine[key].device == a.device
    assert opt.state[ours[4]]["step"] == 3
    assert copies == []


def test_gather_pads_each_tensor_to_its_segment_and_finds_its_own_layout():
    tensors = [torch.arange(3, dtype=torch.bfloat16), torch.arange(5, dtype=torch.bfloat16).view(1, 5)]
    flat = gather(tensors, [4, 8], torch.float32, torch.device("cpu"), fill=7)
    assert flat.dtype == torch.float32 and flat.tolist() == [0, 1, 2, 7, 0, 1, 2, 3, 4, 7, 7, 7]
    assert torch.equal(copied_in(tensors, [4, 8], torch.float32, torch.device("cpu"), fill=7), flat)
    views = pieces(flat, [3, 5], [4, 8])
    assert [v.tolist() for v in views] == [[0, 1, 2], [0, 1, 2, 3, 4]]
    assert gather(views, [4, 8], torch.float32, torch.device("cpu")) is flat  # laid out already: no copy
    assert gather(views[::-1], [8, 4], torch.float32, torch.device("cpu")) is not flat  # another order
    assert gather(views, [4, 8], torch.float64, torch.device("cpu")) is not flat


def state_bytes(opt):
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def test_state_memory():
    """8-bit: two uint8 codes + two float32 absmax per 256 values; torch AdamW: two float32 moments."""
    n = 64 * 1024
    per_param = {}
    for cls in (AdamW8bit, torch.optim.AdamW):
        p = torch.zeros(n, requires_grad=True)
        opt = cls([p])
        p.grad = torch.ones(n)
        opt.step()
        per_param[cls] = state_bytes(opt) / n
    assert per_param[AdamW8bit] == 2 + 2 * 4 / BS  # 2.03 bytes
    assert per_param[torch.optim.AdamW] >= 8


def make_params():
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(5000, generator=gen).requires_grad_(),  # 8-bit, with a tail block
            torch.randn(80, 64, generator=gen).to(torch.bfloat16).requires_grad_(),  # 8-bit, bf16 parameter
            torch.randn(33, generator=gen).requires_grad_()]  # float32 state


def run_steps(params, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("through_disk", [False, True])
def test_state_dict_round_trip(through_disk):
    kw = dict(lr=3e-3, weight_decay=0.05)
    straight = make_params()
    opt = AdamW8bit(straight, **kw)
    run_steps(straight, opt, 3, seed=10)
    run_steps(straight, opt, 3, seed=11)

    first = make_params()
    opt_first = AdamW8bit(first, **kw)
    run_steps(first, opt_first, 3, seed=10)
    saved = opt_first.state_dict()
    if through_disk:
        buf = io.BytesIO()
        torch.save(saved, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt_resumed = AdamW8bit(resumed, lr=1.0)  # the saved groups bring lr back
    opt_resumed.load_state_dict(saved)
    state = opt_resumed.state[resumed[1]]
    assert state["state1"].dtype == torch.uint8 and state["absmax1"].dtype == torch.float32
    run_steps(resumed, opt_resumed, 3, seed=11)
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)
    for a, b in zip(opt_resumed.state.values(), opt.state.values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                            for k in a)


def test_paged_state_stays_in_its_own_buffers_and_updates_as_unpaged(monkeypatch):
    """paged=True (CUDA parameters: state in pinned CPU memory, copied in and back inside step): the same
    parameters and state as unpaged; after the first step a chunk's state is views of one pinned buffer per
    kind (one copy each way), which later steps write back into; and a state dict that loads back paged. On
    the CPU the paging is forced (no pinning) to run that path."""
    from ahazero.grpo import optimizers
    monkeypatch.setattr(optimizers, "_pages", lambda p, paged: paged)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    kw = dict(lr=3e-3, weight_decay=0.05)
    plain, paged = make_params(), make_params()
    opt_plain, opt_paged = AdamW8bit(plain, **kw), AdamW8bit(paged, paged=True, **kw)
    run_steps(plain, opt_plain, 1, seed=5)
    run_steps(paged, opt_paged, 1, seed=5)
    buffers = {id(p): {k: v for k, v in opt_paged.state[p].items() if torch.is_tensor(v)} for p in paged}
    eight_bit = [opt_paged.state[p] for p in paged[:2]]  # one chunk: 5,000 and 80 x 64 values
    for key in ("state1", "absmax1", "state2", "absmax2"):
        base = eight_bit[0][key]._base
        assert base is not None and eight_bit[1][key]._base is base
    run_steps(plain, opt_plain, 3, seed=6)
    run_steps(paged, opt_paged, 3, seed=6)
    for a, b in zip(paged, plain):
        assert torch.equal(a, b)
    for p, q in zip(paged, plain):
        state, want = opt_paged.state[p], opt_plain.state[q]
        assert state["step"] == want["step"] == 4
        for key, buffer in buffers[id(p)].items():
            assert state[key] is buffer and torch.equal(buffer, want[key])
    resumed = [p.detach().clone().requires_grad_() for p in paged]
    opt_resumed = AdamW8bit(resumed, paged=True, **kw)
    opt_resumed.load_state_dict(opt_paged.state_dict())
    run_steps(resumed, opt_resumed, 2, seed=7)
    run_steps(plain, opt_plain, 2, seed=7)
    for a, b in zip(resumed, plain):
        assert torch.equal(a, b)


def test_paged_adamw_32bit_is_torch_adamw_with_its_state_paged(monkeypatch):
    """PagedAdamW32bit (paging forced on the CPU, as above): parameters and float32 moments equal to torch's
    AdamW (single-tensor path) bit for bit, state written back into its own buffers, never 8 bit; and a torch
    AdamW state dict (its `step` a tensor, its groups without min_8bit_size) loads and goes on equal."""
    from ahazero.grpo import optimizers
    monkeypatch.setattr(optimizers, "_pages", lambda p, paged: paged)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.05)
    ours, theirs = make_params()[::2], make_params()[::2]  # float32: 5,000 (8 bit in AdamW8bit) and 33 elements
    opt, torch_opt = PagedAdamW32bit(ours, **kw), torch.optim.AdamW(theirs, foreach=False, **kw)
    run_steps(ours, opt, 1, seed=5)
    run_steps(theirs, torch_opt, 1, seed=5)
    buffers = {id(p): (opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]) for p in ours}
    run_steps(ours, opt, 3, seed=6)
    run_steps(theirs, torch_opt, 3, seed=6)
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        state, want = opt.state[p], torch_opt.state[q]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and state["step"] == int(want["step"]) == 4
        assert state["exp_avg"] is buffers[id(p)][0] and state["exp_avg_sq"] is buffers[id(p)][1]
        assert torch.equal(state["exp_avg"], want["exp_avg"]) and torch.equal(state["exp_avg_sq"], want["exp_avg_sq"])
    resumed = [q.detach().clone().requires_grad_() for q in theirs]
    opt_resumed = PagedAdamW32bit(resumed, **kw)
    saved = io.BytesIO()
    torch.save(torch_opt.state_dict(), saved)  # as a checkpoint's optimizer.pt
    saved.seek(0)
    opt_resumed.load_state_dict(torch.load(saved, weights_only=True))
    run_steps(resumed, opt_resumed, 2, seed=7)
    run_steps(theirs, torch_opt, 2, seed=7)
    for a, b in zip(resumed, theirs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="invalid PagedAdamW32bit hyperparameters"):
        PagedAdamW32bit(make_params(), lr=-1.0)


@pytest.mark.parametrize("optim, cls", [("adamw_8bit", AdamW8bit), ("paged_adamw_8bit", AdamW8bit),
                                        ("paged_adamw_32bit", PagedAdamW32bit), ("adamw_torch", torch.optim.AdamW)])
def test_make_optimizer(tmp_path, optim, cls):
    args = GRPOConfig(output_dir=str(tmp_path), optim=optim, learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95,
                      adam_epsilon=1e-7, weight_decay=0.1)
    opt = make_optimizer([torch.zeros(8, requires_grad=True)], args)
    assert type(opt) is cls
    assert getattr(opt, "paged", False) == optim.startswith("paged")
    group = opt.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]) == (3e-4, (0.8, 0.95), 1e-7, 0.1)


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_fsdp2_refuses_the_optimizers_whose_state_is_whole_tensors(optim):
    from ahazero.grpo import fsdp
    with pytest.raises(ValueError, match="does not follow the parameters' shards"):
        fsdp.check_supported(torch.nn.Linear(4, 4), optim)

"""chunked_token_logprobs against a float64 log_softmax of full logits, and proof that no [N*T, V]
tensor is ever made (forward or backward)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ahazero.grpo import logprob_kernels, logprobs
from ahazero.grpo.logprobs import chunk_forward_and_dlogits, chunked_token_logprobs, default_chunk_tokens

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs Triton kernels in the interpreter


def reference(hidden, weight, targets, temperature=1.0, bias=None):
    """Full logits in float64: (logps [N, T], entropy [N, T])."""
    logits = hidden.double() @ weight.double().T                                 # [N, T, V]
    if bias is not None:
        logits = logits + bias.double()
    logp = torch.log_softmax(logits / temperature, dim=-1)                       # [N, T, V]
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def make_inputs(n, t, h, v, seed, dtype=torch.float32, device="cpu", with_bias=False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=gen)                                 # [N, T, H]
    weight = torch.randn(v, h, generator=gen) * 2 / h ** 0.5                     # [V, H]
    bias = torch.randn(v, generator=gen) if with_bias else None                  # [V]
    targets = torch.randint(0, v, (n, t), generator=gen)                         # [N, T]
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)     # noqa: E731
    return cast(hidden), cast(weight), cast(bias), targets.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [1, 4, 21, 1000, None])
@pytest.mark.parametrize("temperature,with_bias", [(1.0, False), (0.7, True), (1.3, False)])
@pytest.mark.parametrize("head_grad", [True, False], ids=["trained-head", "frozen-head"])
def test_values_and_grads_float32(device, chunk, temperature, with_bias, head_grad):
    """A frozen head (LoRA) takes d logp / d hidden from the forward; a trained one recomputes the logits."""
    hidden, weight, bias, targets = make_inputs(3, 7, 24, 101, seed=chunk or 0, device=device, with_bias=with_bias)
    for p in (hidden, weight, bias):
        if p is not None:
            p.requires_grad_(p is hidden or head_grad)
    logps, entropy = chunked_token_logprobs(hidden, weight, targets, temperature=temperature, bias=bias,
                                            chunk_tokens=chunk, with_entropy=True)
    assert logps.dtype == entropy.dtype == torch.float32 and logps.shape == (3, 7)
    assert not entropy.requires_grad
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    ref_logps, ref_entropy = reference(h64, w64, targets, temperature, b64)
    torch.testing.assert_close(logps.double(), ref_logps.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), rtol=1e-5, atol=1e-5)
    upstream = torch.randn(3, 7, dtype=torch.float64, device=device)             # a non-trivial dL/dlogp
    (logps.double() * upstream).sum().backward()
    (ref_logps * upstream).sum().backward()
    for ours, want in [(hidden, h64), (weight, w64), (bias, b64)]:
        if ours is not None and ours.requires_grad:
            assert ours.grad.dtype == ours.dtype
            torch.testing.assert_close(ours.grad.double(), want.grad, rtol=1e-4, atol=1e-5)


def test_frozen_head_gets_no_grad_and_entropy_optional():
    hidden, weight, _, targets = make_inputs(2, 5, 16, 37, seed=1)
    hidden.requires_grad_(True)
    logps, entropy = chunked_token_logprobs(hidden, weight, targets, chunk_tokens=3)
    assert entropy is None
    logps.sum().backward()
    assert hidden.grad is not None and weight.grad is None
    ref_logps, _ = reference(hidden.detach(), weight, targets)
    torch.testing.assert_close(logps.double(), ref_logps, rtol=1e-5, atol=1e-5)


def test_frozen_head_backward_twice():
    """The kept d logp / d hidden is scaled into a new tensor: a second backward (retain_graph) gets the same."""
    hidden, weight, _, targets = make_inputs(2, 5, 16, 37, seed=7)
    hidden.requires_grad_(True)
    logps, _ = chunked_token_logprobs(hidden, weight, targets, chunk_tokens=4)
    upstream = torch.randn(2, 5)
    first, = torch.autograd.grad(logps, hidden, upstream, retain_graph=True)
    second, = torch.autograd.grad(logps, hidden, upstream)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_padding_targets_and_noncontiguous_hidden():
    hidden, weight, _, targets = make_inputs(2, 6, 8, 19, seed=2)
    targets[:, -2:] = -100                                                       # padding labels
    full = torch.randn(2, 7, 8)
    full[:, :-1] = hidden
    logps, _ = chunked_token_logprobs(full[:, :-1], weight, targets, chunk_tokens=5)
    ref_logps, _ = reference(hidden, weight, targets.clamp(min=0))
    torch.testing.assert_close(logps.double(), ref_logps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(device, dtype):
    """bf16/fp16 in: the matmul rounds logits to the input dtype (as the engine does), so compare tightly
    with a reference that rounds the same way, and loosely with the exact float64 one."""
    hidden, weight, _, targets = make_inputs(4, 9, 32, 203, seed=3, dtype=dtype, device=device)
    hidden.requires_grad_(True)
    logps, entropy = chunked_token_logprobs(hidden, weight, targets, temperature=0.8, chunk_tokens=7,
                                            with_entropy=True)
    assert logps.dtype == torch.float32
    rounded = (hidden.detach() @ weight.T).double() / 0.8                        # [N, T, V]
    want = torch.log_softmax(rounded, -1).gather(-1, targets[..., None]).squeeze(-1)
    # cuBLAS may round differently for another row count (one low-precision ulp of a logit ~ 8)
    tight = 1e-5 if device == "cpu" else 4e-2
    torch.testing.assert_close(logps.double(), want, rtol=0, atol=tight)
    h64 = hidden.detach().double().requires_grad_()
    exact, exact_entropy = reference(h64, weight, targets, 0.8)
    torch.testing.assert_close(logps.double(), exact.detach(), rtol=0, atol=5e-2)
    torch.testing.assert_close(entropy.double(), exact_entropy.detach(), rtol=0, atol=5e-2)
    logps.sum().backward()
    exact.sum().backward()
    assert hidden.grad.dtype == dtype
    err = (hidden.grad.double() - h64.grad).abs().max() / h64.grad.abs().max()
    assert err < 2e-2, err


def test_matches_trl_chunked_kernel():
    """Same numbers as TRL's own ChunkedLogProbFunction (its torch path; vocab tiles, online logsumexp)."""
    chunked_logprob = pytest.importorskip("trl.kernels.chunked_logprob", reason="TRL (dev dependency) missing")
    hidden, weight, bias, targets = make_inputs(3, 7, 24, 101, seed=4, with_bias=True)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    ours, ours_entropy = chunked_token_logprobs(h1, weight, targets, temperature=0.6, bias=bias,
                                                chunk_tokens=5, with_entropy=True)
    theirs, theirs_entropy, *_ = chunked_logprob.ChunkedLogProbFunction.apply(
        h2.reshape(21, 24), weight, bias, targets.reshape(21), 0.6, 32, None, 1.0, ("entropy",))
    torch.testing.assert_close(ours.reshape(21), theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_entropy.reshape(21), theirs_entropy, rtol=1e-5, atol=1e-5)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_default_chunk():
    assert default_chunk_tokens(151936) == 64 * 2**20 // (4 * 151936) == 110
    assert default_chunk_tokens(151936, 2) == 220  # bf16 logits alone (the in-place kernel)
    assert default_chunk_tokens(10**12) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,with_entropy", [(1.0, True), (0.7, False), (1.3, True)])
def test_in_place_kernel_matches_the_eager_chunk(dtype, temperature, with_entropy):
    """logprob_kernels' kernel (the interpreter here) against chunk_forward_and_dlogits on fresh logits, a
    vocabulary that is not a multiple of the kernel's block, targets at both ends; it overwrites the logits."""
    gen = torch.Generator().manual_seed(int(temperature * 10) + with_entropy)
    C, V = 9, 1001
    logits = (torch.randn(C, V, generator=gen) * 4).to(dtype)                   # [C, V]
    logits[2, 17] = 30.0  # one row nearly one-hot
    targets = torch.randint(0, V, (C,), generator=gen)
    targets[0], targets[1], targets[2] = 0, V - 1, 17
    logits, targets = logits.to(KERNEL_DEVICE), targets.to(KERNEL_DEVICE)
    want_logp, want_entropy, want_dz = chunk_forward_and_dlogits(logits, targets, temperature, with_entropy, dtype)
    buffer = logits.clone()
    logp, entropy = logprob_kernels.logp_and_dlogits_(buffer, targets, temperature, with_entropy, block_v=256)
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    assert (entropy is None) == (not with_entropy)
    if with_entropy:  # row 2's entropy (~1e-4) is lse (~23) minus a sum: a few float32 roundings of 23
        torch.testing.assert_close(entropy, want_entropy, rtol=1e-5, atol=3e-5)
    assert buffer.dtype == dtype
    # d logp / d logits: float32 within a few units (the GPU's exp, at p near 1); bf16 by one rounding at most
    tol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(buffer, want_dz, **tol)


def test_in_place_kernel_rejects_strided_rows():
    with pytest.raises(ValueError, match="contiguous rows"):
        logprob_kernels.logp_and_dlogits_(torch.zeros(4, 6, device=KERNEL_DEVICE).t(),
                                          torch.zeros(6, dtype=torch.long, device=KERNEL_DEVICE), 1.0, False)


@pytest.mark.parametrize("chunk", [5, None])
def test_frozen_head_in_place_path(chunk, monkeypatch):
    """fused=True with a frozen head takes the in-place kernel (the interpreter here): values and d/dhidden
    as the float64 reference, and per chunk the logits are the only [C, V] tensor an op makes."""
    n, t, h, v = 3, 7, 24, 101
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 4 * 4 * v)  # the default: 4 float32 tokens a chunk
    hidden, weight, bias, targets = make_inputs(n, t, h, v, seed=11, with_bias=True, device=KERNEL_DEVICE)
    hidden.requires_grad_(True)
    sizes = []

    class Outputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.overloadpacket.__name__.endswith("_"):  # in-place ops (the interpreter's set_, copy_)
                sizes.extend(x.numel() for x in (out if isinstance(out, (tuple, list)) else [out])
                             if isinstance(x, torch.Tensor))
            return out

    with Outputs():
        logps, entropy = chunked_token_logprobs(hidden, weight, targets, temperature=0.7, bias=bias,
                                                chunk_tokens=chunk, with_entropy=True, fused=True)
    made = chunk or 4
    full_chunks = n * t // made
    assert full_chunks >= 4 and sizes.count(made * v) == full_chunks  # the logits; their gradient written over them
    assert max(sizes) <= max(made * v, v * h, n * t * h)  # (the weight's transpose, d logp / d hidden)
    h64 = hidden.detach().double().requires_grad_()
    ref_logps, ref_entropy = reference(h64, weight.double(), targets, 0.7, bias.double())
    torch.testing.assert_close(logps.double(), ref_logps.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), rtol=1e-5, atol=1e-5)
    upstream = torch.randn(n, t, dtype=torch.float64, device=KERNEL_DEVICE)
    (logps.double() * upstream).sum().backward()
    (ref_logps * upstream).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)


class LargestOutput(TorchDispatchMode):
    """Records the largest output (in elements) of every aten op run under it, with the op's name."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = (0, None), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), str(func))
        return out


@pytest.mark.parametrize("weight_grad", [False, True])
def test_never_materialises_full_logits(weight_grad):
    """N*T = 64 tokens, V = 50, chunk 16: no op output (forward or backward) and no tensor saved for
    backward exceeds 16 * 50 elements, while full logits would be 64 * 50 (hidden is 64 * 8, weight
    50 * 8, both under the bound)."""
    n, t, h, v, chunk = 4, 16, 8, 50, 16
    hidden, weight, _, targets = make_inputs(n, t, h, v, seed=5)
    hidden.requires_grad_(True)
    weight.requires_grad_(weight_grad)
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    mode = LargestOutput()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), mode:
        logps, entropy = chunked_token_logprobs(hidden, weight, targets, chunk_tokens=chunk, with_entropy=True)
        forward_ops = len(mode.ops)
        (logps * torch.linspace(-1, 1, n * t).view(n, t)).sum().backward()
    # a trained head recomputes the logits in backward; a frozen one made d logp / d hidden in forward
    products = mode.ops[forward_ops:] if weight_grad else mode.ops[:forward_ops]
    assert products.count("aten.mm.default") >= n * t // chunk
    assert mode.ops[forward_ops:].count("aten.mul.out") == (0 if weight_grad else 1)    # backward was seen
    assert mode.largest[0] <= chunk * v, mode.largest
    assert saved and max(saved) <= max(n * t * h, v * h), saved
    assert hidden.grad is not None and (weight.grad is not None) == weight_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused (torch.compile) path is for CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_fused_matches_eager_cuda(dtype, weight_grad):
    hidden, weight, bias, targets = make_inputs(5, 13, 64, 1001, seed=6, dtype=dtype, device="cuda",
                                                with_bias=True)
    results = []
    for fused in (False, True):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(weight_grad)
        logps, entropy = chunked_token_logprobs(h, w, targets, temperature=0.7, bias=bias, chunk_tokens=17,
                                                with_entropy=True, fused=fused)
        (logps * torch.linspace(-1, 1, 65, device="cuda").view(5, 13)).sum().backward()
        results.append((logps, entropy, h.grad, w.grad))
    for eager, fused in zip(*results):
        if eager is not None:
            # gradients in bf16 may differ by one rounding (the kernels sum in another order)
            tol = dict(rtol=1e-5, atol=1e-5) if fused.dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-4)
            torch.testing.assert_close(fused, eager, **tol)

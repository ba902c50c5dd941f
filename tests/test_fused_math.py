"""models/fused_math.py: the written-out backwards against autograd on fresh random inputs (CPU), and on
CUDA the compiled kernels against the same functions run op by op."""
import pytest
import torch
import torch.nn.functional as F

from ahazero.models import fused_math


def swiglu_backward_copies(grad, gate, up):
    """A call of the in-place `swiglu_backward_` on copies of gate and up: (dL/dgate, dL/dup)."""
    def call():
        grad_gate, grad_up = gate.clone(), up.clone()
        fused_math.swiglu_backward_(grad, grad_gate, grad_up)
        return grad_gate, grad_up
    return call


def test_swiglu_backward_is_autograds():
    g = torch.Generator().manual_seed(3)
    gate, up, grad = (torch.randn(7, 33, generator=g, dtype=torch.float64) for _ in range(3))
    gate.requires_grad_(True), up.requires_grad_(True)
    (F.silu(gate) * up).backward(grad)
    got_gate, got_up = swiglu_backward_copies(grad, gate.detach(), up.detach())()
    torch.testing.assert_close(got_gate, gate.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_up, up.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fused_math.swiglu(gate, up), F.silu(gate) * up)


def test_rms_norm_backward_is_autograds():
    g = torch.Generator().manual_seed(4)
    x, grad = torch.randn(6, 40, generator=g).mul(3), torch.randn(6, 40, generator=g)  # float32: the norm's
    w = torch.randn(40, generator=g)  # own precision
    x.requires_grad_(True), w.requires_grad_(True)
    y, inv_rms = fused_math.rms_norm_forward(x, w, 1e-6)
    y.backward(grad)  # autograd through the forward's ops
    got_x, got_w = fused_math.rms_norm_backward(x.detach(), w.detach(), inv_rms.detach(), grad)
    torch.testing.assert_close(got_x, x.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_w, w.grad, atol=1e-6, rtol=1e-5)
    frozen_x, frozen_w = fused_math.rms_norm_backward(x.detach(), w.detach(), inv_rms.detach(), grad, False)
    assert frozen_w is None and torch.equal(frozen_x, got_x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels run on CUDA")
def test_compiled_kernels_are_as_accurate_as_the_functions_op_by_op(monkeypatch):
    """Against the same math in float64 from the same bf16 inputs, the compiled kernels' error is at most
    twice that of the functions run op by op (Inductor keeps products in float32 that eager rounds to bf16:
    the weight gradient, a sum over 1,000 rows, is more accurate compiled)."""
    g = torch.Generator(device="cuda").manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(torch.bfloat16)

    x, grad, w = randn(1000, 256).mul(3), randn(1000, 256), randn(256)
    gate, up, grad_h = randn(700, 512), randn(700, 512), randn(700, 512)
    inv_rms = fused_math.rms_norm_forward(x, w, 1e-6)[1]
    calls = [lambda: fused_math.rms_norm_forward(x, w, 1e-6),
             lambda: fused_math.rms_norm_backward(x, w, inv_rms, grad),
             lambda: (fused_math.swiglu(gate, up),), swiglu_backward_copies(grad_h, gate, up)]
    x64, grad64, w64, inv64 = x.double(), grad.double(), w.double(), inv_rms.double()
    normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    sig = torch.sigmoid(gate.double())
    grad_normed = grad64 * w64
    exact = [(w64 * normed, torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)),
             (inv64 * (grad_normed - x64 * inv64 * (grad_normed * x64 * inv64).mean(-1, keepdim=True)),
              (grad64 * x64 * inv64).sum(0)),
             (gate.double() * sig * up.double(),),
             (grad_h.double() * up.double() * sig * (1 + gate.double() * (1 - sig)), grad_h.double() * gate.double() * sig)]
    compiled = [call() for call in calls]
    monkeypatch.setattr(fused_math, "COMPILE", False)
    for call, got, want in zip(calls, compiled, exact):
        for a, b, ref in zip(got, call(), want):
            assert a.dtype == b.dtype and a.shape == b.shape
            error_compiled, error_eager = ((t.double() - ref).abs().max().item() for t in (a, b))
            assert error_compiled <= 2 * error_eager + 1e-6 * ref.abs().max().item(), (error_compiled, error_eager)

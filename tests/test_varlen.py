"""The varlen attention of packed forwards (models/varlen.py) against dense masked attention written here."""
import pytest
import torch

import tiny
from ahazero.models import varlen
from ahazero.models.varlen import batched_attention, cu_seqlens_from_positions, packed_attention


def dense_reference(q, k, v, lengths, scale):
    """Block-diagonal causal attention as one explicit [S, S] mask, float64. q [S, Hq, D], k/v [S, Hkv, D]."""
    S, Hq, D = q.shape
    k, v = (t.repeat_interleave(Hq // t.shape[1], dim=1) for t in (k, v))
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # [S] sequence of each token
    allowed = (seq[:, None] == seq[None, :]) & torch.ones(S, S, dtype=torch.bool).tril()  # [S, S]
    scores = torch.einsum("shd,thd->hst", q.double(), k.double()) * scale  # [H, S, S]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hst,thd->shd", probs, v.double())  # [S, H, D]


def test_cu_seqlens_from_positions():
    cu, longest = cu_seqlens_from_positions(torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3]]))
    assert cu.tolist() == [0, 3, 4, 8] and cu.dtype == torch.int32 and longest == 4
    with pytest.raises(ValueError, match="restart at 0"):
        cu_seqlens_from_positions(torch.tensor([[1, 2, 0]]))


@pytest.mark.parametrize("lengths", [[5], [1, 7, 3], [4, 1, 1, 9]])
def test_attention_function_matches_dense_masked_attention(lengths):
    torch.manual_seed(len(lengths))
    S, Hq, Hkv, D = sum(lengths), 4, 2, 8
    q, k, v = torch.randn(1, Hq, S, D), torch.randn(1, Hkv, S, D), torch.randn(1, Hkv, S, D)  # transformers' layout
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # [1, S]
    out, weights = varlen.varlen_attention_forward(None, q, k, v, None, scaling=0.3, position_ids=positions)
    assert weights is None and out.shape == (1, S, Hq, D)
    want = dense_reference(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), lengths, 0.3)
    torch.testing.assert_close(out[0].double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="sliding window"):
        varlen.varlen_attention_forward(None, q, k, v, None, position_ids=positions, sliding_window=max(lengths) - 1)


def test_one_sequence_runs_causal_sdpa_with_the_dense_gradients(monkeypatch):
    """A packed row of one sequence goes to SDPA with is_causal (not the varlen or batched path), with
    grouped-query K/V as they are; its output and gradients equal the dense masked reference's."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(varlen.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(kw) or sdpa(*a, **kw))
    monkeypatch.setattr(varlen, "batched_attention", None)  # must not be reached
    torch.manual_seed(3)
    S, Hq, Hkv, D = 11, 6, 2, 8
    q, k, v = (torch.randn(1, h, S, D, dtype=torch.float64, requires_grad=True) for h in (Hq, Hkv, Hkv))
    out, _ = varlen.varlen_attention_forward(None, q, k, v, None, scaling=0.4, position_ids=torch.arange(S)[None])
    assert out.shape == (1, S, Hq, D) and len(calls) == 1 and calls[0]["is_causal"]
    assert calls[0].get("enable_gqa", False) == (torch.__version__ >= "2.5")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
    want_out = dense_reference(qd[0].transpose(0, 1), kd[0].transpose(0, 1), vd[0].transpose(0, 1), [S], 0.4)
    want = torch.autograd.grad(want_out, (qd, kd, vd), grad[0])
    torch.testing.assert_close(out[0], want_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_packed_forward_runs_varlen_and_equals_each_sequence_alone(arch, monkeypatch):
    calls, found = [], []
    monkeypatch.setattr(varlen, "batched_attention", lambda *a: calls.append(1) or batched_attention(*a))
    monkeypatch.setattr(varlen, "cu_seqlens_from_positions",
                        lambda p, f=cu_seqlens_from_positions: found.append(1) or f(p))
    model = tiny.tiny_model(arch, initializer_range=0.3)
    a, b = torch.tensor([[17, 901, 523, 777, 42, 12]]), torch.tensor([[314, 592, 658]])
    with torch.no_grad():
        alone = [model.model(input_ids=x).last_hidden_state for x in (a, b)]
        with packed_attention(model.model):
            packed = model.model(input_ids=torch.cat([a, b], 1), position_ids=torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2]]),
                                 use_cache=False).last_hidden_state
    assert len(calls) == model.config.num_hidden_layers  # our attention ran in every layer
    assert len(found) == 1  # the sequences were found once for the forward, not per layer
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(packed[:, :6], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 6:], alone[1], atol=1e-5, rtol=1e-5)

"""The engine's sampler: filters against a plain-loop reference, and the distribution it samples from."""
import math

import pytest
import torch

from ahazero.engine.hf_generate import filter_logits
from ahazero.engine.sampler import sample
from ahazero.engine.types import SamplingParams


def reference_keep(row: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """The tokens filter_logits keeps, one row, in plain Python: top-k, then min-p, then top-p."""
    keep = set(range(len(row)))
    if 0 < top_k < len(row):
        kth = sorted(row, reverse=True)[top_k - 1]
        keep = {i for i in keep if row[i] >= kth}
    probs = _softmax(row, keep)
    if min_p > 0:
        floor = min_p * max(probs.values())
        keep = {i for i in keep if probs[i] >= floor}
        probs = _softmax(row, keep)
    if top_p < 1:
        total, kept = 0.0, set()
        for i in sorted(keep, key=lambda i: -row[i]):
            if total >= top_p:
                break
            kept.add(i)
            total += probs[i]
        keep = kept
    return keep


def _softmax(row, keep):
    top = max(row[i] for i in keep)
    z = sum(math.exp(row[i] - top) for i in keep)
    return {i: math.exp(row[i] - top) / z for i in keep}


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0.0), (-1, 0.7, 0.0), (-1, 1.0, 0.1), (8, 0.9, 0.02),
                                               (1, 1.0, 0.0), (-1, 0.05, 0.0), (40, 0.95, 0.3)])
def test_filter_logits_matches_reference(top_k, top_p, min_p):
    torch.manual_seed(0)
    logits = torch.randn(6, 37, dtype=torch.float64) * 2  # [B, V], no ties
    kept = torch.isfinite(filter_logits(logits, top_k, top_p, min_p))  # [B, V]
    for b in range(logits.shape[0]):
        expected = reference_keep(logits[b].tolist(), top_k, top_p, min_p)
        assert set(kept[b].nonzero().flatten().tolist()) == expected


def test_sampler_draws_from_the_filtered_distribution():
    torch.manual_seed(1)
    V, draws, T = 12, 60000, 0.8
    row = torch.randn(V) * 1.5  # [V]
    params = SamplingParams(temperature=T, top_k=8, top_p=0.9, min_p=0.05)
    keep = reference_keep((row / T).tolist(), params.top_k, params.top_p, params.min_p)
    mask = torch.tensor([i in keep for i in range(V)])
    expected = torch.softmax((row / T).masked_fill(~mask, float("-inf")), -1)  # [V]
    gen = torch.Generator().manual_seed(0)
    tokens, logprobs = sample(row.expand(draws, V).clone(), params, gen)  # [N], [N]
    freq = torch.bincount(tokens, minlength=V).double() / draws
    assert set(tokens.unique().tolist()) <= keep
    assert (freq - expected).abs().max() < 0.01
    torch.testing.assert_close(logprobs, torch.log_softmax(row / T, -1)[tokens])  # before filtering


def test_sampler_without_filters_and_greedy():
    torch.manual_seed(2)
    V, draws = 9, 60000
    row = torch.randn(V)
    tokens, _ = sample(row.expand(draws, V).clone(), SamplingParams(temperature=1.3), torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=V).double() / draws
    assert (freq - torch.softmax(row / 1.3, -1)).abs().max() < 0.01
    logits = torch.randn(4, V)
    tokens, logprobs = sample(logits, SamplingParams(temperature=0))
    assert tokens.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1))


def test_seeded_generator_reproduces():
    logits = torch.randn(16, 50)
    params = SamplingParams(temperature=1.0, top_p=0.8)
    a = sample(logits, params, torch.Generator().manual_seed(5))[0]
    b = sample(logits, params, torch.Generator().manual_seed(5))[0]
    c = sample(logits, params, torch.Generator().manual_seed(6))[0]
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


@pytest.mark.slow
def test_compiled_sampler_matches_eager():
    """The CUDA path compiles the unfiltered cores (inductor); same draws from the same seed."""
    from ahazero.engine.sampler import Sampler
    torch.manual_seed(3)
    logits = torch.randn(5, 300) * 3  # [B, V]
    compiled = Sampler(compile=True)
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.7), SamplingParams(temperature=1.0)):
        want = sample(logits, params, torch.Generator().manual_seed(9))
        got = compiled(logits, params, torch.Generator().manual_seed(9))
        assert got[0].tolist() == want[0].tolist()
        torch.testing.assert_close(got[1], want[1])
    assert compiled.compiled

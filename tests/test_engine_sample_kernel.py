"""engine/sample_kernels.py: unfiltered sampling and its log-prob in one pass, against torch's math;
on a CPU through Triton's interpreter (skipped where triton is not installed)."""
import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from ahazero.engine import sample_kernels
from ahazero.engine.sampler import Sampler
from ahazero.engine.types import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("V,min_v", [(300, 4096), (5000, 1024)])  # one split; five, combined in order
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_the_first_argmax_with_its_log_prob(V, min_v, dtype):
    torch.manual_seed(V)
    logits = (torch.randn(5, V, device=DEVICE) * 3).to(dtype)  # [B, V]
    logits[1, [7, V - 3]] = logits[1].max() + 1  # a tie across splits: the first index wins, as torch.argmax
    tokens, logprobs = sample_kernels.sample_unfiltered(logits, 0.0, 0, min_v_per_split=min_v)
    assert tokens.tolist() == logits.float().argmax(-1).tolist()
    want = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_draws_follow_the_tempered_softmax():
    torch.manual_seed(1)
    V, draws, T = 300, 1200, 0.7
    row = torch.randn(V, device=DEVICE)
    row[:4] = torch.tensor([6.0, 5.5, 5.0, 4.0])  # most of the mass on four tokens, the rest spread thin
    tokens, logprobs = sample_kernels.sample_unfiltered(row.expand(draws, V).contiguous(), T, 123)  # a draw a row
    p = torch.softmax(row / T, -1)
    freq = torch.bincount(tokens, minlength=V).double() / draws
    assert (freq[:4] - p[:4].double()).abs().max() < 0.05  # 3.5 sigma at 1,200 draws
    assert abs(freq[4:].sum() - p[4:].sum()) < 0.05
    torch.testing.assert_close(logprobs, torch.log_softmax(row / T, -1)[tokens], atol=1e-5, rtol=1e-5)


def test_the_seed_decides_the_draws():
    logits = torch.randn(16, 50, device=DEVICE)
    a = sample_kernels.sample_unfiltered(logits, 1.0, 5)[0]
    b = sample_kernels.sample_unfiltered(logits, 1.0, 5)[0]
    c = sample_kernels.sample_unfiltered(logits, 1.0, 6)[0]
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_the_draws_do_not_depend_on_the_split_of_the_vocabulary():
    """Each column's noise comes from its own Philox counter: one split or several, the same tokens (a batch
    size's split must not change what a seed draws). V not a multiple of 4: the last counter of a row is partial."""
    logits = torch.randn(6, 3001, device=DEVICE)
    whole = sample_kernels.sample_unfiltered(logits, 1.0, 11, min_v_per_split=4096)  # one split
    split = sample_kernels.sample_unfiltered(logits, 1.0, 11, min_v_per_split=1)  # splits of BLOCK_V
    assert whole[0].tolist() == split[0].tolist()
    torch.testing.assert_close(whole[1], split[1])


def test_the_sampler_takes_the_kernel_for_unfiltered_params_only():
    logits = torch.randn(3, 40, device=DEVICE)
    kernel = Sampler(kernel=True)
    seeded = [kernel(logits, SamplingParams(temperature=0.9), torch.Generator().manual_seed(4))[0].tolist()
              for _ in range(2)]
    assert seeded[0] == seeded[1]  # a CPU generator seeds it
    assert kernel(logits, SamplingParams(temperature=0))[0].tolist() == logits.argmax(-1).tolist()
    filtered = SamplingParams(temperature=0.9, top_k=1)  # top-k 1: the argmax, through the torch path
    assert kernel(logits, filtered, torch.Generator().manual_seed(4))[0].tolist() == logits.argmax(-1).tolist()


def test_a_failing_sampling_kernel_falls_back_to_torch(monkeypatch, caplog):
    logits = torch.randn(4, 30, device=DEVICE)
    sample_kernels.checked.cache_clear()

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(sample_kernels, "sample_unfiltered", broken)
    try:
        with caplog.at_level("WARNING", logger="ahazero"):
            tokens, logprobs = Sampler(kernel=True)(logits, SamplingParams(temperature=0))
        assert tokens.tolist() == logits.argmax(-1).tolist()  # the torch path's greedy
        assert "sampling takes the torch path" in caplog.text
    finally:
        sample_kernels.checked.cache_clear()

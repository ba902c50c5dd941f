"""GRPO loss: against a per-token loop (float64 scalars), against TRL's `_compute_loss`, and the
invariance of the loss and its gradient under accumulation steps and row chunks."""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from ahazero.grpo.loss import LOSS_TYPES, aggregate_loss, kl_k3, loss_normalizers, per_token_loss

LEVELS = ("token", "sequence")
MAX_LEN = 11


def make_batch(n, t, seed, dtype=torch.float64):
    """Random logps around old_logps (some ratios clipped), advantages of both signs, masks of every
    length (an empty row, a full row) and a hole (a masked tool-output token)."""
    gen = torch.Generator().manual_seed(seed)
    logps = -3 * torch.rand(n, t, generator=gen, dtype=dtype)                          # [N, T]
    old = logps + 0.3 * torch.randn(n, t, generator=gen, dtype=dtype)                  # [N, T]
    ref = logps + 0.5 * torch.randn(n, t, generator=gen, dtype=dtype)                  # [N, T]
    adv = torch.randn(n, generator=gen, dtype=dtype)                                   # [N]
    lengths = torch.randint(0, t + 1, (n,), generator=gen)
    lengths[0], lengths[-1] = 0, t
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()                       # [N, T]
    mask[-1, t // 2] = 0
    return logps, old, ref, adv, mask


def loop_reference(logps, old, ref, adv, mask, *, level, epsilon_low, epsilon_high, beta, delta=None):
    """Per sequence, per token, on 0-d float64 tensors (so autograd gives the reference gradient).
    Returns per-token losses (lists, None where masked) and the clip counts."""
    n, t = mask.shape
    losses, clip = [], {"clip_low": 0.0, "clip_high": 0.0, "clip_region": 0.0, "clip_total": 0.0}
    for i in range(n):
        toks = [j for j in range(t) if mask[i, j] > 0]
        seq_ratio = None
        if level == "sequence":
            seq_ratio = torch.exp(sum((logps[i, j] - old[i, j] for j in toks), torch.tensor(0.0, dtype=logps.dtype))
                                  / max(len(toks), 1))
            clip["clip_total"] += 1
        row = []
        for j in range(t):
            if j not in toks:
                row.append(None)
                continue
            r = torch.exp(logps[i, j] - old[i, j]) if seq_ratio is None else seq_ratio
            clipped = max(min(r, 1 + epsilon_high), 1 - epsilon_low)
            r_capped = r if delta is None else min(r, delta)
            a = adv[i]
            loss = -min(r_capped * a, clipped * a)
            if beta:
                d = ref[i, j] - logps[i, j]
                loss = loss + beta * (torch.exp(d) - d - 1)
            row.append(loss)
            if seq_ratio is None or j == toks[0]:   # sequences counted once (an empty one has ratio 1: unclipped)
                low = bool(r_capped < 1 - epsilon_low and a < 0)
                high = bool(r_capped > 1 + epsilon_high and a > 0)
                clip["clip_low"] += low
                clip["clip_high"] += high
                clip["clip_region"] += low or high
                clip["clip_total"] += seq_ratio is None
        losses.append(row)
    return losses, clip


def loop_aggregate(losses, loss_type, *, num_steps, total_tokens):
    """TRL's loss for one micro-batch, divided by the number of accumulation steps."""
    n = len(losses)
    tokens = sum(x is not None for row in losses for x in row)
    token_sum = sum((x for row in losses for x in row if x is not None), torch.tensor(0.0, dtype=torch.float64))
    if loss_type == "grpo":
        seq_means = [sum((x for x in row if x is not None), torch.tensor(0.0, dtype=torch.float64))
                     / max(sum(x is not None for x in row), 1) for row in losses]
        return sum(seq_means) / n / num_steps
    if loss_type == "bnpo":
        return token_sum / max(tokens, 1) / num_steps
    if loss_type == "dr_grpo":
        return token_sum / (n * MAX_LEN) / num_steps
    return token_sum / max(total_tokens, 1)                         # dapo


CASES = [dict(epsilon_low=0.2, epsilon_high=0.2, beta=0.0), dict(epsilon_low=0.2, epsilon_high=0.28, beta=0.04),
         dict(epsilon_low=0.1, epsilon_high=0.3, beta=0.5)]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"lo{c['epsilon_low']}-hi{c['epsilon_high']}-b{c['beta']}")
def test_per_token_loss_matches_loop(level, case):
    for seed in range(2):
        logps, old, ref, adv, mask = make_batch(6, 7, seed)
        logps.requires_grad_(True)
        loss, stats = per_token_loss(logps, old, adv, mask, importance_sampling_level=level,
                                     ref_logps=ref, **case)
        ref_losses, ref_clip = loop_reference(logps, old, ref, adv, mask, level=level, **case)
        assert loss.shape == mask.shape
        for i, row in enumerate(ref_losses):
            for j, x in enumerate(row):
                if x is not None:
                    assert loss[i, j].item() == pytest.approx(x.item(), rel=1e-12, abs=1e-12)
        for key, value in ref_clip.items():
            assert stats[key].item() == value, key
        assert stats["tokens"].item() == mask.sum().item()
        assert stats["kl"].item() == pytest.approx((kl_k3(logps, ref) * mask).sum().item(), rel=1e-12)
        assert not any(v.requires_grad for v in stats.values())
        # aggregated loss and its gradient, every loss type
        for loss_type in LOSS_TYPES:
            norm = loss_normalizers(loss_type, [mask], MAX_LEN)
            ours = aggregate_loss(loss, mask, loss_type, norm[0])
            want = loop_aggregate(ref_losses, loss_type, num_steps=1, total_tokens=int(mask.sum()))
            (g_ours,) = torch.autograd.grad(ours, logps, retain_graph=True)
            (g_want,) = torch.autograd.grad(want, logps, retain_graph=True, allow_unused=True)
            assert ours.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-14)
            torch.testing.assert_close(g_ours, g_want, rtol=1e-10, atol=1e-12)


def test_kl_k3_loop():
    logps, _, ref, _, _ = make_batch(3, 5, 0)
    kl = kl_k3(logps, ref)
    for i in range(3):
        for j in range(5):
            d = ref[i, j].item() - logps[i, j].item()
            assert kl[i, j].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-12)
    assert (kl >= 0).all()


def test_delta_and_on_policy():
    logps, old, ref, adv, mask = make_batch(5, 6, 3)
    loss, _ = per_token_loss(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.2, delta=1.05)
    ref_losses, _ = loop_reference(logps, old, ref, adv, mask, level="token", epsilon_low=0.2, epsilon_high=0.2,
                                   beta=0.0, delta=1.05)
    for i, row in enumerate(ref_losses):
        for j, x in enumerate(row):
            if x is not None:
                assert loss[i, j].item() == pytest.approx(x.item(), rel=1e-12)
    # old_logps None: ratio 1, loss -A, gradient -A per token (the plain policy gradient)
    lp = logps.clone().requires_grad_(True)
    loss, stats = per_token_loss(lp, None, adv, mask, epsilon_low=0.2, epsilon_high=0.2)
    torch.testing.assert_close(loss.detach(), (-adv[:, None]).expand_as(mask))
    (loss * mask).sum().backward()
    torch.testing.assert_close(lp.grad, -adv[:, None] * mask)
    assert stats["clip_region"] == 0


def test_errors():
    logps, old, ref, adv, mask = make_batch(2, 3, 0)
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        loss_normalizers("ppo", [mask], 4)
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        aggregate_loss(logps, mask, "gspo", 1.0)
    with pytest.raises(ValueError, match="token, sequence"):
        per_token_loss(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.2, importance_sampling_level="seq")
    with pytest.raises(ValueError, match="ref_logps"):
        per_token_loss(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.2, beta=0.1)


# ---------------------------------------------------------------- accumulation and chunking

def chunked_total(logps, old, ref, adv, steps, chunks, loss_type, level, case):
    """Sum of aggregate_loss over every row chunk of every accumulation step (what the trainer does)."""
    step_masks = [m for (_, m) in steps]
    norms = loss_normalizers(loss_type, step_masks, MAX_LEN)
    total = 0.0
    for (rows, m), norm in zip(steps, norms):
        for c in chunks(len(rows)):
            r = rows[c]
            loss, _ = per_token_loss(logps[r], old[r], adv[r], m[c], importance_sampling_level=level,
                                     ref_logps=ref[r], **case)
            total = total + aggregate_loss(loss, m[c], loss_type, norm)
    return total


def split_steps(mask, sizes):
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return [(torch.arange(s, s + z), mask[s:s + z]) for s, z in zip(starts, sizes)]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", LEVELS)
def test_accumulation_and_chunking_invariance(loss_type, level):
    case = CASES[1]
    logps, old, ref, adv, mask = make_batch(12, 9, 7)
    logps.requires_grad_(True)
    steps = split_steps(mask, [4, 4, 4])
    one_shot_chunks = lambda n: [slice(0, n)]                                    # noqa: E731
    odd_chunks = lambda n: [slice(0, 1), slice(1, n - 1), slice(n - 1, n)]       # noqa: E731
    single_rows = lambda n: [slice(i, i + 1) for i in range(n)]                  # noqa: E731
    # the reference: the loop's TRL-style loss per micro-batch, summed over micro-batches
    want = 0.0
    for rows, m in steps:
        losses, _ = loop_reference(logps[rows], old[rows], ref[rows], adv[rows], m, level=level, **case)
        want = want + loop_aggregate(losses, loss_type, num_steps=len(steps), total_tokens=int(mask.sum()))
    (g_want,) = torch.autograd.grad(want, logps)
    for chunks in (one_shot_chunks, odd_chunks, single_rows):
        got = chunked_total(logps, old, ref, adv, steps, chunks, loss_type, level, case)
        (g_got,) = torch.autograd.grad(got, logps)
        assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-14)
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dapo_and_grpo_steps_of_unequal_size(loss_type):
    """With unequal accumulation steps the per-step normalisers differ; still one full-batch loss for
    dapo (one global token mean) and the per-step means for the others."""
    logps, old, ref, adv, mask = make_batch(10, 6, 11)
    steps = split_steps(mask, [3, 7])
    got = chunked_total(logps, old, ref, adv, steps, lambda n: [slice(0, 1), slice(1, n)], loss_type,
                        "token", CASES[0])
    want = 0.0
    for rows, m in steps:
        losses, _ = loop_reference(logps[rows], old[rows], ref[rows], adv[rows], m, level="token", **CASES[0])
        want = want + loop_aggregate(losses, loss_type, num_steps=2, total_tokens=int(mask.sum()))
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


# ---------------------------------------------------------------- against TRL itself

class _Accelerator:
    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


class _TRLStandIn:
    """The attributes `GRPOTrainer._compute_loss` (TRL 1.16) reads, with a policy that returns given logps.
    Everything optional (vLLM correction, entropy masking/bonus, off-policy masks, aux loss) is off."""

    def __init__(self, logps, *, loss_type, level, eps_low, eps_high, beta, num_steps, delta=None,
                 bias_kl=False, tis=False):
        self._logps = logps
        self.loss_type, self.importance_sampling_level = loss_type, level
        self.epsilon_low, self.epsilon_high, self.beta = eps_low, eps_high, beta
        self.max_completion_length = MAX_LEN
        self.current_gradient_accumulation_steps = num_steps
        self.args = SimpleNamespace(delta=delta, use_bias_correction_kl=bias_kl, steps_per_generation=num_steps)
        self.top_entropy_quantile, self.off_policy_mask_threshold = 1.0, None
        self.use_vllm, self.vllm_importance_sampling_correction = tis, tis  # TIS: the sampler's IS ratio
        self._entropy_bonus_enabled, self.aux_loss_enabled = False, False
        self.model = SimpleNamespace(training=True)
        self.accelerator = _Accelerator()
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        return self._logps, torch.zeros_like(self._logps.detach()), None


def trl_loss(logps, old, ref, adv, mask, *, num_steps, num_items, is_ratio=None, **kw):
    from trl import GRPOTrainer
    stand_in = _TRLStandIn(logps, num_steps=num_steps, **kw)
    n, t = mask.shape
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
              "completion_ids": torch.zeros(n, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(float(num_items)), "importance_sampling_ratio": is_ratio}
    try:
        loss = GRPOTrainer._compute_loss(stand_in, None, inputs)
    except AttributeError as e:  # TRL's internals moved: the stand-in needs updating, not our loss
        pytest.skip(f"TRL's _compute_loss reads an attribute the stand-in lacks: {e}")
    return loss, stand_in._metrics["train"]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", CASES + [dict(epsilon_low=0.2, epsilon_high=0.28, beta=0.04, delta=1.1),
                                          dict(epsilon_low=0.2, epsilon_high=0.2, beta=0.1, bias_kl=True, tis=True)],
                         ids=["sym-b0", "hi-b.04", "lo-hi-b.5", "delta", "biaskl-tis"])
def test_matches_trl(loss_type, level, case):
    pytest.importorskip("trl", reason="TRL (dev dependency) not installed")
    logps, old, ref, adv, mask = make_batch(12, 9, 5, dtype=torch.float32)
    logps.requires_grad_(True)
    num_items = int(mask.sum())
    kw = dict(eps_low=case["epsilon_low"], eps_high=case["epsilon_high"], beta=case["beta"], delta=case.get("delta"),
              bias_kl=case.get("bias_kl", False), tis=case.get("tis", False))
    is_ratio = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)) * 2 if kw["tis"] else None
    steps = split_steps(mask, [6, 6])
    # TRL: one micro-batch per accumulation step, losses summed (what the optimizer sees)
    want, metrics = 0.0, defaultdict(list)
    for rows, m in steps:
        loss, step_metrics = trl_loss(logps[rows], old[rows], ref[rows], adv[rows], m, num_steps=len(steps),
                                      num_items=num_items, loss_type=loss_type, level=level,
                                      is_ratio=None if is_ratio is None else is_ratio[rows], **kw)
        want = want + loss
        for k, v in step_metrics.items():
            metrics[k] += v
    (g_want,) = torch.autograd.grad(want, logps)
    # ours: every step split into two row chunks
    step_masks = [m for _, m in steps]
    norms = loss_normalizers(loss_type, step_masks, MAX_LEN)
    got, g_got = 0.0, torch.zeros_like(logps)
    for step, ((rows, m), norm) in enumerate(zip(steps, norms)):
        sums = defaultdict(float)
        for c in (slice(0, 2), slice(2, None)):
            r = rows[c]
            lp = logps.detach()[r].clone().requires_grad_(True)
            loss, stats = per_token_loss(lp, old[r], adv[r], m[c], epsilon_low=kw["eps_low"],
                                         epsilon_high=kw["eps_high"], importance_sampling_level=level,
                                         ref_logps=ref[r], beta=kw["beta"], delta=kw["delta"],
                                         use_bias_correction_kl=kw["bias_kl"],
                                         importance_sampling_ratio=None if is_ratio is None else is_ratio[r])
            chunk_loss = aggregate_loss(loss, m[c], loss_type, norm)
            chunk_loss.backward()
            got += chunk_loss.item()
            g_got[r] += lp.grad
            for k, v in stats.items():
                sums[k] += v.item()
        # TRL logs one value per micro-batch: compare with this step's summed stats
        for ours, theirs in [("clip_low", "clip_ratio/low_mean"), ("clip_high", "clip_ratio/high_mean"),
                             ("clip_region", "clip_ratio/region_mean")]:
            assert sums[ours] / sums["clip_total"] == pytest.approx(metrics[theirs][step], abs=1e-6)
        if kw["beta"]:
            assert sums["kl"] / sums["tokens"] == pytest.approx(metrics["kl"][step], rel=1e-5)
    assert got == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)

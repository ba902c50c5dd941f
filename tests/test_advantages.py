"""group_advantages against a per-group loop in Python floats and against TRL's own formula."""
import inspect
import math
import statistics

import pytest
import torch

from ahazero.grpo.advantages import group_advantages


def loop_reference(rewards: list[float], g: int, mode: str, eps: float = 1e-4):
    """Per group: mean and unbiased std of its non-NaN rewards; NaN rewards get advantage 0."""
    def std(xs):
        return statistics.stdev(xs) if len(xs) > 1 else math.nan
    groups = [rewards[i:i + g] for i in range(0, len(rewards), g)]
    finite_all = [r for r in rewards if not math.isnan(r)]
    batch_std = std(finite_all) if len(rewards) > 1 else 0.0
    advs, group_stds = [], []
    for grp in groups:
        finite = [r for r in grp if not math.isnan(r)]
        mean = sum(finite) / len(finite) if finite else math.nan
        gstd = std(finite) if g > 1 else 0.0
        group_stds.append(gstd)
        for r in grp:
            a = r - mean
            if mode == "group":
                a = a / (gstd + eps)
            elif mode == "batch":
                a = a / (batch_std + eps)
            advs.append(0.0 if math.isnan(a) else a)
    return advs, group_stds


def random_rewards(b, g, seed, nan_frac=0.0):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(b * g, generator=gen, dtype=torch.float64)
    r[torch.rand(b * g, generator=gen) < 0.3] = 1.0                       # ties, like 0/1 rewards
    r[: g] = 0.5                                                          # one zero-std group
    if nan_frac:
        r[torch.rand(b * g, generator=gen) < nan_frac] = math.nan
    return r


@pytest.mark.parametrize("mode", ["group", "batch", "none", True, False])
@pytest.mark.parametrize("b,g", [(5, 4), (3, 7), (4, 1), (1, 8)])
def test_matches_loop(mode, b, g):
    name = {True: "group", False: "none"}.get(mode, mode)
    for seed in range(3):
        r = random_rewards(b, g, seed, nan_frac=0.15 if seed == 2 else 0.0)
        adv, gstd = group_advantages(r, g, mode)
        ref_adv, ref_std = loop_reference(r.tolist(), g, name)
        assert adv.shape == (b * g,) and gstd.shape == (b,)
        torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=r.dtype), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gstd, torch.tensor(ref_std, dtype=r.dtype), rtol=1e-9, atol=1e-9, equal_nan=True)


def test_float32_and_zero_std_group():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float32)
    adv, gstd = group_advantages(r, 3)
    assert adv.dtype == torch.float32
    assert torch.equal(adv[:3], torch.zeros(3)) and gstd[0] == 0
    assert adv[3] < 0 < adv[4]


def test_errors():
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(7), 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(8), 2, "global")


def trl_advantages(rewards, g, scale_rewards):
    """TRL 1.16's "sum_then_normalize" lines, verbatim, with TRL's own `nanstd` (the code sits inside the
    600-line `_generate_and_score_completions`, so it is copied here; the source guard below fails if
    TRL changes these lines)."""
    from trl.trainer.utils import nanstd
    num_generations = g
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        if rewards.numel() > 1:
            std_rewards = nanstd(rewards).expand_as(rewards)
        else:
            std_rewards = torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_matches_trl(tmp_path):
    trl = pytest.importorskip("trl", reason="TRL (dev dependency) not installed")
    from trl import GRPOConfig, GRPOTrainer
    src = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for line in ["mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)",
                 "std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)",
                 "std_rewards = nanstd(rewards).expand_as(rewards)",
                 "advantages = rewards - mean_grouped_rewards",
                 "advantages = advantages / (std_rewards + 1e-4)",
                 "advantages = torch.nan_to_num(advantages, nan=0.0)"]:
        assert line in src, f"TRL {trl.__version__} changed its advantage code: {line!r} is gone"
    for flag, name in [(True, "group"), (False, "none")]:        # GRPOConfig's bool spelling
        assert GRPOConfig(output_dir=str(tmp_path), bf16=False, scale_rewards=flag).scale_rewards == name
    for mode in ["group", "batch", "none"]:
        for b, g in [(6, 4), (2, 5), (3, 1)]:
            r = random_rewards(b, g, seed=b + g, nan_frac=0.1).float()
            adv, _ = group_advantages(r, g, mode)
            torch.testing.assert_close(adv, trl_advantages(r, g, mode), rtol=1e-6, atol=1e-6)

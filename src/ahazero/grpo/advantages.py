"""Group-relative advantages: the critic-free baseline of GRPO.

GRPO (DeepSeekMath, Shao et al. 2024, arXiv:2402.03300) scores each completion against the other
completions of the same prompt: advantage = reward - mean of its group, optionally divided by a std.
This follows TRL 1.16 `GRPOTrainer._generate_and_score_completions` ("sum_then_normalize"):

- "group" (TRL's default, also `True`): divide by the group's std + eps (DeepSeekMath);
- "batch": divide by the std of the whole batch + eps (PPO-Lite, arXiv:2508.08221);
- "none" (also `False`): no division (Dr. GRPO, arXiv:2503.20783: the std adds a difficulty bias).

Stds are unbiased (Bessel's correction), NaN-aware like TRL's `nanstd`: a NaN reward (a completion no
reward function could score) is left out of its group's mean and std, and its advantage is 0.
"""
from __future__ import annotations

import torch
from torch import Tensor

SCALE_REWARDS = ("group", "batch", "none")


def normalize_scale_rewards(scale_rewards: str | bool) -> str:
    """TRL's spelling: True means "group", False means "none"; anything else must be a known mode."""
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; valid: {', '.join(SCALE_REWARDS)}, True, False")
    return scale_rewards


def nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased std ignoring NaNs; NaN where fewer than two values are present (as TRL's `nanstd`)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim=dim)
    nan = torch.full_like(var, float("nan"))
    return torch.where(count > 1, var * count / (count - 1).clamp(min=1), nan).sqrt()


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str | bool = "group",
                     eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """rewards [B*G] float (groups of G contiguous) -> (advantages [B*G], group_std [B]).

    group_std is each group's unbiased std whatever the mode (for "frac_reward_zero_std"-style logging;
    TRL's metric in "batch" mode looks at the batch std instead). With G == 1 it is 0, as in TRL.
    """
    mode = normalize_scale_rewards(scale_rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if num_generations < 1 or rewards.numel() % num_generations != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of num_generations={num_generations}")
    grouped = rewards.view(-1, num_generations)                                  # [B, G]
    mean = torch.nanmean(grouped, dim=1, keepdim=True)                           # [B, 1]
    if num_generations > 1:
        group_std = nanstd(grouped, dim=1)                                       # [B]
    else:
        group_std = torch.zeros_like(grouped[:, 0])                              # [B]
    advantages = grouped - mean                                                  # [B, G]
    if mode == "group":
        advantages = advantages / (group_std.unsqueeze(1) + eps)
    elif mode == "batch":
        batch_std = nanstd(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards[0])
        advantages = advantages / (batch_std + eps)
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0), group_std         # [B*G], [B]

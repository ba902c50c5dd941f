"""The GRPO policy loss: clipped importance ratio, k3 KL to the reference, and its normalisation.

Follows TRL 1.16 `GRPOTrainer._compute_loss` for the loss types below, split into three pure steps so
that the trainer can chunk rows and accumulate gradients exactly:

1. `per_token_loss`: the PPO-style clipped surrogate per token (+ beta * KL), and clip statistics;
2. `loss_normalizers`: one divisor per accumulation step of an optimizer step;
3. `aggregate_loss`: a chunk's masked sum divided by its step's divisor.

Summing `aggregate_loss` over every row chunk of every accumulation step gives exactly TRL's loss
summed over its micro-batches (each of which TRL has already divided by the number of steps).

Loss types (how token losses are averaged):
- "grpo": per-sequence token mean, then mean over sequences (GRPO, DeepSeekMath, arXiv:2402.03300);
  biases towards short correct and long wrong answers.
- "bnpo": token mean over the local micro-batch (TRL's batch-normalised variant of DAPO's token mean).
- "dapo": token sum / tokens of the whole generation batch (DAPO, arXiv:2503.14476, token-level loss).
- "dr_grpo": token sum / (sequences * max_completion_length), a constant (Dr. GRPO, arXiv:2503.20783).

Importance-sampling levels: "token" (PPO/GRPO) or "sequence": one ratio per sequence, the exponent
of the mean per-token log ratio (GSPO, arXiv:2507.18071).
"""
from __future__ import annotations

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1.

    Unbiased and always >= 0; the KL penalty of GRPO (DeepSeekMath eq. 4). [N, T] -> [N, T].
    """
    delta = ref_logps - logps                                                    # [N, T]
    return torch.exp(delta) - delta - 1


def log_importance_weights(logps: Tensor, old_logps: Tensor, mask: Tensor, level: str) -> Tensor:
    """log(pi / pi_old): [N, T] at "token" level; [N, 1] masked mean at "sequence" level (GSPO)."""
    log_ratio = logps - old_logps                                                # [N, T]
    if level == "token":
        return log_ratio
    if level == "sequence":
        seq = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)           # [N]
        return seq.unsqueeze(-1)                                                 # [N, 1]
    raise ValueError(f"unknown importance_sampling_level {level!r}; valid: {', '.join(IMPORTANCE_SAMPLING_LEVELS)}")


def per_token_loss(logps: Tensor, old_logps: Tensor | None, advantages: Tensor, mask: Tensor, *,
                   epsilon_low: float, epsilon_high: float, importance_sampling_level: str = "token",
                   ref_logps: Tensor | None = None, beta: float = 0.0, delta: float | None = None,
                   use_bias_correction_kl: bool = False, importance_sampling_ratio: Tensor | None = None,
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta * k3 KL.

    logps / old_logps / ref_logps / mask: [N, T]; advantages: [N] (or [N, T]). old_logps None means
    on-policy (logps detached, so r == 1 with the policy gradient), as TRL does.
    Returns the per-token loss [N, T] (not yet masked) and detached masked SUMS over this chunk:
    "clip_low", "clip_high", "clip_region" (counted as in TRL: ratio below 1 - eps_low with A < 0, above
    1 + eps_high with A > 0, either), "clip_total" (what the clip counts are out of: masked tokens at
    "token" level, sequences at "sequence" level, as TRL's clip_ratio/* metrics), "kl" (if ref_logps is
    given) and "tokens" (the mask sum). Divide summed clip_* by summed clip_total and kl by tokens.

    Options as in TRL's GRPOConfig: epsilon_high != epsilon_low is DAPO's clip-higher; `delta` caps the
    unclipped ratio too (two-sided clipping, INTELLECT-2); `use_bias_correction_kl` multiplies the KL by
    the ratio; `importance_sampling_ratio` ([N, T] or [N, 1]) corrects for sampler/trainer mismatch (TIS).
    """
    mask = mask.to(logps.dtype)                                                  # [N, T]
    if old_logps is None:
        old_logps = logps.detach()
    adv = advantages.to(logps.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv                           # [N, 1] or [N, T]
    coef_1 = torch.exp(log_importance_weights(logps, old_logps, mask, importance_sampling_level))  # [N, T|1]

    stats: dict[str, Tensor] = {}
    if ref_logps is not None:
        kl = kl_k3(logps, ref_logps)                                             # [N, T]
        if use_bias_correction_kl:
            kl = kl * coef_1
        stats["kl"] = (kl * mask).sum().detach()
    elif beta != 0.0:
        raise ValueError("beta != 0 needs ref_logps")

    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)              # [N, T|1]
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    loss = -torch.min(coef_1 * adv, coef_2 * adv)                                # [N, T|1]
    if importance_sampling_ratio is not None:
        loss = loss * importance_sampling_ratio
    if beta != 0.0:
        loss = loss + beta * kl
    loss = loss.expand_as(mask)                                                  # [N, T]

    stats.update(_clip_stats(coef_1.detach(), adv.detach(), mask, epsilon_low, epsilon_high,
                             per_sequence=importance_sampling_level == "sequence"))
    stats["tokens"] = mask.sum().detach()
    return loss, stats


def _clip_stats(coef_1: Tensor, adv: Tensor, mask: Tensor, epsilon_low: float, epsilon_high: float,
                per_sequence: bool) -> dict[str, Tensor]:
    """Masked counts of clipped tokens ([N, T] ratios) or of clipped sequences ([N, 1] ratios)."""
    low = ((coef_1 < 1 - epsilon_low) & (adv < 0)).to(mask.dtype)                # [N, T|1]
    high = ((coef_1 > 1 + epsilon_high) & (adv > 0)).to(mask.dtype)              # [N, T|1]
    region = torch.maximum(low, high)
    if per_sequence:                                                             # [N, 1] ratios: count rows
        weight, total = torch.ones_like(low), torch.tensor(float(mask.shape[0]), dtype=mask.dtype)
    else:
        weight, total = mask, mask.sum()
    return {"clip_low": (low * weight).sum(), "clip_high": (high * weight).sum(),
            "clip_region": (region * weight).sum(), "clip_total": total.to(mask.device)}


def loss_normalizers(loss_type: str, step_masks: list[Tensor], max_completion_length: int) -> list[float]:
    """One divisor per accumulation step s (step_masks[s]: completion mask [N_s, T_s] of step s).

    Chosen so that the sum over steps and row chunks of `aggregate_loss` is TRL's loss summed over
    its micro-batches (TRL divides each micro-batch loss by the number of accumulation steps S):
    grpo: N_s * S; bnpo: max(tokens_s, 1) * S; dr_grpo: N_s * max_completion_length * S;
    dapo: max(tokens over all steps, 1) (TRL's num_items_in_batch).
    """
    return normalizers_from_counts(loss_type, [float(m.shape[0]) for m in step_masks],
                                   [float(m.sum()) for m in step_masks], max_completion_length)


def normalizers_from_counts(loss_type: str, rows: list[float], tokens: list[float],
                            max_completion_length: int) -> list[float]:
    """`loss_normalizers` from each accumulation step's row and token counts; with data parallel ranks
    these are the counts summed over ranks, so every rank divides by the global batch's normaliser."""
    _check_loss_type(loss_type)
    num_steps = len(rows)
    if loss_type == "grpo":
        return [n * num_steps for n in rows]
    if loss_type == "bnpo":
        return [max(t, 1.0) * num_steps for t in tokens]
    if loss_type == "dr_grpo":
        return [n * max_completion_length * num_steps for n in rows]
    total = max(sum(tokens), 1.0)                                                # dapo
    return [total] * num_steps


def aggregate_loss(per_token_loss: Tensor, mask: Tensor, loss_type: str, normalizer: float) -> Tensor:
    """Scalar loss of one row chunk: "grpo" sums each sequence's masked token mean, the others sum
    masked tokens; either is divided by the chunk's step normalizer (see `loss_normalizers`)."""
    _check_loss_type(loss_type)
    mask = mask.to(per_token_loss.dtype)                                         # [N, T]
    masked = per_token_loss * mask                                               # [N, T]
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / normalizer
    return masked.sum() / normalizer

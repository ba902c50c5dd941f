"""Padding rollouts into the tensors the loss is computed on."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class RolloutBatch:
    """One accumulation step's completions. Prompts are left-padded and completions right-padded, so
    hidden state `P - 1 + t` of every row predicts completion token `t`."""
    prompt_ids: torch.Tensor  # [N, P] long, left-padded
    prompt_mask: torch.Tensor  # [N, P] long
    completion_ids: torch.Tensor  # [N, C] long, right-padded
    completion_mask: torch.Tensor  # [N, C] float: 1 on tokens that count in the loss
    sampling_logps: torch.Tensor  # [N, C] float32, the engine's log-probs of the sampled tokens
    advantages: torch.Tensor  # [N] float32
    old_logps: torch.Tensor | None = None  # [N, C] float32, the policy before this rollout's updates
    ref_logps: torch.Tensor | None = None  # [N, C] float32, the base model (adapters off)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def rows(self, start: int, stop: int) -> "RolloutBatch":
        """Rows [start, stop), trimmed to the longest completion among them."""
        width = int(self.completion_mask[start:stop].sum(0).nonzero().max().item()) + 1 \
            if self.completion_mask[start:stop].any() else 1
        def cut(t):
            if t is None:
                return None
            t = t[start:stop]
            return t[:, :width] if t.dim() == 2 and t.shape[1] == self.completion_ids.shape[1] else t
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out = {k: (v[start:stop] if k.startswith("prompt") else cut(v)) for k, v in out.items()}
        return RolloutBatch(**out)

    def to(self, device) -> "RolloutBatch":
        return RolloutBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                               for f in fields(self)})


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [N, max_len] left-padded with pad_id, and the mask [N, max_len] of real tokens."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [N, P]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [N, P]
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def pad_right(seqs: list[list[float]], pad, dtype) -> torch.Tensor:
    width = max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), width), pad, dtype=dtype)  # [N, C]
    for i, s in enumerate(seqs):
        if s:
            out[i, :len(s)] = torch.tensor(s, dtype=dtype)
    return out


def build_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], sampling_logps: list[list[float]],
                truncated: list[bool], advantages: torch.Tensor, pad_id: int,
                mask_truncated_completions: bool = False) -> RolloutBatch:
    """Pad one accumulation step's rows. Truncated completions count in the loss unless masked (DAPO)."""
    p_ids, p_mask = pad_left(prompt_ids, pad_id)
    c_ids = pad_right(completion_ids, pad_id, torch.long)  # [N, C]
    c_mask = pad_right([[1.0] * len(c) for c in completion_ids], 0.0, torch.float32)  # [N, C]
    if mask_truncated_completions:
        c_mask = c_mask * (~torch.tensor(truncated, dtype=torch.bool)).float()[:, None]
    s_logps = pad_right(sampling_logps, 0.0, torch.float32)  # [N, C]
    return RolloutBatch(p_ids, p_mask, c_ids, c_mask, s_logps, advantages.float())

"""Which sequences run next: a prefill of waiting prompts when their slots are free, else one decode step.

A prompt and its n completions form a group: the group is admitted whole (n slots), its prompt is
prefilled once, and every completion starts from that prefill. Running sequences stay compacted in
slots 0..B-1: when some finish, survivors move down (`compact` says which slot copies to make).
"""
from __future__ import annotations

from collections import deque

from .sequence import Sequence, StopChecker


class Scheduler:

    def __init__(self, num_slots: int, max_prefill_tokens: int):
        self.num_slots, self.max_prefill_tokens = num_slots, max_prefill_tokens
        self.waiting: deque[list[Sequence]] = deque()  # groups, in arrival order
        self.running: list[Sequence] = []  # running[i].slot == i

    def add(self, group: list[Sequence]) -> None:
        if len(group) > self.num_slots:
            raise ValueError(f"n={len(group)} completions need more KV slots than the {self.num_slots} there are")
        self.waiting.append(group)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool]:
        """(sequences, is_prefill). A prefill returns the new sequences of whole groups, group by group."""
        admitted = self._admit()
        if admitted:
            return admitted, True
        return list(self.running), False

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        prompts, longest = 0, 0
        while self.waiting:
            group = self.waiting[0]
            free = self.num_slots - len(self.running) - len(admitted)
            width = max(longest, len(group[0].prompt_ids))
            if len(group) > free or (prompts and (prompts + 1) * width > self.max_prefill_tokens):
                break
            self.waiting.popleft()
            for seq in group:
                seq.slot = len(self.running) + len(admitted)
                admitted.append(seq)
            prompts, longest = prompts + 1, width
        self.running.extend(admitted)
        return admitted

    def postprocess(self, seqs: list[Sequence], tokens: list[int], logprobs: list[float],
                    stop: StopChecker) -> list[Sequence]:
        """Append each sampled token; returns the sequences that just finished."""
        finished = []
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            if seq.finished:  # stopped the step before; this token ran ahead and is discarded
                continue
            seq.completion_ids.append(token)
            seq.logprobs.append(logprob)
            seq.finish_reason = stop(seq)
            if seq.finished:
                finished.append(seq)
        return finished

    def clear(self) -> None:
        """Forget every sequence (after a generate call ends, normally or not)."""
        self.waiting.clear()
        self.running.clear()

    def compact(self) -> list[tuple[int, int]]:
        """Drop finished sequences and move survivors down to slots 0..B-1; returns (src, dst) slot moves."""
        moves = []
        for seq in self.running:
            if seq.finished:
                seq.slot = -1
        self.running = [s for s in self.running if not s.finished]
        for i, seq in enumerate(self.running):
            if seq.slot != i:
                moves.append((seq.slot, i))
                seq.slot = i
        return moves

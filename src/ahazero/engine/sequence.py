"""One sequence being generated, and the rule that says when it is done."""
from __future__ import annotations

from dataclasses import dataclass, field

from .types import SamplingParams


@dataclass(slots=True, eq=False)
class Sequence:
    """A prompt plus one completion. `group` is the prompt's index, `index` the completion's within it.

    `slot` is the KV-cache slot holding its keys and values (-1 while waiting). Every position but the
    last token's is in the cache: the last token is the next decode step's input.
    """
    group: int
    index: int
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    slot: int = -1
    finish_reason: str | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def last_token(self) -> int:
        return self.completion_ids[-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StopChecker:
    """vLLM's stopping rules: EOS (unless ignore_eos), stop_token_ids, stop strings, max_tokens.

    A stop string is looked for in the decoded text of the last few tokens only (enough to hold the
    longest stop string), so checking stays O(1) per token; the output text is cut at the first stop
    string afterwards (text ends before it, token ids keep it).
    """

    def __init__(self, params: SamplingParams, eos_token_ids: list[int], tokenizer, max_seq_length: int):
        self.stop_ids = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            self.stop_ids.update(eos_token_ids)
        self.stop_strings = list(params.stop or [])
        self.tail = max((len(s) for s in self.stop_strings), default=0) + 8  # tokens that may hold one
        self.max_tokens, self.max_seq_length, self.tokenizer = params.max_tokens, max_seq_length, tokenizer

    def __call__(self, seq: Sequence) -> str | None:
        """The finish reason once `seq` must stop, else None."""
        if seq.last_token in self.stop_ids:
            return "stop"
        if self.stop_strings and self._hit_stop_string(seq.completion_ids[-self.tail:]):
            return "stop"
        if self.reaches_length(seq, 0):
            return "length"
        return None

    def reaches_length(self, seq: Sequence, ahead: int) -> bool:
        """Whether `seq` stops by length (max_tokens or max_seq_length) within its next `ahead` tokens."""
        return len(seq.completion_ids) + ahead >= self.max_tokens or seq.length + ahead >= self.max_seq_length

    def _hit_stop_string(self, tail_ids: list[int]) -> bool:
        text = self.tokenizer.decode(tail_ids, skip_special_tokens=True)
        return any(s in text for s in self.stop_strings)

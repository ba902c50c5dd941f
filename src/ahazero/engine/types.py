"""The request/response types of generation, with vLLM's field names (what GRPO notebooks use)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass
class SamplingParams:
    """How to sample, with vLLM's field names.

    temperature 0 means greedy. top_k <= 0 (or -1) and top_p = 1 and min_p = 0 disable those filters.
    `logprobs` of each sampled token are always returned: log_softmax(logits / temperature) before any
    top-p/top-k/min-p filtering (the same quantity the GRPO trainer computes), raw logits when greedy.
    """
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # accepted for vLLM compatibility; sampled-token log-probs always come back

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class CompletionOutput:
    """One sampled completion. `logprobs[i]` is the log-prob of `token_ids[i]` (see SamplingParams)."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"


@dataclass
class RequestOutput:
    """All completions of one prompt."""
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


@dataclass(frozen=True)
class LoRARequest:
    """A saved adapter to generate with (vLLM's names). `model.load_lora(path)` makes one and loads the
    adapter into the PEFT model once, under `lora_name`; the engine reads its weights from there."""
    lora_name: str
    lora_int_id: int
    lora_path: str


class Generator(Protocol):
    """What the trainer and `fast_generate` need from a rollout backend.

    `adapter` names the PEFT adapter to apply ("default" is the one being trained); None runs the base
    model (adapters disabled). Implementations read the model's live parameters, so an optimizer step
    is seen by the next call with no copy or reload.
    """

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                 adapter: str | None = "default") -> list[RequestOutput]: ...

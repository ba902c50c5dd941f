"""Prompt formatting: dataset prompts (strings or chat messages) to the token ids generation starts from.

Follows TRL's GRPOTrainer (trl 1.x): conversational prompts go through the tokenizer's chat template
with a generation prompt (or continuing a final assistant message), standard prompts are used as they
are, tokenisation adds no special tokens (the template already wrote them), and prompts longer than
`max_prompt_length` keep their last tokens (left truncation).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence


def is_conversational(prompt) -> bool:
    """True for a non-empty list of messages (`{"role": ..., "content": ...}` dicts), as TRL decides."""
    return (isinstance(prompt, Sequence) and not isinstance(prompt, str) and len(prompt) > 0
            and all(isinstance(m, Mapping) and "role" in m for m in prompt))


def render_prompt(tokenizer, prompt) -> str:
    """The text generation continues from: the chat template applied to messages, a string as it is.

    A prompt whose last message is the assistant's is continued (TRL's `continue_final_message`);
    otherwise the template's generation prompt is added.
    """
    if isinstance(prompt, str):
        return prompt
    if not is_conversational(prompt):
        raise TypeError(f"a prompt must be a string or a non-empty list of {{'role', 'content'}} messages, "
                        f"got {type(prompt).__name__}: {prompt!r:.80}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template, so conversational "
                         f"prompts cannot be rendered: set `tokenizer.chat_template`, or give string prompts")
    messages = [dict(m) for m in prompt]
    continue_final = messages[-1]["role"] == "assistant"
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not continue_final,
                                         continue_final_message=continue_final)
    return text


def tokenize_prompts(tokenizer, prompts, max_prompt_length: int | None) -> tuple[list[list[int]], int]:
    """Token ids of each rendered prompt, left-truncated to `max_prompt_length`, and how many were truncated.

    `add_special_tokens=False`: a chat template already writes BOS and the like; standard prompts get
    none added either (as in TRL). `max_prompt_length=None` keeps every token.
    """
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
    texts = [render_prompt(tokenizer, p) for p in prompts]
    if not texts:
        return [], 0
    ids = [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    if max_prompt_length is None:
        return ids, 0
    truncated = sum(len(x) > max_prompt_length for x in ids)
    return [x[-max_prompt_length:] for x in ids], truncated

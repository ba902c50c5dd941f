"""Padding-free training forward: a micro-batch's sequences packed into one row.

Each sequence (a prompt's real tokens, then its completion's counted tokens) is laid end to end in one
row [1, S], S = sum of the sequence lengths, with `position_ids` restarting at 0 for each sequence and
no attention mask. Each token sees exactly what it sees in the padded batch, with the same positions
(hence the same RoPE angles), and the per-token work (projections, MLP, norms, the lm_head rows) runs
on S tokens instead of n * (P + C) (`processed_tokens`).

Attention: the packed forward runs on our varlen attention (models/varlen.py, switched on around it by
`varlen_context`): it finds the sequences from the position_ids and does sum(L_i^2) work (PyTorch's
varlen FlashAttention on CUDA, per-sequence SDPA elsewhere). A model already on flash-attention or flex
attention keeps its own, which transformers feeds the same position_ids (`_is_packed_sequence`,
`find_packed_sequence_indices`). transformers' sdpa and eager would instead get one dense block-diagonal
[S, S] mask: S^2 work (measured on the built-in CPU demo: 228 s against 100 s padded).

The idea is that of TRL's SFT `padding_free` (transformers' `DataCollatorWithFlattening`) and of verl's
`use_remove_padding`; simplified: one packed row per micro-batch (the trainer's token budget sizes the micro-batches), and a row
with no counted completion token is left out of the packed row (its log-probs are returned as 0 and are
masked).

Whether a model's attention honours packed position_ids is measured, not assumed: see
`packing_fallback_reason`.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.lora import decoder_and_head
from ..models.varlen import packed_attention


@dataclass
class PackedRollouts:
    """Where the rows of a padded batch [n, P] + [n, C] went in one packed row of S tokens."""
    input_ids: Tensor     # [S] long, the sequences end to end
    position_ids: Tensor  # [S] long, 0 at the start of each sequence
    predict_at: Tensor    # [M] long, the packed index whose hidden state predicts each completion token
    targets: Tensor       # [M] long, that completion token
    rows: Tensor          # [M] long, its row in the [n, C] completion layout
    cols: Tensor          # [M] long, its column there
    lengths: Tensor       # [N] long, each packed sequence's tokens, in row order (N <= n)


def completion_lengths(completion_mask: Tensor) -> Tensor:
    """Counted completion tokens per row [n]. build_batch makes each row of the mask a run of ones then
    zeros (or all zeros: a truncated completion under mask_truncated_completions)."""
    return completion_mask.gt(0).sum(1)                                          # [n]


def pack_rollouts(prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                  completion_mask: Tensor) -> PackedRollouts:
    """Pack left-padded prompts [n, P] and right-padded completions [n, C] into one row.

    Prompt tokens are those with prompt_mask 1; completion tokens the first `completion_lengths` of each
    row. A row with no counted completion token is left out. Raises ValueError for a row with completion
    tokens but no prompt token (nothing would predict its first token).
    """
    n, P = prompt_ids.shape
    C = completion_ids.shape[1]
    c_len = completion_lengths(completion_mask)                                  # [n]
    keep_c = torch.arange(C, device=c_len.device)[None, :] < c_len[:, None]      # [n, C]
    keep_p = prompt_mask.bool() & (c_len > 0)[:, None]                           # [n, P]
    if bool(((keep_p.sum(1) == 0) & (c_len > 0)).any()):
        raise ValueError("a row has completion tokens but an empty prompt: nothing predicts its first token")
    keep = torch.cat([keep_p, keep_c], dim=1)                                    # [n, P+C]
    ids = torch.cat([prompt_ids, completion_ids], dim=1)                         # [n, P+C]
    packed_index = keep.flatten().cumsum(0).view(n, P + C) - 1                   # [n, P+C], valid where keep
    rows, cols = keep_c.nonzero(as_tuple=True)                                   # [M], [M] (row-major)
    return PackedRollouts(input_ids=ids[keep],                                   # [S]
                          position_ids=(keep.cumsum(1) - 1)[keep],               # [S]
                          predict_at=packed_index[:, P:][keep_c] - 1,            # [M]
                          targets=completion_ids[keep_c],                        # [M]
                          rows=rows, cols=cols,
                          lengths=keep.sum(1)[c_len > 0])                        # [N]


def padded_to_shape(input_ids: Tensor, position_ids: Tensor, tokens: int, pieces: int) -> tuple[Tensor, Tensor]:
    """A packed row [S] with `pieces` more sequences of their own appended, of near-equal lengths, so that it
    has `tokens` tokens (positions 0, 1, ... in each, the row's first token repeated). The appended tokens
    attend among themselves only and predict nothing: `predict_at` indexes the row's own positions. Rows of
    different lengths then meet the same CUDA graphs (models/layer_graphs.py `padded_row_shape`)."""
    pad = tokens - input_ids.shape[0]
    if not 1 <= pieces <= pad:
        raise ValueError(f"cannot pad a row of {input_ids.shape[0]} tokens to {tokens} with {pieces} sequences")
    lengths = [pad // pieces + (i < pad % pieces) for i in range(pieces)]
    positions = torch.cat([torch.arange(n, device=position_ids.device, dtype=position_ids.dtype)
                           for n in lengths])                                    # [pad]
    return (torch.cat([input_ids, input_ids[:1].expand(pad)]),                   # [tokens]
            torch.cat([position_ids, positions]))                                # [tokens]


def unpack_to_rows(values: Tensor, packed: PackedRollouts, shape: tuple[int, int]) -> Tensor:
    """values [M] (one per packed completion token) -> [n, C], zeros where no token was packed.
    Differentiable (an index_put into zeros)."""
    out = values.new_zeros(shape)                                                # [n, C]
    return out.index_put((packed.rows, packed.cols), values)                     # [n, C]


def processed_tokens(prompt_lengths: list[int], completion_lengths: list[int], padding_free: bool) -> int:
    """Token positions one training forward runs through the model: the sum of the sequence lengths when
    packed; rows x (longest prompt + longest completion) when padded (left-padded prompts, right-padded
    completions, as build_batch and RolloutBatch.rows make them). Rows without completion tokens are
    left out of a packed forward."""
    pairs = list(zip(prompt_lengths, completion_lengths))
    if padding_free:
        return sum(p + c for p, c in pairs if c > 0)
    return len(pairs) * (max(p for p, _ in pairs) + max(max(c for _, c in pairs), 1))


# ------------------------------------------------------------------ does this model honour packing?

PROBE_MAX_RATIO = 0.1  # packed-vs-alone difference allowed, as a fraction of a real cross-sequence leak


@contextmanager
def _eval_mode(module: torch.nn.Module):
    """Dropout off for the probe; every submodule's training flag restored afterwards."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags.items():
            m.training = flag


@torch.no_grad()
def measure_packing(decoder: torch.nn.Module) -> tuple[float, float]:
    """(diff, leak): mean |h| differences of a sequence `b`'s last hidden states [4, H] packed after a
    sequence `a` (positions restarting at 0, no attention mask) and joined to `a` (positions continuing,
    so `b` attends to `a`: what a leak looks like), each against `b` run alone. Dropout is off."""
    device = next(decoder.parameters()).device
    vocab = decoder.get_input_embeddings().num_embeddings
    a = torch.tensor([17, 9_001, 523, 77_777, 4_242, 1_234], device=device) % vocab        # [6]
    b = torch.tensor([3_141, 592, 65_358, 979], device=device) % vocab                       # [4]
    ids = torch.cat([a, b])[None]                                                             # [1, 10]
    restart = torch.cat([torch.arange(len(a)), torch.arange(len(b))]).to(device)[None]       # [1, 10]

    def last_hidden(input_ids, position_ids):  # [1, T, H] float32
        return decoder(input_ids=input_ids, position_ids=position_ids,
                       use_cache=False).last_hidden_state.float()

    with _eval_mode(decoder):
        alone = last_hidden(b[None], torch.arange(len(b), device=device)[None])                 # [1, 4, H]
        packed = last_hidden(ids, restart)[:, len(a):]                                          # [1, 4, H]
        joined = last_hidden(ids, torch.arange(ids.shape[1], device=device)[None])[:, len(a):]  # [1, 4, H]
    return (packed - alone).abs().mean().item(), (joined - alone).abs().mean().item()


def packing_fallback_reason(model) -> str | None:
    """None when the model's decoder keeps packed sequences apart; else why the padded path is needed.

    Measured on the model itself (its architecture, attn_implementation, dtype, quantisation, adapters)
    by `measure_packing`: packing is honoured when a packed sequence is within PROBE_MAX_RATIO of a
    leak's size from itself alone (tiny float32 / bf16 CPU models of our four architectures, sdpa and
    eager: <= 1e-7 against ~0.6; a ratio, not an absolute tolerance, so that it holds in bf16 and 4-bit).
    """
    decoder, _ = decoder_and_head(model)
    impl = getattr(decoder.config, "_attn_implementation", None)
    where = f"{type(decoder).__name__} with attn_implementation={impl!r}"
    try:
        with varlen_context(decoder):
            diff, leak = measure_packing(decoder)
    except Exception as e:  # noqa: BLE001 - any failure of the probe means: do not pack
        return f"{where}: the packed probe forward raised {type(e).__name__}: {e}"
    if not leak > 0:
        return f"{where}: the packing probe could not tell (a sequence's context changed nothing)"
    if not diff <= PROBE_MAX_RATIO * leak:
        return (f"{where} does not keep packed sequences apart (a packed sequence differs from itself alone "
                f"by {diff:.3g} on average, one that attends to the other sequence by {leak:.3g})")
    return None


def attention_implementation(decoder) -> str:
    """The decoder's attention implementation name (transformers' `config._attn_implementation`)."""
    return str(getattr(decoder.config, "_attn_implementation", None) or "eager")


def packs_sparsely(attention: str) -> bool:
    """Attention that already computes within each packed sequence only: flash-attention's varlen kernels
    (any `flash_attention_*` or hub `...flash...` kernel) and flex attention's block mask."""
    return "flash" in attention or attention.startswith("flex_attention")


def varlen_context(decoder):
    """Packed forwards run on our varlen attention (models/varlen.py), unless the decoder's own attention
    already keeps packed sequences apart sparsely: sdpa and eager would build a dense [S, S] mask."""
    if packs_sparsely(attention_implementation(decoder)):
        return nullcontext()
    return packed_attention(decoder)


def token_budget_chunks(row_tokens: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive rows grouped into [start, stop) chunks whose summed tokens are at most `budget`;
    a row longer than the budget is a chunk of its own."""
    chunks, start, total = [], 0, 0
    for i, tokens in enumerate(row_tokens):
        if i > start and total + tokens > budget:
            chunks.append((start, i))
            start, total = i, 0
        total += tokens
    if row_tokens:
        chunks.append((start, len(row_tokens)))
    return chunks


def capped_chunks(chunks: list[tuple[int, int]], max_rows: int | None) -> list[tuple[int, int]]:
    """`chunks` with each of more than `max_rows` rows cut into consecutive pieces of at most `max_rows`
    rows (the last may be shorter); all of them as they are when `max_rows` is None."""
    if max_rows is None:
        return list(chunks)
    return [(i, min(i + max_rows, stop)) for start, stop in chunks for i in range(start, stop, max_rows)]


def split_chunks_to_count(chunks: list[tuple[int, int]], row_tokens: list[int],
                          count: int) -> list[tuple[int, int]]:
    """`chunks` with the one of most tokens (of 2+ rows) split into two halves of its rows, again and
    again, until there are `count` chunks, in row order. Under FSDP2 every rank needs the same number of
    forward/backward passes; a rank never needs more chunks than rows (each rank has as many rows, and
    every chunk holds at least one), else ValueError."""
    chunks = list(chunks)
    while len(chunks) < count:
        splittable = [i for i, (start, stop) in enumerate(chunks) if stop - start > 1]
        if not splittable:
            raise ValueError(f"cannot cut {sum(b - a for a, b in chunks)} rows into {count} chunks")
        i = max(splittable, key=lambda j: sum(row_tokens[chunks[j][0]:chunks[j][1]]))
        start, stop = chunks[i]
        mid = (start + stop) // 2
        chunks[i:i + 1] = [(start, mid), (mid, stop)]
    return chunks

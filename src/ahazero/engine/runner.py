"""The model runner: owns the KV cache, the RoPE table and the decode graphs; turns scheduled sequences
into one forward's tensors and returns logits (the model's dtype), one row per sequence."""
from __future__ import annotations

import warnings

import torch

from ..models.lora import is_peft_model
from .attention import DecodeMetadata, PrefillMetadata, decode_attention, decode_attention_triton
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .kv_cache import KVCache, num_slots_for, to_device
from .models import llama
from .sequence import Sequence


# KV caches that landed at a new address (and so cost a re-capture of the decode graphs) before `release_kv`
# stops releasing: the allocator keeps placing something in the freed block
MAX_KV_MOVES = 3


class ModelRunner:

    def __init__(self, model, config: EngineConfig):
        causal_lm = model.get_base_model() if is_peft_model(model) else model
        self.config = config
        self.kv_shape = llama.kv_shape(causal_lm)
        self.max_slots = num_slots_for(config, self.kv_shape, _workspace_bytes(causal_lm.config, config))
        self.kv: KVCache | None = None  # allocated by ensure_slots, for the sequences a call runs
        self.released: tuple[int, int] | None = None  # (slots, address) of the cache release_kv freed
        self.kv_moves = 0  # re-allocated caches that did not land at the released one's address
        self.rope = llama.rope_table(causal_lm, config.max_seq_length, config.device, config.dtype)
        self.attend = decode_attention_triton if config.attention == "triton" else decode_attention
        self.graphs: DecodeGraphs | None = None
        self.use_graphs = config.cuda_graphs

    def ensure_slots(self, wanted: int) -> None:
        """Hold a KV cache of at least min(wanted, max_slots) slots. The cache is sized to what a call
        runs (a GRPO step's rollouts), not to all the memory `gpu_memory_utilization` allows, so the
        training step keeps the rest; a larger call re-allocates it (and its graphs, which hold its
        addresses). A cache freed by `release` comes back at its own size."""
        wanted = min(wanted, self.max_slots)
        if self.kv is not None and self.kv.num_slots >= wanted:
            return
        released, self.released = self.released, None
        back = self.kv is None and released is not None and released[0] >= wanted  # the released cache returns
        if not back:
            self.kv = self.graphs = None  # free the old cache (and its graphs) before the new one is allocated
        slots = released[0] if back else wanted
        self.kv = KVCache(self.kv_shape, slots, self.config.max_seq_length, self.config.device, self.config.dtype)
        if back:
            if self.kv.data.data_ptr() == released[1]:
                return  # the decode graphs read this very memory: they stay valid
            self.kv_moves += 1
        self.graphs = None  # they hold the old cache's address
        if self.use_graphs:
            sizes = [b for b in self.config.graph_batch_sizes if b < slots] + [slots]
            self.graphs = DecodeGraphs(self._decode_step(self.config), sizes, self.config.max_seq_length,
                                       self.config.device, capture=self.config.device.type == "cuda",
                                       eager_step=self._decode_step(None))

    def release(self) -> None:
        """Free the KV cache between calls (`EngineConfig.release_kv`); ensure_slots allocates it again,
        keeping the decode graphs where it lands at the same address. A no-op once MAX_KV_MOVES caches moved."""
        if self.kv is None or self.kv_moves >= MAX_KV_MOVES:
            return
        self.released = (self.kv.num_slots, self.kv.data.data_ptr())
        self.kv = None

    def _decode_step(self, config: EngineConfig | None):
        """The function the graphs capture: (weights, ids [B], meta) -> logits [B, V]. When asked, the
        decoder layer is compiled rather than the whole step: Dynamo re-uses its graph for every layer
        (symbolic batch size and KV length), so compile time does not grow with the model's depth."""
        layer = llama.decoder_layer
        if config is not None and config.compile:
            layer = torch.compile(llama.decoder_layer, dynamic=True, backend=config.compile_backend)
        return lambda weights, ids, meta: llama.decode(weights, ids, meta, self.kv, self.rope, self.attend, layer)

    @property
    def num_slots(self) -> int:
        """The most sequences that may run at once (what memory allows, capped at max_batch_size)."""
        return self.max_slots

    @property
    def allocated_slots(self) -> int:
        """Slots of the cache held, or of the one released between calls."""
        if self.kv is not None:
            return self.kv.num_slots
        return 0 if self.released is None else self.released[0]

    @torch.no_grad()
    def prefill(self, weights, seqs: list[Sequence]) -> torch.Tensor:
        """The new sequences of whole groups (a group's sequences are adjacent). Returns logits [S, V]."""
        prompts, rows = [], []
        for seq in seqs:
            if not prompts or seq.group != prompts[-1].group:
                prompts.append(seq)
            rows.append(len(prompts) - 1)
        T = max(len(p.prompt_ids) for p in prompts)
        ids = torch.zeros(len(prompts), T, dtype=torch.long)  # [P, T], right-padded with token 0
        for i, p in enumerate(prompts):
            ids[i, :len(p.prompt_ids)] = torch.tensor(p.prompt_ids)
        meta = PrefillMetadata(positions=self._to(torch.arange(T).expand(len(prompts), T)),
                               last=self._to(torch.tensor([len(p.prompt_ids) - 1 for p in prompts])),
                               slots=self._to(torch.tensor([s.slot for s in seqs])),
                               rows=self._to(torch.tensor(rows)))
        logits = llama.prefill(weights, self._to(ids), meta, self.kv, self.rope)  # [P, V]
        return logits[meta.rows]  # [S, V]

    @torch.no_grad()
    def decode(self, weights, key, seqs: list[Sequence], pending: torch.Tensor | None = None,
               ahead: int = 1) -> torch.Tensor:
        """Running sequences, sequence b in slot b. Returns logits [B, V].

        `pending` [B]: each sequence's newest token when it is still on the device (sampled by the newest
        of `ahead` steps not yet recorded); it then sits `ahead` positions past the recorded sequence. A
        position past the cache's last (a sequence that reaches max_seq_length in a step not yet recorded:
        this step's token is discarded) is moved to the last, the sequence's own."""
        if pending is None:
            ids = self._to(torch.tensor([s.last_token for s in seqs]))  # [B]
            lengths = [s.length for s in seqs]
        else:
            ids = pending
            lengths = [min(s.length + ahead, self.config.max_seq_length) for s in seqs]
        positions = self._to(torch.tensor(lengths) - 1)  # [B]
        kv_len = self._kv_len(max(lengths))
        if self.graphs is not None:
            try:
                return self.graphs.run(weights, key, ids, positions, kv_len)
            except RuntimeError as err:  # a capture failed: keep generating, without graphs
                warnings.warn(f"CUDA graph capture of the decode step failed ({err}); decoding eagerly")
                self.graphs, self.use_graphs = None, False
        span = torch.arange(kv_len, device=self.config.device)  # [L]
        return llama.decode(weights, ids, DecodeMetadata(positions, span), self.kv, self.rope, self.attend)

    def move_slots(self, moves: list[tuple[int, int]]) -> None:
        self.kv.move(moves)

    def _kv_len(self, longest: int) -> int:
        bucket = self.config.kv_len_bucket
        return min(-(-longest // bucket) * bucket, self.config.max_seq_length)

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return to_device(t, self.config.device)


def _workspace_bytes(model_config, config: EngineConfig) -> int:
    """Room kept free for activations: float32 logits of a full decode batch (logits, log-probs, probs,
    noise), and one prefill's widest activations."""
    elem = torch.empty((), dtype=config.dtype).element_size()
    decode = config.max_batch_size * model_config.vocab_size * 4 * 4
    width = 2 * model_config.intermediate_size + 4 * model_config.hidden_size
    prefill = config.max_prefill_tokens * width * elem
    return decode + prefill + (256 << 20)

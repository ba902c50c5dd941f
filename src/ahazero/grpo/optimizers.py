"""AdamW with 8-bit blockwise-quantised moments, in plain PyTorch (no bitsandbytes); and paged AdamW, whose
moments wait in pinned CPU memory between steps (`PagedAdamW32bit`, TRL's `paged_adamw_32bit`).

Follows "8-bit Optimizers via Block-wise Quantization" (Dettmers et al. 2022,
https://arxiv.org/abs/2110.02861) as bitsandbytes implements it in `bnb.optim.AdamW8bit`
(`optim_bits=8`, `block_wise=True`, `min_8bit_size=4096`):

- each moment, flattened, is cut into blocks of 256 values; a block keeps one float32 absmax and each
  value as the uint8 index of the nearest entry of a 256-value dynamic map, applied to value / absmax:
  the signed map (`nf4.dynamic_code`) for the first moment, the unsigned one (`unsigned_dynamic_code`)
  for the second, which is never negative;
- a step dequantises both moments to float32, does the AdamW update, and quantises them again with the
  new per-block absmax;
- parameters with fewer than `min_8bit_size` (4096) elements keep float32 moments, as in bnb: their
  state is small, and 8 bit would cost them precision for no memory gain worth having.

The update is torch.optim.AdamW's, op for op (decoupled weight decay first, then the moments, then
`p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`), computed in float32 whatever the parameter's
dtype. Simplified against bnb: weight decay comes before the update (torch's order; bnb multiplies
after it); rounding is to the nearest table entry with ties to the lower code (bnb's CUDA kernel
rounds a little differently near midpoints); no NaN-gradient skip (the trainer skips non-finite steps
itself); no `amsgrad`, `maximize`, per-parameter overrides or percentile clipping. A step updates the
parameters a chunk at a time, their values laid end to end (CHUNK_ELEMENTS below): the same numbers as
updating each alone, in a few hundred launches instead of thousands.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.nf4 import dynamic_code

BLOCKSIZE = 256  # values per absmax (bnb's blockwise optimizers)
MIN_8BIT_SIZE = 4096  # bnb's `min_8bit_size`: smaller parameters keep float32 moments
# `step` updates the parameters in chunks of up to CHUNK_ELEMENTS values: a chunk's parameters, gradients and moments
# are laid end to end (each parameter's segment padded to whole blocks, so the blocks are those of a parameter alone)
# and updated by one pass of about forty ops. Per parameter, the LoRA r=32 adapters of Qwen2.5-1.5B (392 tensors)
# took about 12,000 launches a step, each a few microseconds of host time, for 33 ms of GPU work (H200, twenty-first
# session: 501 ms of host time under torch.profiler in the 4-bit seed-notebook step, bench/RESULTS.md). A chunk's
# float32 temporaries are about 30 bytes a value: 30 MiB at this size.
CHUNK_ELEMENTS = 2 ** 20


def unsigned_dynamic_code(device: torch.device | str | None = None) -> Tensor:
    """bnb's unsigned 8-bit dynamic map (`create_dynamic_map(signed=False, max_exponent_bits=7, total_bits=8)`).

    Dettmers 2015 (https://arxiv.org/abs/1511.04561), without the sign bit: for exponent e = 10^(i-6),
    i = 0..6, the 2^(i+1) midpoints of linspace(0.1, 1, 2^(i+1) + 1) times e, plus 0 and 1; 256 sorted
    float32 values in [0, 1]. Built with the same float32 steps as bnb.
    """
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** (i + 1) + 1, dtype=torch.float32)  # [2^(i+1) + 1]
        means = (bounds[:-1] + bounds[1:]) / 2.0  # [2^(i+1)]
        data += ((10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)  # [256]


def quantize_blockwise(x: Tensor, code: Tensor, blocksize: int = BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """Blockwise absmax quantisation of a flat float32 x to the nearest entry of a sorted code.

    x: [n] float32; code: [256] sorted float32 in [-1, 1]. Returns codes uint8 [n] and absmax float32
    [ceil(n / blocksize)]. Values are divided by their block's absmax (as bnb's optimizer kernel does);
    an all-zero block keeps absmax 0 and is divided by 1, so its codes are those of 0.0.
    """
    n = x.numel()
    nb = -(-n // blocksize)
    blocks = F.pad(x, (0, nb * blocksize - n)).view(nb, blocksize)  # [nb, bs]
    absmax = blocks.abs().amax(dim=1)  # [nb]
    scaled = (blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]).view(-1)[:n]  # [n] in [-1, 1]
    midpoints = (code[:-1] + code[1:]) / 2  # [255]
    codes = torch.bucketize(scaled, midpoints, out_int32=True)  # [n] x == midpoint goes to the lower code
    return codes.to(torch.uint8), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, code: Tensor, blocksize: int = BLOCKSIZE) -> Tensor:
    """Inverse of `quantize_blockwise`: codes uint8 [n], absmax [nb] -> float32 [n] = code[q] * absmax."""
    n, nb = codes.numel(), absmax.numel()
    values = F.pad(code[codes.int()], (0, nb * blocksize - n)).view(nb, blocksize)  # [nb, bs]
    return (values * absmax[:, None]).view(-1)[:n]  # [n]


def adamw_update(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float) -> tuple[Tensor, Tensor, Tensor]:
    """One AdamW step (Loshchilov & Hutter 2019), op for op as torch.optim.AdamW's single-tensor path.

    p, g, m, v: float32, same shape; step counts from 1. Returns new (p, m, v); the inputs are not changed.
    """
    p = p * (1 - lr * weight_decay)  # decoupled weight decay
    m = m.lerp(g, 1 - beta1)
    v = (v * beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
    return p.addcdiv(m, denom, value=-lr / bias_correction1), m, v


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments are stored in 8 bit, blockwise (see the module docstring); TRL's `adamw_8bit`.

    `paged=True` is TRL's `paged_adamw_8bit`. bnb's paged optimizers keep the state in CUDA unified memory,
    which the driver pages out to the CPU under GPU memory pressure. Here the state of CUDA parameters lives
    in pinned CPU memory and comes to the GPU a chunk of parameters at a time inside `step` (and goes back), so it
    takes no GPU memory while the forward and backward run, where a GRPO step's peak is: 2 bytes per
    trainable parameter (70 MiB for Qwen2.5-1.5B at LoRA r=32). The update is the same, op for op.

    State per parameter, only tensors and ints (so `torch.load(weights_only=True)` reads it back):
    `step` (int) and, for >= min_8bit_size elements, `state1` / `state2` (uint8 [numel], the codes of
    the first / second moment, bnb's names) with `absmax1` / `absmax2` (float32 [ceil(numel / 256)]);
    for smaller parameters `exp_avg` / `exp_avg_sq` (float32, the parameter's shape, torch's names).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE, paged: bool = False):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid {type(self).__name__} hyperparameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)
        self.paged = paged
        self._codes: dict[torch.device, tuple[Tensor, Tensor]] = {}  # device -> (signed, unsigned) maps
        self._zero_codes = (_zero_code(dynamic_code()), _zero_code(unsigned_dynamic_code()))  # (no device sync)

    def _maps(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._codes:
            self._codes[device] = (dynamic_code(device), unsigned_dynamic_code(device))
        return self._codes[device]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"])
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            for p in params:
                if not self.state[p]:
                    eight_bit = p.numel() >= group["min_8bit_size"]
                    self.state[p].update({k: _placed(v, p, self.paged) if torch.is_tensor(v) else v
                                          for k, v in init_state(p, eight_bit).items()})
            for chunk in update_chunks(params, [self.state[p] for p in params]):
                self._step_chunk(chunk, hyper)
        for device in {p.device for g in self.param_groups for p in g["params"] if _pages(p, self.paged)}:
            if device.type == "cuda":  # the paged state's copies back are done: the CPU may read it
                torch.cuda.current_stream(device).synchronize()
        return loss

    def _step_chunk(self, params: list[Tensor], hyper: dict) -> None:
        """One update of `params` (one device, one kind of state, one step count; `update_chunks`) and their state,
        on their values laid end to end: op for op the update of each alone, as the blocks are each one's own.
        The moments are rebuilt, never changed in place: a parameter's new state tensors are views of the chunk's
        new buffers (the next step finds them laid out and copies nothing), or, paged, of pinned buffers laid out
        alike (one copy each way a chunk; `_kept_in`)."""
        device, states = params[0].device, [self.state[p] for p in params]
        sizes = [p.numel() for p in params]
        segments = [-(-n // BLOCKSIZE) * BLOCKSIZE for n in sizes]  # each parameter's whole blocks
        blocks = [n // BLOCKSIZE for n in segments]
        step = states[0]["step"] + 1
        g = gather([p.grad for p in params], segments, torch.float32, device)  # [S] float32, S = sum(segments)
        p32 = gather([p.detach() for p in params], segments, torch.float32, device)  # [S]
        eight_bit = "state1" in states[0]
        if eight_bit:
            signed, unsigned = self._maps(device)
            zero1, zero2 = self._zero_codes
            m = dequantize_blockwise(gather([s["state1"] for s in states], segments, torch.uint8, device, zero1),
                                     gather([s["absmax1"] for s in states], blocks, torch.float32, device), signed)
            v = dequantize_blockwise(gather([s["state2"] for s in states], segments, torch.uint8, device, zero2),
                                     gather([s["absmax2"] for s in states], blocks, torch.float32, device), unsigned)
        else:
            m = gather([s["exp_avg"] for s in states], segments, torch.float32, device)  # [S]
            v = gather([s["exp_avg_sq"] for s in states], segments, torch.float32, device)  # [S]
        new_p, m, v = adamw_update(p32, g, m, v, step, **hyper)
        torch._foreach_copy_(params, [t.view(p.shape) for t, p in zip(pieces(new_p, sizes, segments), params)])
        if eight_bit:
            (codes1, absmax1), (codes2, absmax2) = quantize_blockwise(m, signed), quantize_blockwise(v, unsigned)
            flat = [(codes1, segments), (absmax1, blocks), (codes2, segments), (absmax2, blocks)]
            new_state = dict(zip(("state1", "absmax1", "state2", "absmax2"), flat))
        else:
            new_state = {"exp_avg": (m, segments), "exp_avg_sq": (v, segments)}
        for state in states:
            state["step"] = step
        for key, (values, key_segments) in new_state.items():
            kept = [s[key] for s in states]
            placed = _kept_in(values, kept, key_segments, paged=_pages(params[0], self.paged))
            if placed is kept[0]._base:
                continue  # the pinned buffer they are views of has the new values: the views stay
            for state, t, piece in zip(states, kept, pieces(placed, [t.numel() for t in kept], key_segments)):
                state[key] = piece.view(t.shape)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that state tensors keep their dtype (only their device follows the parameter).

        torch's `Optimizer.load_state_dict` casts every state tensor of a floating-point parameter to the
        parameter's dtype, which would turn the uint8 codes into floats and round a bf16 parameter's
        float32 absmax; so the groups go through torch's method and the state is placed here.
        """
        super().load_state_dict({**state_dict, "state": {}})
        for group in self.param_groups:  # (a torch AdamW state dict's groups lack min_8bit_size)
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            if i in state_dict["state"]:
                saved = dict(state_dict["state"][i])
                saved["step"] = int(saved["step"])  # torch.optim.AdamW's state keeps it as a float tensor
                self.state[p] = {k: _placed(v, p, self.paged) if torch.is_tensor(v) else v for k, v in saved.items()}


class PagedAdamW32bit(AdamW8bit):
    """TRL's `paged_adamw_32bit`: torch's AdamW (float32 moments `exp_avg` / `exp_avg_sq`, the update op for
    op) with `AdamW8bit`'s paging: a CUDA parameter's moments live in pinned CPU memory and come to the GPU
    a chunk of parameters at a time inside `step`, so they take no GPU memory during the forward and backward (8
    bytes per trainable parameter: 280 MiB for Qwen2.5-1.5B at LoRA r=32). Its state dict is torch AdamW's
    layout, and a torch AdamW state dict loads into it (a run resumed from a checkpoint of either)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         min_8bit_size=sys.maxsize, paged=True)


def update_chunks(params: list[Tensor], states: list[dict]) -> list[list[Tensor]]:
    """The parameters cut into lists updated together: one device, one kind of state (8-bit or float32 moments)
    and one step count each, in order, at most CHUNK_ELEMENTS values (a larger parameter alone)."""
    by_kind: dict[tuple, list[Tensor]] = {}
    for p, state in zip(params, states):
        by_kind.setdefault((p.device, "state1" in state, state["step"]), []).append(p)
    chunks: list[list[Tensor]] = []
    for group in by_kind.values():
        size = CHUNK_ELEMENTS
        for p in group:
            if size + p.numel() > CHUNK_ELEMENTS:
                chunks.append([])
                size = 0
            chunks[-1].append(p)
            size += p.numel()
    return chunks


def gather(tensors: list[Tensor], segments: list[int], dtype: torch.dtype, device: torch.device,
           fill: int = 0) -> Tensor:
    """[sum(segments)] of `dtype` on `device`: tensor i, flattened, at the start of segment i, the rest `fill`.
    Where the tensors are already views laid out so in one such buffer (`pieces`), that buffer itself, or one
    copy of it from another device (paged state in pinned memory)."""
    base = laid_out(tensors, segments, dtype)
    if base is not None:
        return base if base.device == device else base.to(device, non_blocking=True)
    if all(t.device == device for t in tensors):  # one torch.cat (a few launches) with the padding between
        source = tensors[0].dtype if len({t.dtype for t in tensors}) == 1 else dtype
        padding = torch.full((max(segments),), fill, dtype=source, device=device)
        parts = []
        for t, segment in zip(tensors, segments):
            parts += [t.reshape(-1).to(source), padding[:segment - t.numel()]]
        return torch.cat(parts).to(dtype)
    return copied_in(tensors, segments, dtype, device, fill)


def laid_out(tensors: list[Tensor], segments: list[int], dtype: torch.dtype) -> Tensor | None:
    """The 1-D `dtype` buffer whose segments (`pieces`) the tensors are, in order, if they are; else None."""
    base = tensors[0]._base
    if base is None or base.dtype != dtype or base.dim() != 1 or base.numel() != sum(segments):
        return None
    offset = base.storage_offset()
    for t, segment in zip(tensors, segments):
        if t._base is not base or t.storage_offset() != offset or not t.is_contiguous():
            return None
        offset += segment
    return base


def copied_in(tensors: list[Tensor], segments: list[int], dtype: torch.dtype, device: torch.device,
              fill: int = 0) -> Tensor:
    """`gather`'s buffer made by one copy per tensor, for tensors on another device (paged state in pinned CPU
    memory: each copy to the GPU is asynchronous)."""
    flat = torch.full((sum(segments),), fill, dtype=dtype, device=device)  # [sum(segments)]
    for part, t in zip(pieces(flat, [t.numel() for t in tensors], segments), tensors):
        part.copy_(t.reshape(-1), non_blocking=True)
    return flat


def pieces(flat: Tensor, sizes: list[int], segments: list[int]) -> list[Tensor]:
    """Views of `flat`: the first sizes[i] values of segment i."""
    out, offset = [], 0
    for n, segment in zip(sizes, segments):
        out.append(flat[offset:offset + n])
        offset += segment
    return out


def _zero_code(code: Tensor) -> int:
    """The index of 0.0 in a dynamic map: the padding's code, so padded values dequantise to exactly 0."""
    return int(torch.nonzero(code == 0)[0])


def _pages(p: Tensor, paged: bool) -> bool:
    """Whether p's state lives in pinned CPU memory (paged, for a CUDA parameter)."""
    return paged and p.is_cuda


def _kept_in(values: Tensor, kept: list[Tensor], segments: list[int], paged: bool) -> Tensor:
    """Where a chunk's new state buffer `values` (on the parameters' device) is kept: itself, or, paged, a pinned
    CPU buffer laid out alike: the one the state `kept` is views of (the copy back is one copy), else a new one
    (a chunk's first step, or its parameters changed)."""
    if not paged:
        return values
    host = laid_out(kept, segments, values.dtype)  # (paged state is always in CPU memory: `_placed`)
    if host is None:
        host = torch.empty(values.shape, dtype=values.dtype).pin_memory()  # [sum(segments)]
    return host.copy_(values, non_blocking=True)


def _placed(t: Tensor, p: Tensor, paged: bool) -> Tensor:
    """A state tensor where p's state lives: pinned CPU memory when paged, else p's device."""
    return t.cpu().pin_memory() if _pages(p, paged) else t.to(p.device)


def init_state(p: Tensor, eight_bit: bool) -> dict:
    """A parameter's zero state: the codes of 0.0 with absmax 0 in 8 bit, else float32 zeros."""
    if not eight_bit:
        zeros = torch.zeros(p.shape, dtype=torch.float32, device=p.device)  # p's shape
        return {"step": 0, "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
    zeros = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)  # [n]
    state1, absmax1 = quantize_blockwise(zeros, dynamic_code(p.device))
    state2, absmax2 = quantize_blockwise(zeros, unsigned_dynamic_code(p.device))
    return {"step": 0, "state1": state1, "absmax1": absmax1, "state2": state2, "absmax2": absmax2}

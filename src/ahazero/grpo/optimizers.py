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
itself); no `amsgrad`, `maximize`, per-parameter overrides or percentile clipping.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.nf4 import dynamic_code

BLOCKSIZE = 256  # values per absmax (bnb's blockwise optimizers)
MIN_8BIT_SIZE = 4096  # bnb's `min_8bit_size`: smaller parameters keep float32 moments


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
    in pinned CPU memory and comes to the GPU one parameter at a time inside `step` (and goes back), so it
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
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                self._step_param(p, self.state[p], group["min_8bit_size"], hyper)
        for device in {p.device for g in self.param_groups for p in g["params"] if _pages(p, self.paged)}:
            if device.type == "cuda":  # the paged state's copies back are done: the CPU may read it
                torch.cuda.current_stream(device).synchronize()
        return loss

    def _step_param(self, p: Tensor, state: dict, min_8bit_size: int, hyper: dict) -> None:
        """One update of p and its state; the moments are rebuilt, never changed in place."""
        eight_bit = p.numel() >= min_8bit_size
        if not state:
            state.update({k: _placed(v, p, self.paged) if torch.is_tensor(v) else v
                          for k, v in init_state(p, eight_bit).items()})
        paged, pinned = _pages(p, self.paged), state
        if paged:  # this parameter's state, to the GPU for its update
            state = {k: v.to(p.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in state.items()}
        state["step"] += 1
        g = p.grad.reshape(-1).float()  # [n]
        if eight_bit:
            signed, unsigned = self._maps(p.device)
            m = dequantize_blockwise(state["state1"], state["absmax1"], signed)  # [n] float32
            v = dequantize_blockwise(state["state2"], state["absmax2"], unsigned)  # [n] float32
        else:
            m, v = state["exp_avg"].reshape(-1), state["exp_avg_sq"].reshape(-1)  # [n] float32
        new_p, m, v = adamw_update(p.detach().reshape(-1).float(), g, m, v, state["step"], **hyper)
        p.copy_(new_p.view(p.shape))
        if eight_bit:
            state["state1"], state["absmax1"] = quantize_blockwise(m, signed)
            state["state2"], state["absmax2"] = quantize_blockwise(v, unsigned)
        else:
            state["exp_avg"], state["exp_avg_sq"] = m.view(p.shape), v.view(p.shape)
        if paged:  # and back into its pinned buffers (same shapes: the codes and absmax keep their sizes)
            pinned["step"] = state["step"]
            for key, value in state.items():
                if torch.is_tensor(value):
                    pinned[key].copy_(value, non_blocking=True)

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
    one parameter at a time inside `step`, so they take no GPU memory during the forward and backward (8
    bytes per trainable parameter: 280 MiB for Qwen2.5-1.5B at LoRA r=32). Its state dict is torch AdamW's
    layout, and a torch AdamW state dict loads into it (a run resumed from a checkpoint of either)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         min_8bit_size=sys.maxsize, paged=True)


def _pages(p: Tensor, paged: bool) -> bool:
    """Whether p's state lives in pinned CPU memory (paged, for a CUDA parameter)."""
    return paged and p.is_cuda


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

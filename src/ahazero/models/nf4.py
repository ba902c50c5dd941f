"""NF4 quantisation with double-quantised absmax, in the bitsandbytes layout.

Follows QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) as bitsandbytes implements it in
`bitsandbytes.functional.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)`,
which is what transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)` checkpoints store:

- the weight, flattened row-major, is cut into blocks of 64; each block is scaled by 1/absmax (a
  multiply by the float32 reciprocal, as bnb's kernels do) and every value is rounded to the nearest
  of the 16 NF4 values (ties go to the lower code, bnb's `x > midpoint` test);
- two codes per byte, the even element in the high nibble: `byte = code[2i] << 4 | code[2i + 1]`;
  an odd element count is padded with one 0.0 (code 7); stored as uint8 of shape [ceil(n / 2), 1];
- the float32 absmax per 64-block has its mean (`offset`) subtracted and is quantised again, per block
  of 256, to 8 bit with bnb's signed dynamic map (`create_dynamic_map()`), leaving one float32 absmax
  per 256-block (`state2.absmax`).

Dequantisation computes as bnb does: absmax = dyn_code[q] * absmax2 + offset, w = nf4[q] * absmax, all
in float32, cast to the stored dtype at the end; so it is bit-identical to bnb's, not only close.

Simplified: only NF4 (no FP4), only uint8 storage (no `quant_storage=bfloat16` view). An all-zero block
is scaled by 1/1e-38 (bnb's PyTorch path), so its codes are 7 (0.0) and it dequantises to exact zeros.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCKSIZE = 64  # values per absmax (bnb_4bit default)
NESTED_BLOCKSIZE = 256  # absmax values per second-level absmax (fixed in bnb's quantize_4bit)

# The 16 NF4 values (bitsandbytes `get_4bit_type("nf4")`, QLoRA appendix E), sorted, code i = NF4_VALUES[i].
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The NF4 table as float32, [16]."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """bnb's signed 8-bit dynamic map (`create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`).

    Dettmers 2015 (https://arxiv.org/abs/1511.04561): for exponent e = 10^(i-6), i = 0..6, the 2^i
    midpoints of linspace(0.1, 1, 2^i + 1) times +-e, plus 0 and 1; 256 sorted float32 values. Built with
    the same float32 steps as bnb so that the table is bit-identical.
    """
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)  # [2^i + 1]
        means = (bounds[:-1] + bounds[1:]) / 2.0  # [2^i]
        data += ((10 ** (i - 6)) * means).tolist()
        data += (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)  # [256]


@dataclass
class QuantState:
    """What bnb's `QuantState` holds for a double-quantised NF4 weight (same field names).

    absmax: uint8 [ceil(n / blocksize)], 8-bit codes of (absmax - offset) in `nested_code`.
    shape, dtype: the original weight's. code: the NF4 table [16]. offset: float32 scalar tensor.
    nested_absmax: float32 [ceil(len(absmax) / nested_blocksize)]. nested_code: dynamic map [256].
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    offset: torch.Tensor
    nested_absmax: torch.Tensor
    code: torch.Tensor
    nested_code: torch.Tensor
    blocksize: int = BLOCKSIZE
    nested_blocksize: int = NESTED_BLOCKSIZE
    quant_type: str = "nf4"

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a bnb/transformers checkpoint stores next to `<name>.weight`, keyed by suffix.

        Same as bnb's `QuantState.as_dict(packed=True)`: the non-tensor fields go as UTF-8 JSON bytes
        in `quant_state.bitsandbytes__nf4`.
        """
        meta = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape),
            "nested_blocksize": self.nested_blocksize,
            "nested_dtype": "float32",
            "nested_offset": self.offset.item(),
        }
        packed = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)  # [bytes]
        return {
            "absmax": self.absmax,
            "quant_map": self.code,
            "nested_absmax": self.nested_absmax,
            "nested_quant_map": self.nested_code.clone(),
            "quant_state.bitsandbytes__nf4": packed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], device: torch.device | str | None = None) -> QuantState:
        """Inverse of `as_dict`: reads the suffixes a `*-bnb-4bit` checkpoint stores for one weight."""
        meta = json.loads(bytes(d["quant_state.bitsandbytes__nf4"].cpu().tolist()).decode("utf-8"))
        if meta["quant_type"] != "nf4" or "nested_absmax" not in d or meta.get("nested_dtype") != "float32":
            raise ValueError(f"only double-quantised nf4 is supported, got {meta}")
        device = device if device is not None else d["absmax"].device
        return cls(
            absmax=d["absmax"].to(device),
            shape=torch.Size(meta["shape"]),
            dtype=getattr(torch, meta["dtype"]),
            offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=device),
            nested_absmax=d["nested_absmax"].to(device),
            code=d["quant_map"].to(device),
            nested_code=d["nested_quant_map"].to(device),
            blocksize=int(meta["blocksize"]),
            nested_blocksize=int(meta["nested_blocksize"]),
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _quantize_blocks(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantisation of a flat float32 x to the nearest entry of a sorted code.

    x: [n] float32. Returns codes int64 [nb * blocksize] (the tail padded with 0.0) and absmax float32 [nb].
    """
    nb = -(-x.numel() // blocksize)
    blocks = F.pad(x, (0, nb * blocksize - x.numel())).view(nb, blocksize)  # [nb, bs]
    absmax = blocks.abs().amax(dim=1)  # [nb]
    scale = 1.0 / absmax.clamp(min=1e-38)  # [nb] the reciprocal, then a multiply, as bnb's kernels do
    scaled = (blocks * scale[:, None]).clamp(-1, 1).view(-1)  # [nb * bs]
    midpoints = (code[:-1] + code[1:]) / 2  # [len(code) - 1] float32, as bnb computes them
    return torch.bucketize(scaled, midpoints), absmax  # x == midpoint goes to the lower code


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, QuantState]:
    """NF4 with double-quantised absmax, bit-identical to bnb's `quantize_4bit(..., compress_statistics=True)`.

    weight: any shape, float32/float16/bfloat16, n elements. Returns packed uint8 [ceil(n / 2), 1] and
    the QuantState.
    """
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_nf4 takes float32/float16/bfloat16, got {weight.dtype}")
    n, device = weight.numel(), weight.device
    code, dyn = nf4_code(device), dynamic_code(device)
    q, absmax = _quantize_blocks(weight.reshape(-1).float(), code, BLOCKSIZE)  # [nb*64], [nb]
    q = q[: n + n % 2].to(torch.uint8)  # [n rounded up to even]; the pad is code 7 (0.0)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)  # [ceil(n/2), 1]
    offset = absmax.mean()  # [] float32
    q2, absmax2 = _quantize_blocks(absmax - offset, dyn, NESTED_BLOCKSIZE)  # [nb2*256], [nb2]
    state = QuantState(
        absmax=q2[: absmax.numel()].to(torch.uint8),  # [nb]
        shape=weight.shape,
        dtype=weight.dtype,
        offset=offset,
        nested_absmax=absmax2,
        code=code,
        nested_code=dyn,
    )
    return packed, state


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The float32 absmax per block, [nb]: dyn_code[q] * absmax2 + offset, as bnb's dequantize_4bit."""
    nb, bs2 = state.absmax.numel(), state.nested_blocksize
    vals = state.nested_code[state.absmax.long()]  # [nb]
    scale = state.nested_absmax.repeat_interleave(bs2)[:nb]  # [nb]
    return vals * scale + state.offset  # [nb]


def dequantize_nf4(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Inverse of `quantize_nf4`, bit-identical to bnb's `dequantize_4bit`.

    packed: uint8 [ceil(n / 2), 1] (any shape with those bytes). Returns state.dtype, state.shape.
    Each byte indexes a [256, 2] table of its two NF4 values (high nibble first), so the only full-size
    temporaries are the float32 values and the output; the products are the same float32 `code * absmax`.
    """
    n, bs = state.shape.numel(), state.blocksize
    pairs = byte_table(state.code)[packed.reshape(-1).int()]  # [ceil(n/2), 2] float32
    values = pairs.view(-1)[:n]  # [n]
    absmax = dequantize_absmax(state)  # [nb]
    nb_full = n // bs
    w = torch.empty(n, dtype=torch.float32, device=packed.device)  # [n]
    w[: nb_full * bs].view(nb_full, bs).copy_(values[: nb_full * bs].view(nb_full, bs)).mul_(absmax[:nb_full, None])
    if n > nb_full * bs:  # the short tail block
        torch.mul(values[nb_full * bs :], absmax[nb_full], out=w[nb_full * bs :])
    return w.to(state.dtype).view(state.shape)


def byte_table(code: torch.Tensor) -> torch.Tensor:
    """[256, 2]: the two table values a packed byte stands for, high nibble first."""
    byte = torch.arange(256, device=code.device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)

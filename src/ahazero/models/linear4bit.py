"""4-bit base weights (QLoRA): an nn.Linear whose weight is NF4 in the bitsandbytes layout, and the model
surgery that puts it in place, from a 16-bit checkpoint or from a `*-bnb-4bit` one.

`Linear4bit` keeps only the packed uint8 weight and its double-quantised absmax (0.53 bytes per weight
instead of 2). Its forward dequantises into a temporary, multiplies, and frees it; its backward
dequantises again for the input gradient (the base weight is frozen), so no 16-bit copy of a weight
outlives one matmul, in training or in the engine (which calls the module as it calls any linear).
It subclasses nn.Linear so that PEFT wraps it in its plain `lora.Linear` (LoRA unmerged, on top of our
forward) and so that our engine and exporters see an ordinary linear layer with a different weight.

Its state dict has bitsandbytes' / transformers' names: `<name>.weight` (the packed bytes) and
`<name>.weight.absmax`, `.quant_map`, `.nested_absmax`, `.nested_quant_map`,
`.quant_state.bitsandbytes__nf4` (see nf4.QuantState.as_dict), so the tensors of a
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`
checkpoint load into it as they are, and what it saves loads in transformers.

Dynamic 4-bit: embeddings, lm_head and norms stay in 16 bit. Every other linear layer is quantised
unless its relative quantisation error ||W - deq(q(W))||_F / ||W||_F is an outlier: above
`OUTLIER_FACTOR` times the median error over all candidate layers. The Frobenius ratio is the relative
output error for an isotropic input. NF4 on bell-shaped weights gives 0.09-0.11 for every layer (Gaussian
0.092, Laplace 0.105, Student-t(2) 0.112); a layer with an outlier of 8-16 standard deviations in every
64-block (the outlier features of Dettmers et al. 2022, https://arxiv.org/abs/2208.07339), which
flattens the rest of each block towards zero, shows 0.14-0.18, so the factor 1.5 separates the two.
(A handful of isolated huge weights barely moves this ratio, and NF4 keeps them exactly: each is its
block's absmax.) The choice is logged and kept on the model (`model.ahazero_quantization`).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .nf4 import QuantState, dequantize_nf4, quantize_nf4

logger = logging.getLogger("ahazero")

OUTLIER_FACTOR = 1.5
_STATE_BUFFERS = ("absmax", "nested_absmax", "offset", "code", "nested_code")
STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")
_KEEP_16BIT = re.compile(r"(^|\.)(lm_head|embed_tokens|wte|wpe|word_embeddings|embed_out|output)$")


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T (+ b) with W dequantised on the fly in forward and again in backward (W, b frozen)."""

    @staticmethod
    def forward(ctx, x, module):
        # the output is never a view (LoRA adds its term into it in place, which autograd forbids on a view
        # made inside a custom Function)
        ctx.module = module
        rows, shape = x.numel() // x.shape[-1], (*x.shape[:-1], module.out_features)
        if module.use_fused_kernel(x.device) and rows <= _fused().MAX_ROWS:  # decode: the fused GEMV
            y = _fused().nf4_gemv(x.reshape(rows, -1), [module.nf4_weight()])[0]  # [rows, out]
            return torch.ops.aten._unsafe_view(y, shape)
        weight = module.dequantized_weight(x.dtype)  # [out, in], a temporary
        y = x.new_empty(shape)  # [..., out]
        x_2d, y_2d = x.reshape(rows, -1), y.view(rows, -1)  # [rows, in], [rows, out]
        if module.bias is None:
            torch.mm(x_2d, weight.t(), out=y_2d)
        else:
            torch.addmm(module.bias.to(x.dtype), x_2d, weight.t(), out=y_2d)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        weight = ctx.module.dequantized_weight(grad_out.dtype)  # [out, in], recomputed
        return grad_out @ weight, None  # [..., in]


def _fused():
    from . import nf4_kernels
    return nf4_kernels


def random_linear(in_features: int, out_features: int, dtype: torch.dtype, device: torch.device,
                  generator: torch.Generator) -> nn.Linear:
    """An nn.Linear with weight ~ N(0, 1/in) and bias ~ N(0, 1) drawn from `generator` only (the kernels'
    self-checks: the caller's random state is left as it was)."""
    linear = torch.nn.utils.skip_init(nn.Linear, in_features, out_features, dtype=dtype, device=device)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, device=device, generator=generator)
                            * in_features ** -0.5)
        linear.bias.copy_(torch.randn(out_features, device=device, generator=generator))
    return linear


@functools.cache
def _fused_kernel_checked(device: torch.device) -> bool:
    """Once per device, before the fused kernel serves by default: its output on random inputs (several
    batch sizes, split K, repeated calls) against dequantise-then-matmul. A mismatch turns it off for the
    process, with a warning: 4-bit decode then runs the slower plain path, never a wrong one."""
    gen = torch.Generator(device=device).manual_seed(0)
    layer = Linear4bit.from_linear(random_linear(1152, 200, torch.bfloat16, device, gen))
    weight = layer.dequantized_weight().float()  # [200, 1152]
    worst = 0.0
    try:
        for rows in (1, 7, 32, 32, 64):
            x = torch.randn(rows, 1152, device=device, dtype=torch.bfloat16, generator=gen)  # [rows, 1152]
            got = _fused().nf4_gemv(x, [layer.nf4_weight()])[0].float()
            want = x.float() @ weight.t() + layer.bias.float()  # [rows, 200]
            worst = max(worst, ((got - want).norm() / want.norm()).item())
    except Exception as err:  # noqa: BLE001 - e.g. the kernel does not compile for this GPU
        logger.warning("the fused NF4 kernel failed on %s (%s: %s); 4-bit decode uses the plain path",
                       device, type(err).__name__, err)
        return False
    if not worst < 1e-2:  # bf16 rounding of the output gives ~3e-3
        logger.warning("the fused NF4 kernel disagrees with dequantise-then-matmul on %s (relative error %.2e); "
                       "4-bit decode uses the plain path", device, worst)
        return False
    return True


@functools.cache
def _dequant_kernel_checked(device: torch.device) -> bool:
    """Once per device, before the one-launch dequantise kernel serves by default: its output on random
    weights (bf16 and float32, a short last block) against nf4.dequantize_nf4, bit for bit. A failure or a
    mismatch turns it off for the process, with a warning: the torch path serves, never a different weight."""
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        for shape, dtype in (((200, 1152), torch.bfloat16), ((7, 99), torch.float32)):
            layer = Linear4bit.from_linear(random_linear(shape[1], shape[0], dtype, device, gen))
            got = layer.dequantize_with_kernel()
            if not torch.equal(got, dequantize_nf4(layer.weight, layer.quant_state)):
                logger.warning("the NF4 dequantise kernel disagrees with the torch path on %s; 4-bit layers "
                               "dequantise with torch", device)
                return False
    except Exception as err:  # noqa: BLE001 - e.g. the kernel does not compile for this GPU
        logger.warning("the NF4 dequantise kernel failed on %s (%s: %s); 4-bit layers dequantise with torch",
                       device, type(err).__name__, err)
        return False
    return True


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


class Linear4bit(nn.Linear):
    """A frozen linear layer with an NF4 weight (bitsandbytes layout); see the module docstring.

    `fused_kernel`: None (default) runs inputs of at most `nf4_kernels.MAX_ROWS` rows through the fused
    Triton dequantise-and-multiply kernel on CUDA where Triton is installed; True forces it on any
    device (the CPU tests, through Triton's interpreter); False never uses it. Either way only weights
    the kernel supports (in_features % 64 == 0, bitsandbytes' blocksizes) take it.
    """

    fused_kernel: bool | None = None
    # the same choice for the one-launch dequantise (nf4_kernels.dequantize); env AHAZERO_DEQUANT_KERNEL=0: False
    dequant_kernel: bool | None = None if os.environ.get("AHAZERO_DEQUANT_KERNEL", "1") != "0" else False

    def use_fused_kernel(self, device: torch.device) -> bool:
        if self.fused_kernel is False or (self.fused_kernel is None and (device.type != "cuda" or not _has_triton())):
            return False
        meta = self.quant_meta
        if not _fused().supports(self.in_features, meta["blocksize"], meta["nested_blocksize"]):
            return False
        return self.fused_kernel is True or _fused_kernel_checked(device)

    def __init__(self, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = state.shape
        self.weight = nn.Parameter(packed, requires_grad=False)  # uint8 [ceil(out*in/2), 1]
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._set_state(state)

    def _set_state(self, state: QuantState) -> None:
        self.quant_meta = dict(shape=state.shape, dtype=state.dtype, blocksize=state.blocksize,
                               nested_blocksize=state.nested_blocksize)
        # buffers, so that .to(device) moves them with the weight
        self.register_buffer("absmax", state.absmax)  # uint8 [nb]
        self.register_buffer("nested_absmax", state.nested_absmax)  # float32 [nb2]
        self.register_buffer("offset", state.offset.reshape(()))  # float32 []
        self.register_buffer("code", state.code)  # float32 [16]
        self.register_buffer("nested_code", state.nested_code)  # float32 [256]

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the quantisation state; `.to(dtype)` / `.half()` never recast it (its float32
        tables are part of the format), only the bias."""
        state = {name: self._buffers.pop(name) for name in _STATE_BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update({name: t.to(self.weight.device) for name, t in state.items()})
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Linear4bit:
        packed, state = quantize_nf4(linear.weight.detach())
        return cls(packed, state, linear.bias)

    @property
    def quant_state(self) -> QuantState:
        return QuantState(absmax=self.absmax, offset=self.offset, nested_absmax=self.nested_absmax,
                          code=self.code, nested_code=self.nested_code, **self.quant_meta)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.quant_meta["dtype"]

    def nf4_weight(self):
        """The weight as the fused kernel takes it (models/nf4_kernels.py's NF4Weight): views, no copies."""
        return _fused().NF4Weight(self.weight.view(-1), self.absmax, self.nested_absmax, self.offset, self.code,
                                  self.nested_code, self.out_features, self.bias)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] in its original dtype (bit-identical to bnb), cast to `dtype` if given."""
        if self.use_dequant_kernel(self.weight.device):
            w = self.dequantize_with_kernel()
        else:
            w = dequantize_nf4(self.weight, self.quant_state)
        return w if dtype is None or dtype == w.dtype else w.to(dtype)

    def use_dequant_kernel(self, device: torch.device) -> bool:
        """`dequant_kernel`: None (default) dequantises in one Triton launch on CUDA where Triton is installed
        and the kernel passed its check; True forces it on any device (the CPU tests, through Triton's
        interpreter); False keeps the torch path."""
        if self.dequant_kernel is not None:
            return self.dequant_kernel
        return device.type == "cuda" and _has_triton() and _dequant_kernel_checked(device)

    def dequantize_with_kernel(self) -> torch.Tensor:
        meta = self.quant_meta
        return _fused().dequantize(self.weight, self.absmax, self.nested_absmax, self.offset, self.code,
                                   self.nested_code, meta["shape"], meta["dtype"], meta["blocksize"],
                                   meta["nested_blocksize"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"Linear4bit takes a floating input, got {x.dtype}")
        return _NF4Matmul.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, dtype={self.compute_dtype}"

    # -- bitsandbytes state-dict names -----------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for suffix, tensor in self.quant_state.as_dict().items():
            destination[f"{prefix}weight.{suffix}"] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = [f"{prefix}weight.{s}" for s in STATE_SUFFIXES]
        missing = [k for k in [prefix + "weight", *keys] if k not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        state = QuantState.from_dict({s: state_dict[k] for s, k in zip(STATE_SUFFIXES, keys)},
                                     device=self.weight.device)
        if tuple(state.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: 4-bit shape {tuple(state.shape)} != "
                              f"({self.out_features}, {self.in_features})")
            return
        device = self.weight.device
        self.weight = nn.Parameter(state_dict[prefix + "weight"].to(device), requires_grad=False)
        if self.bias is not None and prefix + "bias" in state_dict:
            with torch.no_grad():
                self.bias.copy_(state_dict[prefix + "bias"])
        self._set_state(state)


# --- model surgery ------------------------------------------------------------------------------------

@dataclass
class QuantizationReport:
    """What `quantize_model` did: relative error per candidate layer and the layers kept in 16 bit."""
    errors: dict[str, float] = field(default_factory=dict)
    kept_16bit: list[str] = field(default_factory=list)
    threshold: float = float("nan")

    @property
    def quantized(self) -> list[str]:
        return [n for n in self.errors if n not in self.kept_16bit]


def relative_error(weight: torch.Tensor, packed: torch.Tensor | None = None, state: QuantState | None = None) -> float:
    """||W - deq(q(W))||_F / ||W||_F of NF4 quantisation (0 for an all-zero weight); `packed, state` are
    q(W) when already computed."""
    if packed is None:
        packed, state = quantize_nf4(weight)
    w = weight.float()
    norm = torch.linalg.vector_norm(w)
    diff = torch.linalg.vector_norm(dequantize_nf4(packed, state).float() - w)
    return float(diff / norm) if norm > 0 else 0.0


def outlier_layers(errors: dict[str, float], factor: float = OUTLIER_FACTOR) -> tuple[list[str], float]:
    """The layers whose error is above `factor` times the median error, and that threshold."""
    if not errors:
        return [], float("nan")
    values = sorted(errors.values())
    median = values[(len(values) - 1) // 2]
    threshold = factor * median
    return [name for name, e in errors.items() if e > threshold], threshold


def keeps_16bit(module_name: str) -> bool:
    """The output head and embedding-like layers, which 4-bit loading and saving never quantise."""
    return bool(_KEEP_16BIT.search(module_name))


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Plain nn.Linear modules except the output head and embeddings-like layers, by qualified name."""
    return {name: m for name, m in model.named_modules() if type(m) is nn.Linear and not keeps_16bit(name)}


def quantize_model(model: nn.Module, device: torch.device | str | None = None, dynamic: bool = True,
                   factor: float = OUTLIER_FACTOR) -> QuantizationReport:
    """Replace the model's linear layers by Linear4bit, one at a time on `device` (in place).

    With `dynamic`, layers whose NF4 error is an outlier (module docstring) stay in 16 bit.
    """
    linears = quantizable_linears(model)
    errors, quantized = {}, {}
    for name, linear in linears.items():  # one layer at a time on `device`; the 16-bit weights stay put
        weight = linear.weight.detach().to(device)
        quantized[name] = quantize_nf4(weight)
        errors[name] = relative_error(weight, *quantized[name]) if dynamic else 0.0
        del weight
    kept, threshold = outlier_layers(errors, factor) if dynamic else ([], float("nan"))
    for name, linear in linears.items():
        if name in kept:
            continue
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        _set_submodule(model, name, Linear4bit(*quantized.pop(name), bias))
        linear.weight = None  # free the 16-bit weight now, not when the model is done
    report = QuantizationReport(errors=errors, kept_16bit=kept, threshold=threshold)
    if kept:
        logger.warning("load_in_4bit: %d of %d linear layers stay in 16 bit (NF4 error above %.3f = %.1f x the "
                       "median): %s", len(kept), len(linears), threshold, factor, ", ".join(kept))
    else:
        logger.info("load_in_4bit: all %d linear layers in NF4 (median relative error %.3f)", len(linears),
                    threshold / factor if errors else float("nan"))
    return report


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def prequantized_linear_names(keys) -> list[str]:
    """The module names a bnb-4bit state dict stores as NF4 (those with a `.weight.quant_state...` key)."""
    suffix = ".weight.quant_state.bitsandbytes__nf4"
    return [k[: -len(suffix)] for k in keys if k.endswith(suffix)]


def install_prequantized(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Put a Linear4bit holding the checkpoint's NF4 tensors where the state dict has them; returns names."""
    names = prequantized_linear_names(state_dict)
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is 4-bit in the checkpoint but a {type(linear).__name__} in the model")
        state = QuantState.from_dict({s: state_dict[f"{name}.weight.{s}"] for s in STATE_SUFFIXES})
        if tuple(state.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"{name}: 4-bit weight of shape {tuple(state.shape)}, the model expects "
                             f"({linear.out_features}, {linear.in_features})")
        bias = state_dict.get(f"{name}.bias")
        _set_submodule(model, name, Linear4bit(state_dict[f"{name}.weight"], state, bias))
    return names


def is_4bit(model: nn.Module) -> bool:
    return any(isinstance(m, Linear4bit) for m in model.modules())

"""`save_gguf`: a folder of GGUF files, one per quantisation method, that llama.cpp runs.

f32 / f16 / bf16 / q8_0 are written directly by `gguf_writer.write_gguf` (quantised in Python). The
K-quants and the other llama.cpp types go through llama.cpp's own quantiser (`llama_model_quantize`
from llama-cpp-python, the `ahazero[llamacpp]` extra), fed a lossless GGUF in the weights' own dtype
that is deleted afterwards. Files are named `<model name>.<METHOD>.gguf`.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from .common import atomic_output_dir
from .gguf_writer import Q, vocab_for, write_gguf
from .weights import DEFAULT_ADAPTER, ModelWeights

PYTHON_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
LLAMA_CPP_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_0", "q4_1", "q4_k_s", "q4_k_m",
                   "q5_0", "q5_1", "q5_k_s", "q5_k_m", "q6_k")
ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m",   # Unsloth's names
           "q4_k": "q4_k_m", "q5_k": "q5_k_m", "f16_0": "f16"}
VALID_METHODS = (*PYTHON_TYPES, *LLAMA_CPP_TYPES, *ALIASES)
LLAMA_CPP_HINT = "pip install 'ahazero[llamacpp]' (llama-cpp-python; it compiles llama.cpp, several minutes)"


def quantization_methods(quantization_method) -> list[str]:
    """Normalised, validated, de-duplicated list of methods (a string or a list of them)."""
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    if not methods:
        raise ValueError(f"no quantization_method given; valid: {', '.join(VALID_METHODS)}")
    out = []
    for method in methods:
        name = str(method).lower()
        name = ALIASES.get(name, name)
        if name not in PYTHON_TYPES and name not in LLAMA_CPP_TYPES:
            raise ValueError(f"unknown quantization_method {method!r}; valid: {', '.join(VALID_METHODS)}")
        if name not in out:
            out.append(name)
    return out


def require_llama_cpp(method: str):
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(f"quantization_method {method!r} uses llama.cpp's quantiser, which needs "
                          f"llama-cpp-python: {LLAMA_CPP_HINT}") from e
    return llama_cpp


def save_gguf(model, path, tokenizer, quantization_method="q8_0", overwrite: bool = False,
              adapter_name: str = DEFAULT_ADAPTER) -> list[Path]:
    """Merge the LoRA adapter and write one GGUF per method into folder `path`; returns the files."""
    methods = quantization_methods(quantization_method)
    return write_gguf_folder(ModelWeights(model, adapter_name), tokenizer, path, methods, overwrite)


def write_gguf_folder(source, tokenizer, path, methods: list[str], overwrite: bool = False) -> list[Path]:
    """The GGUF files of `source`, written atomically into folder `path` (see module docstring)."""
    if tokenizer is None:
        raise ValueError("a GGUF file carries its tokenizer: pass the tokenizer")
    for method in methods:
        if method in LLAMA_CPP_TYPES:
            require_llama_cpp(method)               # fail before any work
    name = model_name(source.config)
    vocab = vocab_for(source, tokenizer)                # built once, shared by every file
    names = []
    with atomic_output_dir(path, "gguf", overwrite) as tmp:
        lossless = None
        for method in methods:
            out = tmp / f"{name}.{method.upper()}.gguf"
            if method in PYTHON_TYPES:
                write_gguf(source, vocab, out, PYTHON_TYPES[method], name)
            else:
                if lossless is None:
                    lossless = write_gguf(source, vocab, tmp / ".lossless.gguf", lossless_type(source.dtype), name)
                llama_cpp_quantize(lossless, out, method)
            names.append(out.name)
        if lossless is not None:
            lossless.unlink()
    return [Path(path) / n for n in names]


def lossless_type(dtype) -> Q:
    import torch
    return {torch.bfloat16: Q.BF16, torch.float16: Q.F16}.get(dtype, Q.F32)


def model_name(config) -> str:
    return Path(getattr(config, "_name_or_path", "") or "model").name or "model"


def llama_cpp_quantize(src: Path, dst: Path, method: str) -> Path:
    """Quantise GGUF `src` into `dst` with llama.cpp's `llama_model_quantize` (its own mixes, e.g. Q4_K_M)."""
    llama_cpp = require_llama_cpp(method)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{method.upper()}")
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0 or not dst.is_file():
        raise RuntimeError(f"llama.cpp failed to quantise {src.name} to {method} (status {status})")
    return dst

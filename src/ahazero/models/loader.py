"""Loading Hugging Face checkpoints (hub id or local folder) and attaching LoRA through PEFT."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def default_device() -> torch.device:
    """cuda:LOCAL_RANK under torchrun, else cuda, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None -> bfloat16 on a GPU that supports it, else float16 on GPU, float32 on CPU."""
    if isinstance(dtype, str):
        dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                 "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}.get(dtype, dtype)
        if isinstance(dtype, str):
            raise ValueError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32")
    if dtype is not None:
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_model_source(model_name: str) -> None:
    """A path-looking name must be a folder with a config.json; anything else is treated as a hub id."""
    looks_local = os.path.isabs(model_name) or model_name.startswith((".", "~")) or os.path.exists(model_name)
    if not looks_local:
        return
    path = Path(model_name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a transformers model folder")


def load_causal_lm(model_name: str, *, dtype=None, device=None, token=None, trust_remote_code=False,
                   revision=None):
    """(model, tokenizer) from a hub id or a local folder, weights on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    check_model_source(model_name)
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name, token=token, revision=revision,
                                                  trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype, token=token, revision=revision,
                                                     trust_remote_code=trust_remote_code, use_safetensors=None)
    except OSError as e:
        raise OSError(f"could not load model {model_name!r}: {e}") from e
    model.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def attach_lora(model, *, r: int, lora_alpha: float, target_modules, lora_dropout: float = 0.0,
                bias: str = "none", use_rslora: bool = False, random_state: int | None = None,
                modules_to_save=None, init_lora_weights=True):
    """A PEFT LoraConfig on `model`; returns the PeftModel (adapter "default")."""
    from peft import LoraConfig, get_peft_model
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    if random_state is not None:
        torch.manual_seed(random_state)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules) if target_modules else None,
                        lora_dropout=lora_dropout, bias=bias, use_rslora=use_rslora, task_type="CAUSAL_LM",
                        modules_to_save=modules_to_save, init_lora_weights=init_lora_weights)
    return get_peft_model(model, config)


def enable_gradient_checkpointing(model, mode) -> None:
    """mode: False | True (recompute each layer) | "offload"/"unsloth" (also keep layer inputs on the CPU).

    The offload itself happens around the training forward (`offload_context`); here the layers are set
    to recompute, which is what makes their inputs the only activations kept.
    """
    if mode in (None, False):
        return
    if mode not in (True, "offload", "unsloth"):
        raise ValueError(f"use_gradient_checkpointing must be True, False, 'offload' or 'unsloth', got {mode!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    model.ahazero_offload_activations = mode in ("offload", "unsloth")


def offload_context(model):
    """Saved activations go to (pinned) CPU memory while the training forward runs, when asked for."""
    from contextlib import nullcontext
    if getattr(model, "ahazero_offload_activations", False) and next(model.parameters()).is_cuda:
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return nullcontext()

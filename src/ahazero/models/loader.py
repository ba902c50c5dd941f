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
                   revision=None, load_in_4bit: bool = False):
    """(model, tokenizer) from a hub id or a local folder, weights on `device` in `dtype`.

    With `load_in_4bit`, the linear layers hold NF4 weights (models/linear4bit.py): a checkpoint that is
    already bitsandbytes-4bit loads its stored codes; a 16-bit one is quantised layer by layer on `device`.
    A bitsandbytes-4bit checkpoint loads in 4 bit even without the flag (its 16-bit weights do not exist).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    check_model_source(model_name)
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name, token=token, revision=revision,
                                                  trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(model_name, token=token, revision=revision,
                                            trust_remote_code=trust_remote_code)
        if bnb_4bit_settings(config) is not None:
            model = load_prequantized_4bit(model_name, config, dtype=dtype, token=token, revision=revision,
                                           trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype, token=token, revision=revision,
                                                         trust_remote_code=trust_remote_code, use_safetensors=None)
            if load_in_4bit:
                from .linear4bit import quantize_model
                model.ahazero_quantization = quantize_model(model, device)
    except OSError as e:
        raise OSError(f"could not load model {model_name!r}: {e}") from e
    model.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def bnb_4bit_settings(config) -> dict | None:
    """The checkpoint's bitsandbytes 4-bit `quantization_config` as a dict, None for an unquantised one.

    Raises for quantisations we cannot read (8-bit, FP4, single quantisation, GPTQ/AWQ...), naming them.
    """
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    method = str(q.get("quant_method", "")).rsplit(".", 1)[-1].lower()
    if method not in ("bitsandbytes", "bits_and_bytes") or not q.get("load_in_4bit", q.get("_load_in_4bit")):
        raise NotImplementedError(f"quantised checkpoint with quant_method={method!r} "
                                  f"(load_in_8bit={q.get('load_in_8bit')}): only bitsandbytes 4-bit NF4 "
                                  "checkpoints can be read; use the 16-bit checkpoint with load_in_4bit=True")
    if q.get("bnb_4bit_quant_type", "fp4") != "nf4" or not q.get("bnb_4bit_use_double_quant", False):
        raise NotImplementedError(f"4-bit checkpoint with bnb_4bit_quant_type={q.get('bnb_4bit_quant_type')!r}, "
                                  f"bnb_4bit_use_double_quant={q.get('bnb_4bit_use_double_quant')}: only "
                                  "double-quantised nf4 is supported")
    return q


def load_prequantized_4bit(model_name: str, config, *, dtype, token=None, revision=None, trust_remote_code=False):
    """A `*-bnb-4bit` checkpoint: the model built empty from its config, NF4 layers filled from the stored
    codes (no dequantise-requantise), every other tensor loaded in `dtype`. Runs on the CPU."""
    import copy

    from transformers import AutoModelForCausalLM

    from .linear4bit import QuantizationReport, install_prequantized
    folder = _local_snapshot(model_name, token=token, revision=revision)
    config = copy.deepcopy(config)
    del config.quantization_config
    with _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    state_dict = _read_safetensors(folder)
    quantized = install_prequantized(model, state_dict)
    expected = set(model.state_dict())
    model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing, unexpected = sorted(expected - set(state_dict) - tied), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise OSError(f"{model_name}: the 4-bit checkpoint does not match its config: missing {missing[:5]}, "
                      f"unexpected {unexpected[:5]}")
    model.tie_weights()
    model.ahazero_quantization = QuantizationReport(errors=dict.fromkeys(quantized, float("nan")))
    return model.eval()


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _local_snapshot(model_name: str, token=None, revision=None) -> Path:
    """A local folder with the checkpoint's safetensors: the folder itself, or the hub snapshot."""
    path = Path(model_name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(model_name, token=token, revision=revision,
                                  allow_patterns=["*.json", "*.safetensors"]))


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise OSError(f"no *.safetensors weights in {folder} (4-bit checkpoints are read from safetensors only)")
    state_dict = {}
    for file in files:
        state_dict.update(load_file(file))
    return state_dict


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
    from .lora import fuse_lora_forwards
    peft_model = get_peft_model(model, config)
    fuse_lora_forwards(peft_model)
    return peft_model


def enable_gradient_checkpointing(model, mode) -> None:
    """mode: False | True (recompute each layer) | "offload"/"unsloth" (recompute, and keep each layer's
    input in CPU memory meanwhile: models/offload.py)."""
    if mode in (None, False):
        return
    if mode not in (True, "offload", "unsloth"):
        raise ValueError(f"use_gradient_checkpointing must be True, False, 'offload' or 'unsloth', got {mode!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    offload = mode in ("offload", "unsloth")
    model.ahazero_offload_activations = False
    if offload and hasattr(base, "_set_gradient_checkpointing"):
        from .offload import offloaded_checkpoint
        from .tiled_mlp import tile_mlps
        base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=offloaded_checkpoint)
        tile_mlps(base)  # the MLP's intermediates by token tiles, at no extra compute inside this recompute
    elif offload:  # a transformers without the per-layer hook: offload every saved tensor instead
        model.ahazero_offload_activations = True


def offload_context(model):
    """Saved activations go to (pinned) CPU memory while the training forward runs (the fallback of
    `enable_gradient_checkpointing` where the per-layer offload cannot be installed)."""
    from contextlib import nullcontext
    if getattr(model, "ahazero_offload_activations", False) and next(model.parameters()).is_cuda:
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return nullcontext()

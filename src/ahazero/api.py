"""The user-facing calls, named as in Unsloth's `FastLanguageModel`, composed from our layers.

`from_pretrained` and `get_peft_model` return the ordinary transformers / PEFT model objects, with the
calls of the Unsloth workflow bound on that one instance (`fast_generate`, `load_lora`, `save_lora`,
`save_pretrained_merged`, `save_pretrained_gguf`, `push_to_hub_merged`, `push_to_hub_gguf`). Nothing is
patched at class level.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field

import torch

from .engine.types import LoRARequest, SamplingParams
from .models import loader

# Unsloth/vLLM keyword arguments a notebook may pass that have no meaning here (accepted, ignored).
_IGNORED_LOAD_KWARGS = {"attn_implementation", "use_exact_model_name", "float8_kv_cache", "disable_log_stats",
                        "unsloth_vllm_standby", "fix_tokenizer", "resize_model_vocab", "local_files_only",
                        "max_num_seqs", "enable_prefix_caching", "use_gradient_checkpointing"}


@dataclass
class EngineSettings:
    """What `from_pretrained` was told about generation, kept on the model for the engine."""
    max_seq_length: int
    fast_inference: bool
    gpu_memory_utilization: float
    max_lora_rank: int | None
    tokenizer: object = None
    generator: object = None
    loaded_loras: dict = field(default_factory=dict)  # absolute path -> LoRARequest


def is_bfloat16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def PatchFastRL(algorithm: str | None = None, FastLanguageModel=None) -> None:  # noqa: N802 (Unsloth's name)
    """Accepted for Unsloth compatibility; ahazero needs no patching."""


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name: str, max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = False,
                        load_in_8bit: bool = False, fast_inference: bool = False, max_lora_rank: int | None = 64,
                        gpu_memory_utilization: float = 0.5, token: str | None = None, device_map=None,
                        trust_remote_code: bool = False, full_finetuning: bool = False, revision=None,
                        random_state: int | None = None, **kwargs):
        """(model, tokenizer) from a hub id or a local folder."""
        unknown = set(kwargs) - _IGNORED_LOAD_KWARGS
        if unknown:
            raise TypeError(f"FastLanguageModel.from_pretrained got unexpected arguments: {sorted(unknown)}")
        if load_in_8bit:
            raise NotImplementedError("load_in_8bit is not supported; use load_in_4bit=True (NF4, QLoRA) or 16 bit")
        if load_in_4bit and full_finetuning:
            raise ValueError("full_finetuning=True trains every weight, which 4-bit weights cannot be; "
                             "use load_in_4bit=False or LoRA")
        if max_seq_length < 1:
            raise ValueError(f"max_seq_length must be >= 1, got {max_seq_length}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        device = device_map if isinstance(device_map, (str, torch.device)) and device_map != "auto" else None
        model, tokenizer = loader.load_causal_lm(model_name, dtype=dtype, device=device, token=token,
                                                 trust_remote_code=trust_remote_code, revision=revision,
                                                 load_in_4bit=load_in_4bit)
        model.ahazero = EngineSettings(max_seq_length=max_seq_length, fast_inference=fast_inference,
                                       gpu_memory_utilization=gpu_memory_utilization,
                                       max_lora_rank=max_lora_rank, tokenizer=tokenizer)
        _bind_workflow_calls(model)
        return model, tokenizer

    @staticmethod
    def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: float = 16, lora_dropout: float = 0.0,
                       bias: str = "none", use_gradient_checkpointing=True, random_state: int | None = 3407,
                       use_rslora: bool = False, modules_to_save=None, init_lora_weights=True, max_seq_length=None,
                       loftq_config=None, **kwargs):
        """LoRA adapters through PEFT on the model from `from_pretrained`; returns the PeftModel."""
        settings = getattr(model, "ahazero", None)
        if settings is None:
            raise TypeError("get_peft_model expects the model returned by FastLanguageModel.from_pretrained")
        if settings.max_lora_rank is not None and r > settings.max_lora_rank:
            raise ValueError(f"r={r} is above max_lora_rank={settings.max_lora_rank} given to from_pretrained")
        target_modules = target_modules or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        peft_model = loader.attach_lora(model, r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                                        lora_dropout=lora_dropout, bias=bias, use_rslora=use_rslora,
                                        random_state=random_state, modules_to_save=modules_to_save,
                                        init_lora_weights=init_lora_weights)
        loader.enable_gradient_checkpointing(peft_model, use_gradient_checkpointing)
        peft_model.ahazero = settings
        settings.generator = None  # the engine is rebuilt for the PEFT-wrapped model
        _bind_workflow_calls(peft_model)
        return peft_model

    @staticmethod
    def for_inference(model):
        model.eval()
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing=True):
        model.train()
        return model


# --- the calls bound onto the model instance -------------------------------------------------------

def _bind_workflow_calls(model) -> None:
    for name, fn in (("fast_generate", fast_generate), ("load_lora", load_lora), ("save_lora", save_lora),
                     ("save_pretrained_merged", save_pretrained_merged), ("push_to_hub_merged", push_to_hub_merged),
                     ("save_pretrained_gguf", save_pretrained_gguf), ("push_to_hub_gguf", push_to_hub_gguf)):
        object.__setattr__(model, name, functools.partial(fn, model))


def get_generator(model, tokenizer=None):
    """The model's rollout backend, built once: the engine where it applies, else transformers generate."""
    from .engine.select import make_generator
    settings = getattr(model, "ahazero", None)
    if settings is None:
        return make_generator(model, tokenizer, use_engine=False)
    if settings.generator is None:
        settings.generator = make_generator(model, tokenizer or settings.tokenizer,
                                              max_seq_length=settings.max_seq_length,
                                              gpu_memory_utilization=settings.gpu_memory_utilization,
                                              max_lora_rank=settings.max_lora_rank,
                                              use_engine=settings.fast_inference)
    return settings.generator


def fast_generate(model, prompts, sampling_params: SamplingParams | None = None, lora_request=None,
                  use_tqdm: bool = False, **kwargs):
    """vLLM-style generation: texts (or token-id lists) in, `RequestOutput`s out.

    `lora_request=None` generates with the base model (adapters off), as vLLM does; a request from
    `model.load_lora(path)` applies that saved adapter.
    """
    tokenizer = model.ahazero.tokenizer
    if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    token_ids, texts = [], []
    for p in prompts:
        if isinstance(p, dict):  # vLLM's {"prompt_token_ids": [...]} / {"prompt": "..."}
            p = p.get("prompt_token_ids", p.get("prompt"))
        if isinstance(p, str):
            texts.append(p)
            token_ids.append(tokenizer(p)["input_ids"])
        else:
            texts.append(None)
            token_ids.append(list(p))
    adapter = None if lora_request is None else lora_request.lora_name
    outputs = get_generator(model).generate(token_ids, sampling_params or SamplingParams(), adapter=adapter)
    for out, text in zip(outputs, texts):
        out.prompt = text
    return outputs


def load_lora(model, path: str, load_tensors: bool = True) -> LoRARequest:
    """A request for a saved PEFT adapter; it is read from disk once and kept in the PEFT model."""
    from .models.lora import is_peft_model
    path = os.path.abspath(path)
    cached = model.ahazero.loaded_loras.get(path)
    if cached is not None:
        return cached
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(f"no LoRA adapter at {path} (adapter_config.json missing)")
    if not is_peft_model(model):
        raise TypeError("load_lora needs a model with LoRA (call FastLanguageModel.get_peft_model first)")
    name = "lora_" + hashlib.sha1(path.encode()).hexdigest()[:10]
    model.load_adapter(path, adapter_name=name, is_trainable=False)
    request = LoRARequest(lora_name=name, lora_int_id=len(model.ahazero.loaded_loras) + 1, lora_path=path)
    model.ahazero.loaded_loras[path] = request
    return request


def save_lora(model, path: str, tokenizer=None, overwrite: bool = False):
    from .export import save_lora as _save_lora
    return _save_lora(model, path, tokenizer=tokenizer, overwrite=overwrite)


def save_pretrained_merged(model, path: str, tokenizer=None, save_method: str = "merged_16bit", **kwargs):
    from .export import save_merged
    return save_merged(model, path, tokenizer=tokenizer, save_method=save_method, **kwargs)


def push_to_hub_merged(model, repo_id: str, tokenizer=None, save_method: str = "merged_16bit", **kwargs):
    from .export import push_to_hub_merged as _push
    return _push(model, repo_id, tokenizer=tokenizer, save_method=save_method, **kwargs)


def save_pretrained_gguf(model, path: str, tokenizer=None, quantization_method="q8_0", **kwargs):
    from .export import save_gguf
    return save_gguf(model, path, tokenizer or model.ahazero.tokenizer, quantization_method=quantization_method,
                     **kwargs)


def push_to_hub_gguf(model, repo_id: str, tokenizer=None, quantization_method="q8_0", **kwargs):
    from .export import push_to_hub_gguf as _push
    return _push(model, repo_id, tokenizer or model.ahazero.tokenizer, quantization_method=quantization_method,
                 **kwargs)


def attach_saved_adapter(model, path: str):
    """The model from `from_pretrained` with a saved PEFT adapter as its "default" adapter (for eval,
    generate and export). An adapter made for another base model is refused with the path named."""
    from peft import PeftModel
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(f"no LoRA adapter at {path} (adapter_config.json missing)")
    settings = model.ahazero
    try:
        peft_model = PeftModel.from_pretrained(model, path, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"adapter {path} does not fit this base model: {str(e).splitlines()[0][:300]}") from e
    peft_model.ahazero = settings
    settings.generator = None
    _bind_workflow_calls(peft_model)
    return peft_model

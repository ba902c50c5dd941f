"""`save_merged`: a transformers checkpoint folder with the LoRA merged in, written one shard at a time.

The folder is what `AutoModelForCausalLM.from_pretrained` reads: `model.safetensors` (or numbered shards
plus `model.safetensors.index.json`), `config.json` without quantisation leftovers, `generation_config.json`,
and the tokenizer with its chat template. Weights keep the base model's dtype: a bf16 model stays bf16,
a float32 model (the tiny CPU test models) stays float32 -- "16bit" names the usual case, not a cast.

merged_4bit writes what transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)` loads (and our `load_in_4bit` reads back): every linear weight (2-D
`.weight` outside embeddings and lm_head) as NF4 codes plus their state tensors, the rest in 16 bit, and
a `quantization_config` naming the modules kept in 16 bit. From a 4-bit model, the weights the adapter
did not change keep their stored codes (no second rounding) and the layers dynamic 4-bit kept in 16 bit
stay so; changed ones are merged in 16 bit and quantised once. A 16-bit model is quantised whole.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from ..models.linear4bit import keeps_16bit
from ..models.nf4 import quantize_nf4
from .common import atomic_output_dir, causal_lm, parse_size
from .weights import DEFAULT_ADAPTER, ModelWeights

SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")
_QUANT_LEFTOVERS = ("quantization_config", "_pre_quantization_dtype")


def check_save_method(save_method: str) -> str:
    method = str(save_method).lower()
    if method not in SAVE_METHODS:
        raise ValueError(f"unknown save_method {save_method!r}; valid: {', '.join(SAVE_METHODS)}")
    return method


def save_merged(model, path, tokenizer=None, save_method: str = "merged_16bit", overwrite: bool = False,
                max_shard_size="5GB", adapter_name: str = DEFAULT_ADAPTER) -> Path:
    """Save `model` with its LoRA adapter merged (or, with save_method="lora", the adapter alone)."""
    method = check_save_method(save_method)
    if method == "lora":
        from .lora import save_lora
        return save_lora(model, path, tokenizer=tokenizer, overwrite=overwrite, adapter_name=adapter_name)
    lm = causal_lm(model)
    source = ModelWeights(model, adapter_name)
    return write_merged_folder(source, path, tokenizer, getattr(lm, "generation_config", None),
                               architecture=type(lm).__name__, overwrite=overwrite, max_shard_size=max_shard_size,
                               save_method=method)


def write_merged_folder(source, path, tokenizer=None, generation_config=None, architecture: str | None = None,
                        overwrite: bool = False, max_shard_size="5GB", save_method: str = "merged_16bit") -> Path:
    """Write `source`'s merged weights, config, generation config and tokenizer into `path`, atomically."""
    with atomic_output_dir(path, save_method, overwrite) as tmp:
        config = merged_config(source, architecture)
        if save_method == "merged_4bit":
            nf4 = nf4_plan(source)
            write_safetensors_shards(source, tmp, max_shard_size, transform=lambda t: to_nf4(source, t, nf4))
            config.quantization_config = bnb_4bit_config(source, nf4)
        else:
            write_safetensors_shards(source, tmp, max_shard_size)
        config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def merged_config(source, architecture: str | None = None):
    """A copy of the model config for the merged weights: no quantisation keys, their dtype, cache on."""
    config = copy.deepcopy(source.config)
    for attr in _QUANT_LEFTOVERS:
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = source.dtype
    if getattr(config, "use_cache", None) is False:      # training turns it off for checkpointing
        config.use_cache = True
    if source.untied:
        config.tie_word_embeddings = False
    if architecture and not getattr(config, "architectures", None):
        config.architectures = [architecture]
    return config


def plan_shards(shapes: dict, max_bytes: int) -> list[list[str]]:
    """Keys grouped, in order, into shards of at most `max_bytes` (a bigger single tensor gets its own)."""
    shards, current, size = [], [], 0
    for key, (shape, dtype) in shapes.items():
        nbytes = _numel(shape) * dtype.itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    return shards + ([current] if current else [])


def write_safetensors_shards(source, folder: Path, max_shard_size="5GB", transform=None) -> list[Path]:
    """Merge and write one shard at a time; peak extra memory is one shard, never a second model.

    `transform` ({key: merged tensor} -> {key: tensor}) rewrites a shard's tensors before writing (NF4)."""
    from safetensors.torch import save_file
    shapes = source.shapes()
    shards = plan_shards(shapes, parse_size(max_shard_size))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for keys, name in zip(shards, names):
        tensors = source.load(keys)
        tensors = {k: t.contiguous() for k, t in (transform(tensors) if transform else tensors).items()}
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [folder / n for n in names]


# --- merged_4bit --------------------------------------------------------------------------------------

def nf4_plan(source) -> set[str]:
    """The weights a merged_4bit save stores in NF4 (module docstring)."""
    if source.nf4_keys:
        return set(source.nf4_keys)
    return {k for k, (shape, _) in source.shapes().items()
            if len(shape) == 2 and k.endswith(".weight") and not keeps_16bit(k.removesuffix(".weight"))}


def to_nf4(source, tensors: dict, nf4: set[str]) -> dict:
    """One shard's merged tensors with the `nf4` weights replaced by their codes and state tensors."""
    out, touched = {}, source.touched_keys
    for key, tensor in tensors.items():
        if key not in nf4:
            out[key] = tensor
            continue
        packed, state = source.packed(key) if key in source.nf4_keys and key not in touched else quantize_nf4(tensor)
        out[key] = packed
        out.update({f"{key}.{suffix}": t for suffix, t in state.as_dict().items()})
    return out


def bnb_4bit_config(source, nf4: set[str]) -> dict:
    """The `quantization_config` transformers' bitsandbytes loader reads, the 16-bit linears named."""
    kept = {k.removesuffix(".weight") for k, (shape, _) in source.shapes().items()
            if len(shape) == 2 and k.endswith(".weight") and k not in nf4}
    kept = sorted(kept | {"lm_head"})  # a tied head has no key of its own but is a module transformers sees
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": str(source.dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": kept,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

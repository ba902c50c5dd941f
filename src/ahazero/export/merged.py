"""`save_merged`: a transformers checkpoint folder with the LoRA merged in, written one shard at a time.

The folder is what `AutoModelForCausalLM.from_pretrained` reads: `model.safetensors` (or numbered shards
plus `model.safetensors.index.json`), `config.json` without quantisation leftovers, `generation_config.json`,
and the tokenizer with its chat template. Weights keep the base model's dtype: a bf16 model stays bf16,
a float32 model (the tiny CPU test models) stays float32 -- "16bit" names the usual case, not a cast.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from .common import atomic_output_dir, causal_lm, parse_size
from .weights import DEFAULT_ADAPTER, ModelWeights

SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")
_QUANT_LEFTOVERS = ("quantization_config", "_pre_quantization_dtype")


def check_save_method(save_method: str) -> str:
    method = str(save_method).lower()
    if method not in SAVE_METHODS:
        raise ValueError(f"unknown save_method {save_method!r}; valid: {', '.join(SAVE_METHODS)}")
    if method == "merged_4bit":
        raise NotImplementedError("save_method='merged_4bit' needs the 4-bit path (load_in_4bit=True), which "
                                  "is not built yet; use save_method='merged_16bit' or 'lora'")
    return method


def save_merged(model, path, tokenizer=None, save_method: str = "merged_16bit", overwrite: bool = False,
                max_shard_size="5GB", adapter_name: str = DEFAULT_ADAPTER) -> Path:
    """Save `model` with its LoRA adapter merged (or, with save_method="lora", the adapter alone)."""
    if check_save_method(save_method) == "lora":
        from .lora import save_lora
        return save_lora(model, path, tokenizer=tokenizer, overwrite=overwrite, adapter_name=adapter_name)
    lm = causal_lm(model)
    source = ModelWeights(model, adapter_name)
    return write_merged_folder(source, path, tokenizer, getattr(lm, "generation_config", None),
                               architecture=type(lm).__name__, overwrite=overwrite, max_shard_size=max_shard_size)


def write_merged_folder(source, path, tokenizer=None, generation_config=None, architecture: str | None = None,
                        overwrite: bool = False, max_shard_size="5GB") -> Path:
    """Write `source`'s merged weights, config, generation config and tokenizer into `path`, atomically."""
    with atomic_output_dir(path, "merged_16bit", overwrite) as tmp:
        write_safetensors_shards(source, tmp, max_shard_size)
        merged_config(source, architecture).save_pretrained(tmp)
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


def write_safetensors_shards(source, folder: Path, max_shard_size="5GB") -> list[Path]:
    """Merge and write one shard at a time; peak extra memory is one shard, never a second model."""
    from safetensors.torch import save_file
    shapes = source.shapes()
    shards = plan_shards(shapes, parse_size(max_shard_size))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for keys, name in zip(shards, names):
        tensors = {k: t.contiguous() for k, t in source.load(keys).items()}
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    if len(shards) > 1:
        total = sum(_numel(s) * dt.itemsize for s, dt in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [folder / n for n in names]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

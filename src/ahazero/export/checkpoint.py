"""Export straight from files (`ahazero export --model PATH [--adapter PATH] --to ...`): the base checkpoint
is read one tensor group at a time from its safetensors shards, so the model is never loaded whole."""
from __future__ import annotations

from pathlib import Path

from .gguf_export import quantization_methods, write_gguf_folder
from .merged import check_save_method, write_merged_folder
from .weights import CheckpointWeights

TARGETS = ("merged_16bit", "merged_4bit", "gguf")


def export_checkpoint(model_path, out, to: str = "merged_16bit", adapter=None, quantization_method="q8_0",
                      overwrite: bool = False, max_shard_size="5GB"):
    """Merge `adapter` (a PEFT folder, optional) into `model_path` (folder or hub id) and write `to` at `out`.

    Returns the output folder (merged) or the list of GGUF files.
    """
    if to not in TARGETS:
        raise ValueError(f"unknown export target {to!r}; valid: {', '.join(TARGETS)}")
    methods = quantization_methods(quantization_method) if to == "gguf" else None
    if to != "gguf":
        check_save_method(to)
    model_dir = resolve_model_dir(model_path)
    source = CheckpointWeights(model_dir, adapter)
    tokenizer = load_tokenizer(model_dir, adapter)
    if to == "gguf":
        return write_gguf_folder(source, tokenizer, out, methods, overwrite)
    return write_merged_folder(source, out, tokenizer, load_generation_config(model_dir),
                               overwrite=overwrite, max_shard_size=max_shard_size, save_method=to)


def resolve_model_dir(model_path) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (weights, configs, tokenizer only)."""
    if Path(model_path).expanduser().is_dir():
        return Path(model_path).expanduser()
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
    return Path(snapshot_download(str(model_path), allow_patterns=patterns))


def load_tokenizer(model_dir: Path, adapter=None):
    """The adapter folder's tokenizer when it has one (saved with the LoRA), else the base model's."""
    from transformers import AutoTokenizer
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(adapter)
    return AutoTokenizer.from_pretrained(model_dir)


def load_generation_config(model_dir: Path):
    from transformers import GenerationConfig
    if not (model_dir / "generation_config.json").is_file():
        return None
    return GenerationConfig.from_pretrained(model_dir)

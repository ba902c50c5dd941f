"""`save_lora` / `load_lora`: the adapter alone, in PEFT's own format (adapter_config.json +
adapter_model.safetensors), written by PEFT itself so `PeftModel.from_pretrained(base, path)` reads it."""
from __future__ import annotations

import shutil
from pathlib import Path

from .common import atomic_output_dir
from .weights import DEFAULT_ADAPTER


def _require_adapter(model, adapter_name: str):
    from peft import PeftModel
    if not isinstance(model, PeftModel):
        raise ValueError("this model has no LoRA adapter to save; call FastLanguageModel.get_peft_model first "
                         "(or save the full model with save_method='merged_16bit')")
    if adapter_name not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; loaded: {sorted(model.peft_config)}")


def save_lora(model, path, tokenizer=None, overwrite: bool = False, adapter_name: str = DEFAULT_ADAPTER) -> Path:
    """Write adapter `adapter_name` as a PEFT adapter folder (always at the folder's top level)."""
    _require_adapter(model, adapter_name)
    with atomic_output_dir(path, "lora", overwrite) as tmp:
        model.save_pretrained(tmp, selected_adapters=[adapter_name])
        if adapter_name != DEFAULT_ADAPTER:             # PEFT puts non-default adapters in a subfolder
            for item in (tmp / adapter_name).iterdir():
                shutil.move(str(item), tmp / item.name)
            (tmp / adapter_name).rmdir()
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def load_lora(model, path, adapter_name: str | None = None) -> str:
    """Load a saved PEFT adapter into `model` next to its own, inactive; returns the adapter's name.

    The name (default: the folder's name) selects it later, e.g. for generation with that adapter.
    """
    from peft import PeftModel
    if not isinstance(model, PeftModel):
        raise ValueError("load_lora needs a PEFT model; call FastLanguageModel.get_peft_model first")
    name = adapter_name or Path(path).name
    if name in model.peft_config:
        if name == model.active_adapter:
            raise ValueError(f"adapter {name!r} is the active one; load the file under another adapter_name")
        model.delete_adapter(name)
    model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    return name

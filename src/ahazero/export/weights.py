"""Where merged weights come from: an in-memory (PEFT) model, or a checkpoint folder plus an adapter folder.

Both give the same two calls, so every writer (safetensors shards, GGUF) streams the weights and never
holds a second full copy of the model:

    source.shapes()   -> {name: (shape, dtype)} of the merged model, in writing order (nothing loaded)
    source.load(keys) -> {name: merged tensor} for those keys only (LoRA merged in, base dtype kept)
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from .common import causal_lm, require_floating_weights
from .merge import lora_target_keys, merge_lora_state_dict

DEFAULT_ADAPTER = "default"
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class _Source:
    config = None        # the transformers config of the causal LM
    lora_sd: dict = {}
    lora_config = None
    untied = False        # True when a LoRA changed one of two tied matrices: write both, untie in config

    def _check_targets(self, base_keys) -> None:
        missing = sorted(lora_target_keys(self.lora_sd) - set(base_keys))
        if missing:
            raise ValueError(f"the adapter changes weights the base model does not have: {missing[:5]}")

    def _merge(self, base: dict) -> dict:
        if not self.lora_sd:
            return dict(base)
        return merge_lora_state_dict(base, self.lora_sd, self.lora_config)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the (first) floating matrix: what a merged 16-bit checkpoint is saved in."""
        return next(dt for shape, dt in self.shapes().values() if len(shape) == 2)


class ModelWeights(_Source):
    """The weights of a transformers causal LM, optionally PEFT-wrapped, with adapter `adapter_name` merged."""

    def __init__(self, model, adapter_name: str = DEFAULT_ADAPTER):
        lm = causal_lm(model)
        self.config = lm.config
        lora_sd, self.lora_config = adapter_state_dict(model, adapter_name)
        self.lora_sd = {k: v.detach().cpu() for k, v in lora_sd.items()}    # small; merging runs on the CPU
        base = base_state_dict(lm)
        require_floating_weights(base.items())
        self._check_targets(base)
        self._base, self.untied = drop_tied_copies(base, lora_target_keys(self.lora_sd))

    def shapes(self) -> dict:
        return {k: (tuple(t.shape), t.dtype) for k, t in self._base.items()}

    def load(self, keys) -> dict:
        """Merged CPU tensors for `keys` (a GPU model's weights are copied over one group at a time)."""
        return self._merge({k: self._base[k].detach().cpu() for k in keys})


class CheckpointWeights(_Source):
    """A local transformers checkpoint (safetensors, one or many shards) plus an optional PEFT adapter folder.

    Reads only the tensors asked for, so merging or converting a model larger than memory works.
    """

    def __init__(self, model_dir, adapter_dir=None):
        from transformers import AutoConfig
        self.model_dir = Path(model_dir)
        self.config = AutoConfig.from_pretrained(self.model_dir)
        if getattr(self.config, "quantization_config", None):
            raise NotImplementedError(f"{model_dir} is a quantised checkpoint (load_in_4bit / "
                                      "quantization_config); exporting from it is not supported yet")
        self._files, self._shapes = _index_safetensors(self.model_dir)
        if adapter_dir is not None:
            self.lora_sd, self.lora_config = read_adapter(adapter_dir)
        self._check_targets(self._shapes)

    def shapes(self) -> dict:
        return dict(self._shapes)

    def load(self, keys) -> dict:
        from safetensors import safe_open
        by_file = defaultdict(list)
        for key in keys:
            by_file[self._files[key]].append(key)
        base = {}
        for file, file_keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                base.update({k: f.get_tensor(k) for k in file_keys})
        return self._merge({k: base[k] for k in keys})


def adapter_state_dict(model, adapter_name: str) -> tuple[dict, dict | None]:
    """PEFT-named LoRA tensors (references, no copies) and config of one adapter; ({}, None) without PEFT."""
    from peft import PeftModel, get_peft_model_state_dict
    if not isinstance(model, PeftModel):
        return {}, None
    if adapter_name not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; loaded: {sorted(model.peft_config)}")
    config = model.peft_config[adapter_name]
    if str(config.peft_type).rsplit(".", 1)[-1] != "LORA":
        raise NotImplementedError(f"only LoRA adapters can be merged, not {config.peft_type}")
    sd = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    return sd, config.to_dict()


def base_state_dict(lm) -> dict:
    """The causal LM's own tensors under transformers names, with PEFT's wrappers taken out (no copies)."""
    out = {}
    for key, tensor in lm.state_dict().items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts) or "modules_to_save" in parts:
            continue
        out[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return out


def drop_tied_copies(base: dict, touched: set) -> tuple[dict, bool]:
    """Drop the second name of tied matrices (lm_head tied to embed_tokens), as save_pretrained does.

    If the adapter changes either of a tied pair, both are kept and the result is marked untied.
    """
    first_by_storage, out, untied = {}, {}, False
    for key, tensor in base.items():
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        first = first_by_storage.setdefault(storage, key)
        if first != key and key not in touched and first not in touched:
            continue
        untied |= first != key
        out[key] = tensor
    return out, untied


def read_adapter(adapter_dir) -> tuple[dict, dict]:
    """The tensors and config of a PEFT adapter folder (adapter_model.safetensors + adapter_config.json)."""
    from safetensors.torch import load_file
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise NotImplementedError(f"only LoRA adapters can be merged, not {config['peft_type']}")
    return load_file(adapter_dir / "adapter_model.safetensors"), config


def _index_safetensors(model_dir: Path) -> tuple[dict, dict]:
    """key -> file and key -> (shape, dtype) for every tensor of a safetensors checkpoint, reading headers only."""
    from safetensors import safe_open
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(model_dir.glob("model*.safetensors")) or sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    where, shapes = {}, {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise NotImplementedError(f"{file.name}:{key} has dtype {sl.get_dtype()}; quantised "
                                              "checkpoints are not supported yet (load_in_4bit)")
                where[key], shapes[key] = file, (tuple(sl.get_shape()), dtype)
    return where, shapes

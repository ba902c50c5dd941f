"""Where merged weights come from: an in-memory (PEFT) model, or a checkpoint folder plus an adapter folder.

Both give the same two calls, so every writer (safetensors shards, GGUF) streams the weights and never
holds a second full copy of the model:

    source.shapes()   -> {name: (shape, dtype)} of the merged model, in writing order (nothing loaded)
    source.load(keys) -> {name: merged tensor} for those keys only (LoRA merged in, base dtype kept)

4-bit bases (a model loaded with load_in_4bit, or a bitsandbytes-4bit checkpoint folder) are read the
same way: their NF4 weights come out dequantised (bit-identical to bitsandbytes) in the dtype they were
quantised from; `source.nf4_keys` names them and `source.packed(key)` gives their stored codes, so a
merged_4bit save can keep the codes of every weight the adapter did not change.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from ..models.linear4bit import STATE_SUFFIXES, Linear4bit
from ..models.nf4 import QuantState, dequantize_nf4
from .common import causal_lm, require_floating_weights
from .merge import lora_target_keys, merge_lora_state_dict

DEFAULT_ADAPTER = "default"
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class _Source:
    config = None        # the transformers config of the causal LM
    lora_sd: dict = {}
    lora_config = None
    untied = False        # True when a LoRA changed one of two tied matrices: write both, untie in config
    nf4_keys: frozenset = frozenset()   # weights stored in NF4 by the source (shapes/load give them dequantised)

    def _check_targets(self, base_keys) -> None:
        missing = sorted(lora_target_keys(self.lora_sd) - set(base_keys))
        if missing:
            raise ValueError(f"the adapter changes weights the base model does not have: {missing[:5]}")

    def _merge(self, base: dict) -> dict:
        if not self.lora_sd:
            return dict(base)
        return merge_lora_state_dict(base, self.lora_sd, self.lora_config)

    def packed(self, key: str) -> tuple[torch.Tensor, QuantState]:
        """The stored NF4 codes [ceil(n/2), 1] uint8 and quantisation state of an `nf4_keys` weight (CPU)."""
        raise KeyError(key)

    @property
    def touched_keys(self) -> set:
        """The base weights the adapter changes."""
        return lora_target_keys(self.lora_sd)

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
        self._nf4 = {_transformers_name(name) + ".weight": m for name, m in lm.named_modules()
                     if isinstance(m, Linear4bit)}
        self.nf4_keys = frozenset(self._nf4)
        base = {k: v for k, v in base_state_dict(lm).items() if not is_quant_state_key(k)}
        require_floating_weights((k, v) for k, v in base.items() if k not in self._nf4)
        self._check_targets(base)
        self._base, self.untied = drop_tied_copies(base, lora_target_keys(self.lora_sd))

    def shapes(self) -> dict:
        return {k: ((tuple(self._nf4[k].quant_meta["shape"]), self._nf4[k].compute_dtype) if k in self._nf4
                    else (tuple(t.shape), t.dtype)) for k, t in self._base.items()}

    def load(self, keys) -> dict:
        """Merged CPU tensors for `keys` (a GPU model's weights are copied over one group at a time)."""
        return self._merge({k: (self._nf4[k].dequantized_weight() if k in self._nf4 else self._base[k]).detach().cpu()
                            for k in keys})

    def packed(self, key: str) -> tuple[torch.Tensor, QuantState]:
        module = self._nf4[key]
        state = QuantState.from_dict({s: t.cpu() for s, t in module.quant_state.as_dict().items()})
        return module.weight.detach().cpu(), state


class CheckpointWeights(_Source):
    """A local transformers checkpoint (safetensors, one or many shards) plus an optional PEFT adapter folder.

    Reads only the tensors asked for, so merging or converting a model larger than memory works.
    """

    def __init__(self, model_dir, adapter_dir=None):
        from transformers import AutoConfig
        self.model_dir = Path(model_dir)
        self.config = AutoConfig.from_pretrained(self.model_dir)
        quantized = bool(getattr(self.config, "quantization_config", None))
        if quantized:
            from ..models.loader import bnb_4bit_settings
            bnb_4bit_settings(self.config)  # raises for anything but bitsandbytes NF4 with double quantisation
        self._files, shapes = _index_safetensors(self.model_dir, allow_uint8=quantized)
        self._states = {k[: -len(".quant_state.bitsandbytes__nf4")]: self._read([k])[k]
                        for k in shapes if k.endswith(".weight.quant_state.bitsandbytes__nf4")}
        self.nf4_keys = frozenset(self._states)
        self._shapes = {}
        for key, shape in shapes.items():
            if key in self._states:
                meta = json.loads(bytes(self._states[key].tolist()).decode("utf-8"))
                shape = (tuple(meta["shape"]), getattr(torch, meta["dtype"]))
            elif is_quant_state_key(key):
                continue
            elif shape[1] is None:
                raise NotImplementedError(f"{self._files[key].name}:{key} is an integer tensor that is not "
                                          "an NF4 weight; this checkpoint format is not supported")
            self._shapes[key] = shape
        if adapter_dir is not None:
            self.lora_sd, self.lora_config = read_adapter(adapter_dir)
        self._check_targets(self._shapes)

    def shapes(self) -> dict:
        return dict(self._shapes)

    def _read(self, keys) -> dict:
        from safetensors import safe_open
        by_file = defaultdict(list)
        for key in keys:
            by_file[self._files[key]].append(key)
        out = {}
        for file, file_keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in file_keys})
        return out

    def load(self, keys) -> dict:
        base = self._read([k for k in keys if k not in self.nf4_keys])
        for key in keys:
            if key in self.nf4_keys:
                base[key] = dequantize_nf4(*self.packed(key))
        return self._merge({k: base[k] for k in keys})

    def packed(self, key: str) -> tuple[torch.Tensor, QuantState]:
        tensors = self._read([key] + [f"{key}.{s}" for s in STATE_SUFFIXES])
        return tensors[key], QuantState.from_dict({s: tensors[f"{key}.{s}"] for s in STATE_SUFFIXES})


def is_quant_state_key(key: str) -> bool:
    """A bitsandbytes 4-bit side tensor (`<name>.weight.absmax`, `.quant_state.bitsandbytes__nf4`, ...)."""
    return any(key.endswith(".weight." + suffix) for suffix in STATE_SUFFIXES)


def _transformers_name(module_name: str) -> str:
    """A module's name in the causal LM with PEFT's wrappers taken out (as `base_state_dict` names keys)."""
    return module_name.replace(".base_layer", "").replace(".original_module", "")


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


def _index_safetensors(model_dir: Path, allow_uint8: bool = False) -> tuple[dict, dict]:
    """key -> file and key -> (shape, dtype) for every tensor of a safetensors checkpoint, reading headers only.

    With `allow_uint8` (a 4-bit checkpoint), uint8 tensors are indexed with dtype None."""
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
                if dtype is None and not (allow_uint8 and sl.get_dtype() == "U8"):
                    raise NotImplementedError(f"{file.name}:{key} has dtype {sl.get_dtype()}; only float weights "
                                              "and bitsandbytes NF4 weights can be read")
                where[key], shapes[key] = file, (tuple(sl.get_shape()), dtype)
    return where, shapes

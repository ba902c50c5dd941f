"""Merging a PEFT LoRA adapter into base weights, as a pure state-dict transform.

    W' = W + scale * B @ A        scale = alpha / r   (alpha / sqrt(r) with use_rslora)

following PEFT's `LoraLayer.get_delta_weight` (torchtune's `get_merged_lora_ckpt` is the same idea).
Computed in float32 and cast back to W's dtype. Works on any subset of the base weights, so a large
model is merged one safetensors shard at a time. Not covered (a clear error instead): DoRA,
trainable-token adapters, LoRA on convolutions.

Keys: `base_sd` uses the transformers names (`model.layers.0.self_attn.q_proj.weight`); `lora_sd`
uses PEFT's saved names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), i.e. what
`adapter_model.safetensors` holds and `peft.get_peft_model_state_dict` returns.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.(?P<param>weight|bias))?$")


@dataclass
class ModuleDelta:
    """The LoRA factors of one module: A [r, in], B [out, r] (embeddings: A [r, vocab], B [dim, r])."""
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    B_bias: torch.Tensor | None = None
    embedding: bool = False


def lora_config_dict(lora_config) -> dict:
    """A PEFT LoraConfig, or the dict of an adapter_config.json, as a plain dict."""
    if isinstance(lora_config, dict):
        return lora_config
    return lora_config.to_dict()


def _pattern_value(patterns: dict | None, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern that matches the module's name end."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def lora_scale(cfg: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def split_lora_state_dict(lora_sd: dict) -> tuple[dict[str, ModuleDelta], dict[str, torch.Tensor]]:
    """Group PEFT keys into per-module factors and whole-tensor replacements (modules_to_save).

    Both are keyed by transformers names (prefix removed; replacements by their weight key).
    """
    deltas: dict[str, ModuleDelta] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in lora_sd.items():
        name = key.removeprefix(PEFT_PREFIX)
        if "lora_magnitude_vector" in name:
            raise NotImplementedError("merging DoRA adapters (use_dora=True) is not supported")
        if (m := _LORA_KEY.match(name)) is None:
            replacements[name.replace(".base_layer.", ".")] = tensor
            continue
        delta = deltas.setdefault(m["module"], ModuleDelta())
        part = m["part"]
        delta.embedding |= part.startswith("lora_embedding")
        if part.endswith("A"):
            delta.A = tensor
        elif m["param"] == "bias":
            delta.B_bias = tensor
        else:
            delta.B = tensor
    return deltas, replacements


def delta_weight(delta: ModuleDelta, scale: float, fan_in_fan_out: bool) -> torch.Tensor:
    """scale * B @ A in float32, laid out like the module's weight."""
    A, B = delta.A.float(), delta.B.float()
    update = (B @ A) * scale                      # [out, in]; embeddings: [dim, vocab]
    return update.T if (fan_in_fan_out or delta.embedding) else update


def merge_lora_state_dict(base_sd: dict, lora_sd: dict, lora_config) -> dict:
    """Base weights with the LoRA adapter merged in; a new dict, only the changed tensors are new.

    Args:
        base_sd: transformers-named tensors (all of a model, or one shard of it).
        lora_sd: the adapter in PEFT's saved naming.
        lora_config: `peft.LoraConfig` or the adapter_config.json dict.
    Returns:
        dict with the keys of `base_sd`; each merged tensor keeps its base dtype.
    """
    cfg = lora_config_dict(lora_config)
    deltas, replacements = split_lora_state_dict(lora_sd)
    _check_complete(deltas)
    out = {}
    for key, weight in base_sd.items():
        merged = replacements.get(key, weight)
        module, _, param = key.rpartition(".")
        delta = deltas.get(module)
        if delta is not None and param == "weight":
            rank = delta.A.shape[0]
            update = delta_weight(delta, lora_scale(cfg, module, rank), cfg.get("fan_in_fan_out", False))
            merged = (merged.float() + update).to(weight.dtype)
        elif delta is not None and param == "bias" and delta.B_bias is not None:
            scale = lora_scale(cfg, module, delta.A.shape[0])
            merged = (merged.float() + scale * delta.B_bias.float()).to(weight.dtype)
        out[key] = merged
    return out


def _check_complete(deltas: dict[str, ModuleDelta]) -> None:
    broken = [m for m, d in deltas.items() if d.A is None or d.B is None]
    if broken:
        raise ValueError(f"LoRA state dict has modules with only one of lora_A / lora_B: {broken[:5]}")


def lora_target_keys(lora_sd: dict) -> set[str]:
    """The transformers weight keys an adapter changes (to check every one of them was merged)."""
    deltas, replacements = split_lora_state_dict(lora_sd)
    keys = {f"{module}.weight" for module in deltas}
    keys |= {f"{module}.bias" for module, d in deltas.items() if d.B_bias is not None}
    return keys | set(replacements)

"""Tiny random-weight models of real architectures, with the real Qwen2.5 tokenizer.

Shapes come from the public configs in tests/assets/configs (copied from shared/models/configs), shrunk
in every dimension but the vocabulary, so the real tokenizer's ids are all valid.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_DIR = ASSETS / "qwen2.5-tokenizer"
GSM8K_DIR = ASSETS / "gsm8k"
QWEN_EOS, QWEN_PAD = 151645, 151643

# architecture name -> (config file, overrides that are not size)
_ARCHS = {
    "qwen2": ("qwen2.5-0.5b.json", {}),
    "llama": ("llama-3.2-1b.json", {"head_dim": 16}),
    "mistral": ("mistral-7b-v0.3.json", {"head_dim": 16}),
    "qwen3": (None, {"model_type": "qwen3", "head_dim": 16, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                     "tie_word_embeddings": True, "attention_bias": False}),
}
ARCHS = tuple(_ARCHS)
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_window_layers=2)


@lru_cache(maxsize=1)
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def tiny_config(arch: str = "qwen2", **overrides):
    """A transformers config of `arch`'s real layout (biases, norms, RoPE kind) at a tiny size."""
    file, extra = _ARCHS[arch]
    cfg = json.loads((ASSETS / "configs" / file).read_text()) if file else {}
    cfg.update(_TINY)
    cfg.update(extra)
    cfg.update(vocab_size=151936, bos_token_id=QWEN_PAD, eos_token_id=QWEN_EOS, pad_token_id=QWEN_PAD)
    cfg.setdefault("max_position_embeddings", 32768)
    cfg.update(overrides)
    model_type = cfg.pop("model_type", arch)
    cfg.pop("architectures", None)
    cfg.pop("torch_dtype", None)
    return AutoConfig.for_model(model_type, **cfg)


def tiny_model(arch: str = "qwen2", dtype=torch.float32, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=dtype)
    return model.eval()


def save_tiny_model(path, arch: str = "qwen2", dtype=torch.float32, seed: int = 0, **overrides) -> Path:
    """A local checkpoint folder (safetensors + config + the real tokenizer) like a hub download."""
    path = Path(path)
    tiny_model(arch, dtype=dtype, seed=seed, **overrides).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path

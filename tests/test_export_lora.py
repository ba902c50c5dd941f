"""save_lora / load_lora, proven by PEFT: `PeftModel.from_pretrained(base, saved)` computes what we trained."""
import pytest
import torch
from peft import LoraConfig, PeftModel

import tiny
from ahazero.export import load_lora, save_lora, save_merged
from ahazero.export.common import MARKER
from test_export_common import ALL_LINEAR, logits, lora_model, prompt_ids, randomize_lora


def test_peft_loads_the_saved_adapter_and_computes_the_same_logits(tmp_path):
    model, ids = lora_model("qwen2", use_rslora=True), prompt_ids()
    want = logits(model, ids)
    with model.disable_adapter():
        assert (logits(model, ids) - want).abs().max() > 1e-2          # the adapter changes the output
    out = save_lora(model, tmp_path / "lora", tokenizer=tiny.tokenizer())
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", MARKER} <= names
    loaded = PeftModel.from_pretrained(tiny.tiny_model("qwen2"), out).eval()
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-6)


def test_another_adapter_is_saved_at_the_top_level(tmp_path):
    model, ids = lora_model("llama"), prompt_ids()
    model.add_adapter("extra", LoraConfig(r=2, lora_alpha=4, target_modules=ALL_LINEAR))
    randomize_lora(model, seed=5)
    model.set_adapter("extra")
    want = logits(model, ids)
    model.set_adapter("default")
    out = save_lora(model, tmp_path / "extra", adapter_name="extra")
    assert (out / "adapter_config.json").is_file() and not (out / "extra").exists()
    loaded = PeftModel.from_pretrained(tiny.tiny_model("llama"), out).eval()
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-6)


def test_load_lora_adds_a_saved_adapter_by_name(tmp_path):
    trained, ids = lora_model("qwen2", seed=0), prompt_ids()
    want = logits(trained, ids)
    save_lora(trained, tmp_path / "grpo_saved_lora")
    other = lora_model("qwen2", seed=0, b_std=0.0)                    # same base, an untrained adapter
    name = load_lora(other, tmp_path / "grpo_saved_lora")
    assert name == "grpo_saved_lora" and other.active_adapter == "default"
    other.set_adapter(name)
    torch.testing.assert_close(logits(other, ids), want, rtol=0, atol=1e-6)


def test_save_method_lora_is_save_lora(tmp_path):
    out = save_merged(lora_model("qwen2"), tmp_path / "m", save_method="lora")
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_lora(tiny.tiny_model("qwen2"), tmp_path / "x")
    model = lora_model("qwen2")
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        save_lora(model, tmp_path / "x", adapter_name="nope")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        save_lora(model, theirs)
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]
    save_lora(model, theirs, overwrite=True)
    assert (theirs / "adapter_config.json").is_file()
    assert not list(tmp_path.glob(".*tmp*"))

"""save_merged (merged_16bit), proven by transformers: `AutoModelForCausalLM.from_pretrained(folder)` gives
the logits of base + LoRA; and the same folder from files alone (`export_checkpoint`, shard by shard)."""
import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny
from ahazero.export import export_checkpoint, save_lora, save_merged
from ahazero.export.merged import plan_shards
from ahazero.export.weights import CheckpointWeights, ModelWeights
from test_export_common import ALL_LINEAR, logits, lora_model, prompt_ids, randomize_lora


def _load(folder, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_transformers_loads_the_merged_model_with_the_trained_logits(tmp_path, arch):
    model, ids = lora_model(arch), prompt_ids()
    want = logits(model, ids)
    with model.disable_adapter():
        assert (logits(model, ids) - want).abs().max() > 1e-2          # the LoRA matters: the test can fail
    out = save_merged(model, tmp_path / "merged", tiny.tokenizer())
    torch.testing.assert_close(logits(_load(out), ids), want, rtol=0, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["dtype"] == "float32"
    assert (out / "generation_config.json").is_file()
    messages = [{"role": "user", "content": "What is 2+3?"}]
    saved = AutoTokenizer.from_pretrained(out)
    original = tiny.tokenizer().apply_chat_template(messages, tokenize=False)
    assert saved.apply_chat_template(messages, tokenize=False) == original


def test_bf16_stays_bf16(tmp_path):
    model = lora_model("qwen2", dtype=torch.bfloat16)
    out = save_merged(model, tmp_path / "m")
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    with safe_open(out / "model.safetensors", framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            assert tensor.dtype == torch.bfloat16, key
            torch.testing.assert_close(tensor.float(), reference[key].float(), rtol=1e-2, atol=1e-3)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_save_streams_one_shard_at_a_time(tmp_path, monkeypatch):
    model, ids = lora_model("llama"), prompt_ids()
    sizes = []
    real_load = ModelWeights.load

    def spy(self, keys):
        tensors = real_load(self, keys)
        sizes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return tensors
    monkeypatch.setattr(ModelWeights, "load", spy)
    out = save_merged(model, tmp_path / "m", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == len(sizes) > 2 and all((out / f).is_file() for f in files)
    embedding = 151936 * 64 * 4
    assert max(sizes) == embedding and sorted(sizes)[-2] <= 100_000   # one shard in memory at a time
    torch.testing.assert_close(logits(_load(out), ids), logits(model, ids), rtol=0, atol=1e-5)


def test_plan_shards_keeps_order_and_limit():
    shapes = {f"t{i}": ((10,), torch.float32) for i in range(5)}          # 40 bytes each
    assert plan_shards(shapes, 100) == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert plan_shards({"big": ((1000,), torch.float32)}, 100) == [["big"]]


def test_config_has_no_quantization_or_training_leftovers(tmp_path):
    model = lora_model("qwen2")
    config = model.get_base_model().config
    config.quantization_config = {"load_in_4bit": True}
    config.use_cache = False
    out = save_merged(model, tmp_path / "m")
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved and saved["use_cache"] is True
    assert config.quantization_config == {"load_in_4bit": True}          # the user's model is untouched


def test_lora_on_a_tied_lm_head_unties_it(tmp_path):
    base = tiny.tiny_model("qwen2")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)
    ids = prompt_ids()
    out = save_merged(model, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(logits(_load(out), ids), logits(model, ids), rtol=0, atol=1e-5)


def test_bad_save_methods(tmp_path):
    model = lora_model("qwen2")
    with pytest.raises(ValueError, match="merged_16bit, merged_4bit, lora"):
        save_merged(model, tmp_path / "m", save_method="merged_8bit")
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_folder_that_is_not_ours_and_survives_a_crash(tmp_path, monkeypatch):
    model = lora_model("qwen2")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_merged(model, tmp_path / "theirs")
    save_merged(model, tmp_path / "ours")
    before = (tmp_path / "ours" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError):
        save_merged(model, tmp_path / "ours")
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "theirs"]


def test_export_from_files_equals_export_from_memory(tmp_path):
    """`ahazero export --model DIR --adapter DIR`: read shard by shard, same tensors as the in-memory save."""
    base_dir = tiny.save_tiny_model(tmp_path / "base", "llama")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, use_rslora=True))
    randomize_lora(model)
    save_lora(model, tmp_path / "adapter", tokenizer=tiny.tokenizer())
    mem = save_merged(model, tmp_path / "from_memory")
    disk = export_checkpoint(base_dir, tmp_path / "from_disk", adapter=tmp_path / "adapter", max_shard_size="3MB")
    assert (disk / "model.safetensors.index.json").is_file() and (disk / "tokenizer.json").is_file()
    want = CheckpointWeights(mem)
    got = CheckpointWeights(disk)
    assert got.shapes() == want.shapes()
    for key in want.shapes():
        assert torch.equal(got.load([key])[key], want.load([key])[key]), key
    ids = prompt_ids()
    torch.testing.assert_close(logits(_load(disk), ids), logits(model.eval(), ids), rtol=0, atol=1e-5)


def test_export_checkpoint_bad_target(tmp_path):
    with pytest.raises(ValueError, match="merged_16bit, merged_4bit, gguf"):
        export_checkpoint(tmp_path, tmp_path / "out", to="onnx")

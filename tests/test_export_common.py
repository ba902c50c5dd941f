"""Export plumbing: atomic output folders, size strings; plus the helpers the other export tests share."""
import json

import pytest
import torch

import tiny
from ahazero.export.common import MARKER, atomic_output_dir, parse_size

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(arch="qwen2", seed=0, b_std=0.05, dtype=torch.float32, model_kwargs=None, **lora_kwargs):
    """A tiny model of `arch` with a LoRA adapter whose B is random (PEFT starts it at zero, which would
    make base == merged and let a broken merge pass). `model_kwargs` go to `tiny.tiny_model`."""
    from peft import LoraConfig, get_peft_model
    model = tiny.tiny_model(arch, dtype=dtype, seed=seed, **(model_kwargs or {}))
    lora_kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ALL_LINEAR, **lora_kwargs}
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    randomize_lora(peft_model, seed=seed + 1, std=b_std)
    return peft_model.eval()


def randomize_lora(peft_model, seed=1, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_" in name:    # PEFT zeroes embedding LoRA's A
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def prompt_ids(n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 151_000, (1, n), generator=gen)


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits.float()


def test_atomic_dir_writes_marker_and_replaces_its_own_folder(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out, "test") as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1"
    assert json.loads((out / MARKER).read_text())["written_by"] == "ahazero"
    with atomic_output_dir(out, "test") as tmp:      # ours: replaced without overwrite=True
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "b.txt"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]      # no temporary or old folder left


def test_atomic_dir_refuses_a_folder_that_is_not_ours(tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_output_dir(out, "test"):
            pass
    assert (out / "keep.txt").read_text() == "precious"
    with atomic_output_dir(out, "test", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("x")
    assert not (out / "keep.txt").exists() and (out / "new.txt").exists()


def test_atomic_dir_accepts_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with atomic_output_dir(tmp_path / "empty", "test") as tmp:
        (tmp / "a").write_text("1")
    assert (tmp_path / "empty" / "a").exists()


def test_crash_mid_save_leaves_no_half_written_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, "test") as tmp:
            (tmp / "half.bin").write_bytes(b"...")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(out, "test") as tmp:       # an earlier good export survives a later crash
        (tmp / "good.txt").write_text("ok")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, "test") as tmp:
            raise RuntimeError("killed")
    assert (out / "good.txt").read_text() == "ok"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("200MB") == 200 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size(1234) == 1234
    assert parse_size("1.5KB") == 1500

"""Checkpoints that survive a kill at any moment: written into a temporary folder, then renamed.

A folder `checkpoint-<step>` exists only once it is complete (rename is atomic on one filesystem), so
resuming picks the newest one whose name is final; `*.tmp*` leftovers of a killed write are ignored.
Layout: the adapter in PEFT format (or `trainable.safetensors` for full fine-tuning), `optimizer.pt`,
`scheduler.pt`, `rng_state.pt`, `trainer_state.json` (step, data position, log history). A model sharded
with FSDP2 (grpo/fsdp.py) writes the same files, whole tensors gathered to rank 0, and loads any of them.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..models.lora import is_peft_model
from .fsdp import copy_full_, shard_optimizer_state

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(output_dir: str | Path, step: int, model, optimizer, scheduler, trainer_state: dict,
                    save_total_limit: int | None = None, weights: dict | None = None,
                    optimizer_state: dict | None = None, rng: dict | None = None) -> Path:
    """weights / optimizer_state: the trainable tensors and optimizer state dict when already gathered
    (an FSDP2-sharded model: grpo/fsdp.py); else they are read from model and optimizer. rng: the random
    states to resume with (`rng_state()` taken earlier); else the current ones."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f"checkpoint-{step}.tmp", dir=output_dir))
    try:
        _save_weights(model, tmp, weights)
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng if rng is not None else rng_state(), tmp / "rng_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        _fsync_tree(tmp)
        stale = None
        if final.exists():  # the same step written again (e.g. the final save): set the old one aside first
            stale = final.with_name(f"{final.name}.tmp-stale")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
        os.replace(tmp, final)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if save_total_limit:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


RUN_ARTIFACTS = ("metrics.jsonl", "runs", "final_lora", "summary.json", "training.png")


def archive_previous_run(output_dir: str | Path) -> Path | None:
    """A fresh run in a folder that holds an earlier run's results moves them to `previous-<time>/`
    first, so nothing trained before is overwritten. Only ahazero's own artifacts are moved."""
    import time
    output_dir = Path(output_dir)
    found = list_checkpoints(output_dir) + [output_dir / n for n in RUN_ARTIFACTS if (output_dir / n).exists()]
    if not found:
        return None
    archive = output_dir / time.strftime("previous-%Y%m%d-%H%M%S")
    while archive.exists():
        archive = archive.with_name(archive.name + "x")
    archive.mkdir()
    for path in found:
        os.replace(path, archive / path.name)
    return archive


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(resume_from_checkpoint, output_dir) -> Path | None:
    """True -> the newest complete checkpoint in output_dir (error if none); a path -> that folder."""
    if resume_from_checkpoint in (None, False):
        return None
    if resume_from_checkpoint is True:
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"resume_from_checkpoint=True but {output_dir} holds no complete checkpoint")
        return found[-1]
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG in place; returns the trainer state dict."""
    state = _read(path / STATE_FILE, lambda f: json.loads(Path(f).read_text()))
    _load_weights(model, path)
    optimizer.load_state_dict(shard_optimizer_state(optimizer, _read(path / "optimizer.pt", _torch_load)))
    scheduler.load_state_dict(_read(path / "scheduler.pt", _torch_load))
    _set_rng_state(_read(path / "rng_state.pt", _torch_load))
    return state


# --------------------------------------------------------------------------------------------------

def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _save_weights(model, folder: Path, weights: dict | None = None) -> None:
    if is_peft_model(model):
        model.save_pretrained(folder, selected_adapters=["default"])  # PEFT format, loadable by users
    weights = weights if weights is not None else _trainable(model)
    save_file(weights, str(folder / "trainable.safetensors"))  # exact names, for resuming


def _load_weights(model, folder: Path) -> None:
    saved = _read(folder / "trainable.safetensors", load_file)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved))[:3], sorted(set(saved) - expected)[:3]
        raise CheckpointError(f"{folder / 'trainable.safetensors'} does not match this model's trainable "
                              f"parameters (missing e.g. {missing}, unexpected e.g. {extra})")
    with torch.no_grad():
        for name, tensor in saved.items():
            if params[name].shape != tensor.shape:
                raise CheckpointError(f"{folder / 'trainable.safetensors'}: {name} has shape "
                                      f"{tuple(tensor.shape)}, the model has {tuple(params[name].shape)}")
            copy_full_(params[name], tensor)  # only this rank's shard where FSDP2 shards it


def _read(path: Path, reader):
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return reader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise CheckpointError(f"checkpoint file unreadable: {path} ({type(e).__name__}: {e})") from e


def _torch_load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """Python's, numpy's, torch's and (where present) every CUDA device's random state."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())

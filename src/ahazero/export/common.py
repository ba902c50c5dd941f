"""Shared pieces of every export: atomic output folders, size strings, reaching the causal LM inside a model."""
from __future__ import annotations

import json
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MARKER = ".ahazero-export.json"  # written into every folder we create; lets a later save replace it


def is_ours_or_empty(path: Path) -> bool:
    """True when `path` is missing, an empty folder, or a folder an earlier ahazero export wrote."""
    if not path.exists():
        return True
    return path.is_dir() and ((path / MARKER).is_file() or not any(path.iterdir()))


@contextmanager
def atomic_output_dir(path, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` in one rename.

    An existing `path` that is not ours (no marker, not empty) is refused unless `overwrite`. On an
    exception the temporary folder is removed, so a crash never leaves a half-written folder under
    the final name (and an earlier export there stays as it was).
    """
    path = Path(path).expanduser().resolve()
    if not overwrite and not is_ours_or_empty(path):
        raise FileExistsError(f"{path} exists and was not written by ahazero; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"written_by": "ahazero", "kind": kind}) + "\n")
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; an old `dst` is moved aside first and deleted only after the swap."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def parse_size(size) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, like transformers' `max_shard_size`); ints pass through."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def causal_lm(model):
    """The transformers causal LM inside a (PEFT-wrapped) model."""
    from peft import PeftModel
    return model.get_base_model() if isinstance(model, PeftModel) else model


def require_floating_weights(named_tensors) -> None:
    """Refuse quantised base weights other than ours (bitsandbytes' own modules, 8-bit)."""
    for name, tensor in named_tensors:
        if not tensor.is_floating_point() or type(tensor).__name__ in ("Params4bit", "Int8Params"):
            raise NotImplementedError(
                f"weight {name!r} is quantised ({type(tensor).__name__}, {tensor.dtype}) by a library other than "
                "ahazero; load the model with FastLanguageModel.from_pretrained(..., load_in_4bit=True) to export it")

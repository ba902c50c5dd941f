"""Loading datasets: local JSONL / JSON / Parquet / CSV files or folders, the Hugging Face hub, GSM8K.

Local files are read in memory (no `datasets` cache folder is written) and every failure names the
file. `load_gsm8k` builds the rows of the willccbb / Unsloth GSM8K GRPO notebook's
`get_gsm8k_questions`: a system + user chat prompt and the number after `####` as `answer`.
"""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from datasets.table import InMemoryTable

from ahazero.rewards.parsing import extract_hash_answer

# The seed notebook's system prompt, character for character (leading and trailing newline included).
SYSTEM_PROMPT = """
Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""
GSM8K_HUB_ID, GSM8K_CONFIG = "openai/gsm8k", "main"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


# ---- reading one file ---------------------------------------------------------------------------

def _read_jsonl(path: Path, text: str) -> list[dict]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {lineno} is a JSON {type(row).__name__}, not an object (one row per line)")
        rows.append(row)
    return rows


def _read_json(path: Path, text: str) -> list[dict] | dict[str, list]:
    """A list of rows, a dict of columns, or `{"<key>": [rows]}`; a `.json` file of JSON lines works too."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            return _read_jsonl(path, text)
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list) \
            and all(isinstance(r, dict) for r in next(iter(data.values()))):
        data = next(iter(data.values()))  # {"data": [...rows]}
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return data
    if isinstance(data, dict) and all(isinstance(c, list) for c in data.values()):
        return data
    raise ValueError(f"{path}: expected a list of row objects or an object of column lists")


def _to_dataset(path: Path, rows) -> datasets.Dataset:
    try:
        if isinstance(rows, pa.Table):
            return datasets.Dataset(InMemoryTable(rows))
        if isinstance(rows, dict):
            return datasets.Dataset.from_dict(rows)
        return datasets.Dataset.from_list(rows)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: rows do not form a table (mixed types in a column?): {exc}") from exc


def _read_file(path: Path) -> datasets.Dataset:
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ValueError(f"{path}: unknown data file type {suffix!r}; expected one of {DATA_SUFFIXES}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    try:
        if suffix == ".parquet":
            table = pq.read_table(path)
        elif suffix == ".csv":
            table = pa_csv.read_csv(path)  # column types inferred, as `datasets`' CSV loader does
        else:
            text = path.read_text(encoding="utf-8")
            table = _read_jsonl(path, text) if suffix == ".jsonl" else _read_json(path, text)
    except (OSError, UnicodeDecodeError, pa.ArrowException) as exc:
        raise ValueError(f"{path}: cannot read it as {suffix[1:]}: {exc}") from exc
    n_rows = table.num_rows if isinstance(table, pa.Table) else (
        len(next(iter(table.values()), [])) if isinstance(table, dict) else len(table))
    if n_rows == 0:
        raise ValueError(f"{path}: the file holds no rows")
    return _to_dataset(path, table)


# ---- files and folders --------------------------------------------------------------------------

def _split_files(folder: Path, split: str | None) -> list[Path]:
    """The data files of `split` in `folder` (or its `data/`): `train.jsonl`, `train-00000-of-00002.parquet`, ...

    Without a split: the `train` files if any, else the folder's only data file.
    """
    files = sorted(p for d in (folder, folder / "data") if d.is_dir() for p in d.iterdir()
                   if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no data files ({', '.join(DATA_SUFFIXES)}) in this folder")

    def of(name):
        return [p for p in files if p.stem == name or p.stem.startswith((f"{name}-", f"{name}_"))]

    if split is not None:
        chosen = of(split)
        if not chosen:
            raise FileNotFoundError(f"{folder}: no data file for split {split!r} among {[p.name for p in files]}")
        return chosen
    if of("train"):
        return of("train")
    if len(files) == 1:
        return files
    raise ValueError(f"{folder}: several data files {[p.name for p in files]}; name the split to load")


def load_dataset_file(path, split: str | None = None) -> datasets.Dataset:
    """A Dataset from a local JSONL / JSON / Parquet / CSV file, or from a folder of them.

    For a folder, `split` picks the files (see `_split_files`; shards are concatenated); for a file it is
    ignored. Missing path -> FileNotFoundError; empty or unreadable file -> ValueError; both name the path.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        return _read_file(path)
    parts = [_read_file(p) for p in _split_files(path, split)]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _looks_local(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", ".\\")) or spec.lower().endswith(DATA_SUFFIXES)


def load_any(spec, split: str | None = None, config: str | None = None) -> datasets.Dataset:
    """A local file or folder (`load_dataset_file`) if `spec` exists, else a hub dataset id.

    A spec that looks like a path (starts with `/`, `./`, `~`, or ends in a data suffix) and does not
    exist is a FileNotFoundError, not a hub lookup. Hub datasets load `split` (default "train").
    """
    spec = str(spec)
    if Path(spec).expanduser().exists():
        return load_dataset_file(spec, split=split)
    if _looks_local(spec):
        raise FileNotFoundError(f"{spec}: no such file or folder")
    try:
        return datasets.load_dataset(spec, config, split=split or "train")
    except Exception as exc:
        exc.add_note(f"ahazero: {spec!r} is not a local path, so it was loaded from the Hugging Face hub")
        raise


# ---- GSM8K --------------------------------------------------------------------------------------

def gsm8k_row(example: dict, system_prompt: str = SYSTEM_PROMPT) -> dict:
    """One GSM8K example as the notebook's training row: chat prompt, final number as `answer`, question.

    An `answer` without `####` is taken as already being the final answer (stripped).
    """
    answer = extract_hash_answer(example["answer"])
    return {
        "prompt": [{"role": "system", "content": system_prompt}, {"role": "user", "content": example["question"]}],
        "answer": answer if answer is not None else str(example["answer"]).strip(),
        "question": example["question"],
    }


def load_gsm8k(split: str = "train", path=None, system_prompt: str = SYSTEM_PROMPT) -> datasets.Dataset:
    """GSM8K as GRPO rows `{"prompt": [system, user], "answer": "72", "question": ...}`.

    From `path` (a JSONL/... file, or a folder holding `{split}.jsonl` and the like) when given, else from
    the hub (`openai/gsm8k`, config `main`). Follows the notebook's `get_gsm8k_questions`.
    """
    raw = load_dataset_file(path, split=split) if path is not None else \
        datasets.load_dataset(GSM8K_HUB_ID, GSM8K_CONFIG, split=split)
    missing = {"question", "answer"} - set(raw.column_names)
    if missing:
        raise ValueError(f"GSM8K data {path or GSM8K_HUB_ID!r} lacks column(s) {sorted(missing)}; "
                         f"it has {raw.column_names}")
    return datasets.Dataset.from_list([gsm8k_row(ex, system_prompt) for ex in raw])

"""Data: GSM8K rows (against a plain-json reading of the real rows), the generic file loader and its errors,
and prompt rendering / tokenisation with the real Qwen2.5 tokenizer."""
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tiny
from ahazero.data import (
    SYSTEM_PROMPT,
    is_conversational,
    load_any,
    load_dataset_file,
    load_gsm8k,
    render_prompt,
    tokenize_prompts,
)
from ahazero.rewards import GSM8K_NOTEBOOK_REWARDS, numeric_correctness_reward_func, run_reward_funcs

NOTEBOOK_SYSTEM_PROMPT = """
Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""


def raw_rows(split):
    with open(tiny.GSM8K_DIR / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


# ---- GSM8K ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "test"])
def test_load_gsm8k_matches_the_notebook_rows(split):
    ds = load_gsm8k(split, path=tiny.GSM8K_DIR)
    raw = raw_rows(split)
    assert SYSTEM_PROMPT == NOTEBOOK_SYSTEM_PROMPT
    assert len(ds) == len(raw) == 200 and set(ds.column_names) == {"prompt", "answer", "question"}
    for row, ex in zip(ds, raw):
        assert row["prompt"] == [{"role": "system", "content": NOTEBOOK_SYSTEM_PROMPT},
                                 {"role": "user", "content": ex["question"]}]
        assert row["answer"] == ex["answer"].split("####")[1].strip()
        assert row["question"] == ex["question"]
    if split == "test":
        assert "2,125" in ds["answer"]  # kept as written: numeric correctness reads it as 2125


def test_load_gsm8k_from_one_file_and_custom_system_prompt():
    ds = load_gsm8k("ignored-for-a-file", path=tiny.GSM8K_DIR / "train.jsonl", system_prompt="Think.")
    assert len(ds) == 200 and ds[0]["prompt"][0] == {"role": "system", "content": "Think."}
    assert ds[0]["answer"] == "72"


def test_load_gsm8k_from_hub_asks_for_openai_gsm8k_main(monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(raw_rows("test")[:3])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_gsm8k("test")
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"})]
    assert len(ds) == 3 and ds[0]["answer"] == raw_rows("test")[0]["answer"].split("#### ")[1]


def test_load_gsm8k_wrong_columns(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"q": "x", "a": "1"}\n')
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['answer', 'question'\]"):
        load_gsm8k(path=tmp_path)


def test_gsm8k_perfect_completions_score_full_marks():
    ds = load_gsm8k("test", path=tiny.GSM8K_DIR)
    completions = [[{"role": "assistant", "content": f"<reasoning>\nr\n</reasoning>\n<answer>\n{a}\n</answer>\n"}]
                   for a in ds["answer"]]
    funcs = [*GSM8K_NOTEBOOK_REWARDS, numeric_correctness_reward_func]
    rewards = run_reward_funcs(funcs, prompts=ds["prompt"], completions=completions,
                               completion_ids=[[0]] * len(ds), columns={"answer": ds["answer"]})
    assert rewards.shape == (200, 6)
    assert (rewards[:, 4] == 2.0).all() and (rewards[:, 5] == 2.0).all()  # correctness, numeric correctness
    assert (rewards[:, 3] == 0.5).sum() == 199  # int_reward: all digits except "2,125"


# ---- files ------------------------------------------------------------------------------------------
ROWS = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]


def write(path, kind, rows=ROWS):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "csv":
        path.write_text("prompt,answer\n" + "".join(f"{r['prompt']},{r['answer']}\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
def test_load_dataset_file_kinds(tmp_path, kind):
    ds = load_dataset_file(write(tmp_path / f"d.{kind}", kind))
    got = ds.to_list()
    if kind == "csv":  # CSV columns get inferred types, as with `datasets`' CSV loader
        got = [{k: str(v) for k, v in r.items()} for r in got]
    assert got == ROWS


@pytest.mark.parametrize("content", [
    json.dumps({"prompt": ["1+1=", "2+2="], "answer": ["2", "4"]}),  # columns
    json.dumps({"data": ROWS}),  # one key holding the rows
    "\n".join(json.dumps(r) for r in ROWS),  # JSON lines in a .json file
])
def test_load_dataset_file_json_shapes(tmp_path, content):
    (tmp_path / "d.json").write_text(content)
    assert load_dataset_file(tmp_path / "d.json").to_list() == ROWS


def test_load_dataset_file_folder_splits_and_shards(tmp_path):
    write(tmp_path / "train.jsonl", "jsonl")
    write(tmp_path / "test.jsonl", "jsonl", ROWS[:1])
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "validation-00000-of-00002.parquet", "parquet", ROWS[:1])
    write(tmp_path / "data" / "validation-00001-of-00002.parquet", "parquet", ROWS[1:])
    assert len(load_dataset_file(tmp_path)) == 2  # no split: train
    assert len(load_dataset_file(tmp_path, split="test")) == 1
    assert load_dataset_file(tmp_path, split="validation").to_list() == ROWS
    with pytest.raises(FileNotFoundError, match="no data file for split 'dev'"):
        load_dataset_file(tmp_path, split="dev")


def test_load_dataset_file_ambiguous_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data files"):
        load_dataset_file(tmp_path)
    write(tmp_path / "a.jsonl", "jsonl")
    assert len(load_dataset_file(tmp_path)) == 2  # the only file
    write(tmp_path / "b.jsonl", "jsonl")
    with pytest.raises(ValueError, match="several data files"):
        load_dataset_file(tmp_path)


@pytest.mark.parametrize("name, content, error, match", [
    ("missing.jsonl", None, FileNotFoundError, "missing.jsonl: no such file"),
    ("empty.jsonl", "", ValueError, "empty.jsonl: the file is empty"),
    ("blank.jsonl", "\n\n", ValueError, "blank.jsonl: the file holds no rows"),
    ("bad.jsonl", '{"a": 1}\n{"a": \n', ValueError, "bad.jsonl: line 2 is not valid JSON"),
    ("list.jsonl", "[1, 2]\n", ValueError, "list.jsonl: line 1 is a JSON list"),
    ("bad.json", "{not json", ValueError, "bad.json: not valid JSON"),
    ("scalar.json", "3", ValueError, "scalar.json: expected a list of row objects"),
    ("mixed.jsonl", '{"a": 1}\n{"a": [1]}\n', ValueError, "mixed.jsonl: rows do not form a table"),
    ("header.csv", "a,b\n", ValueError, "header.csv: the file holds no rows"),
    ("bad.parquet", "not parquet", ValueError, "bad.parquet: cannot read it as parquet"),
    ("latin1.jsonl", b'{"a": "\xe9"}\n', ValueError, "latin1.jsonl: cannot read it as jsonl"),
    ("d.txt", "hello", ValueError, "d.txt: unknown data file type"),
])
def test_load_dataset_file_errors_name_the_path(tmp_path, name, content, error, match):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(error, match=match):
        load_dataset_file(path)


def test_load_any_local_or_hub(tmp_path, monkeypatch):
    assert len(load_any(write(tmp_path / "d.jsonl", "jsonl"))) == 2
    assert len(load_any(str(tmp_path))) == 2
    for spec in ["./nope.jsonl", "/no/such/dir", "data.parquet"]:
        with pytest.raises(FileNotFoundError):
            load_any(spec)
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or "DS")
    assert load_any("someone/some-data", split="test", config="main") == "DS"
    assert load_any("someone/other") == "DS"
    assert calls == [(("someone/some-data", "main"), {"split": "test"}), (("someone/other", None), {"split": "train"})]


def test_load_any_hub_failure_says_it_tried_the_hub(monkeypatch):
    def fail(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(ConnectionError) as info:
        load_any("someone/data")
    assert any("Hugging Face hub" in note for note in info.value.__notes__)


# ---- prompts ----------------------------------------------------------------------------------------
def test_is_conversational():
    assert is_conversational([{"role": "user", "content": "hi"}])
    assert is_conversational(({"role": "user", "content": "hi"},))
    for prompt in ["hi", [], ["hi"], [{"content": "hi"}], None, {"role": "user", "content": "hi"}]:
        assert not is_conversational(prompt)


def test_render_prompt_with_the_real_template():
    tok = tiny.tokenizer()
    prompt = load_gsm8k("train", path=tiny.GSM8K_DIR)[0]["prompt"]
    text = render_prompt(tok, prompt)
    assert text == tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n" + SYSTEM_PROMPT) and text.endswith("<|im_start|>assistant\n")
    assert render_prompt(tok, "plain text") == "plain text"
    prefilled = render_prompt(tok, [*prompt, {"role": "assistant", "content": "<reasoning>\n"}])
    assert prefilled.endswith("<|im_start|>assistant\n<reasoning>\n")  # continued, not closed
    with pytest.raises(TypeError, match="a prompt must be"):
        render_prompt(tok, [])


class NoTemplateTokenizer:
    chat_template = None


def test_render_prompt_without_chat_template():
    assert render_prompt(NoTemplateTokenizer(), "plain") == "plain"
    with pytest.raises(ValueError, match="has no chat template"):
        render_prompt(NoTemplateTokenizer(), [{"role": "user", "content": "hi"}])


def test_tokenize_prompts_matches_one_at_a_time_and_truncates_left():
    tok = tiny.tokenizer()
    prompts = load_gsm8k("test", path=tiny.GSM8K_DIR)["prompt"][:20] + ["a plain prompt", "x " * 300]
    texts = [render_prompt(tok, p) for p in prompts]
    full = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    ids, n_trunc = tokenize_prompts(tok, prompts, None)
    assert ids == full and n_trunc == 0
    assert [tok.decode(x) for x in ids] == texts  # nothing added: the template wrote every special token
    assert ids[0][0] == tok.convert_tokens_to_ids("<|im_start|>")

    limit = sorted(len(x) for x in full)[len(full) // 2]
    ids, n_trunc = tokenize_prompts(tok, prompts, limit)
    assert ids == [x[-limit:] for x in full]  # the LAST tokens are kept
    assert n_trunc == sum(len(x) > limit for x in full) > 0
    assert all(x[-3:] == f[-3:] for x, f in zip(ids, full))  # generation prompt survives truncation
    assert tokenize_prompts(tok, [], 8) == ([], 0)
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_prompts(tok, prompts, 0)

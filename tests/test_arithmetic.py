"""The synthetic arithmetic task and the tiny model shipped for `ahazero train` with no arguments."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ahazero.data import arithmetic as ar

MODEL_DIR = Path(ar.__file__).resolve().parents[1] / "assets" / "tiny-reasoner"
_NUMBER = {"doubles": 2, "triples": 3}


def _reference_answer(question: str) -> int:
    """Re-derive the answer from the question text alone, by a different route than `Problem.answer`."""
    sentences = re.findall(r"[^.?]+[.?]", question)
    value = int(re.search(r"\d+", sentences[0]).group())
    for s in sentences[1:-1]:
        numbers = [int(x) for x in re.findall(r"\d+", s)]
        if "doubles" in s or "triples" in s:
            value *= _NUMBER["doubles" if "doubles" in s else "triples"]
        elif "times as many" in s:
            value *= numbers[0]
        elif re.search(r"gives away|loses|takes|sells", s):
            value -= numbers[0]
        else:  # buys / finds / wins / friend gives ... more
            value += numbers[0]
    return value


def test_generator_is_seeded():
    assert ar.generate_problems(50, seed=3) == ar.generate_problems(50, seed=3)
    assert ar.generate_problems(50, seed=3) != ar.generate_problems(50, seed=4)
    a, b = ar.make_dataset(20, seed=1, split="test"), ar.make_dataset(20, seed=1, split="test")
    assert a.to_list() == b.to_list()


def test_splits_are_disjoint_whatever_the_seed():
    train = {p.question for s in (0, 1) for p in ar.generate_problems(3000, seed=s, split="train")}
    test = {p.question for s in (0, 1) for p in ar.generate_problems(500, seed=s, split="test")}
    assert not train & test
    assert all(ar.split_of(q) == "test" for q in test)


def test_answers_are_right():
    for p in ar.generate_problems(500, seed=0) + ar.generate_problems(200, seed=0, split="test"):
        assert p.answer == _reference_answer(p.question), p
        assert 1 <= p.answer <= ar.MAX_VALUE
        assert 2 <= len(p.steps) <= 3
        lines = ar.solution_lines(p)
        assert all(eval(line.split("=")[0]) == int(line.split("=")[1]) for line in lines)  # noqa: S307
        assert int(lines[-1].split("=")[1]) == p.answer


def test_dataset_rows_have_the_gsm8k_row_format():
    ds = ar.make_dataset(5, seed=0, split="train")
    assert set(ds.column_names) == {"prompt", "answer"}
    row = ds[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["prompt"][0]["content"] == ar.SYSTEM_PROMPT
    assert "<reasoning>" in ar.SYSTEM_PROMPT and "<answer>" in ar.SYSTEM_PROMPT
    assert row["answer"].isdigit()
    with pytest.raises(ValueError, match="split"):
        ar.make_dataset(5, split="validation")


def test_solution_is_in_the_format():
    p = ar.generate_problems(1, seed=0)[0]
    text = ar.solution(p)
    assert re.fullmatch(r"<reasoning>\n(.+\n)+</reasoning>\n<answer>\n\d+\n</answer>\n", text)
    assert text.split("<answer>\n")[1].split("\n")[0] == str(p.answer)


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    return model, tokenizer


def test_shipped_model_folder_is_small_and_complete():
    files = {f.name for f in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) < 20 * 2**20


def test_shipped_tokenizer_has_the_chat_template(shipped):
    _, tokenizer = shipped
    messages = ar.prompt_messages("Mia has 3 apples. She buys 4 more. How many apples does Mia have now?")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n" + ar.SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    no_system = tokenizer.apply_chat_template(messages[1:], add_generation_prompt=True, tokenize=False)
    assert no_system == text  # the task's system prompt is the default
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text  # lossless, special tokens included
    assert tokenizer.decode(tokenizer("Any text: é ✓ 123\n").input_ids) == "Any text: é ✓ 123\n"  # byte-level


def test_shipped_model_greedy_generates_the_format(shipped):
    model, tokenizer = shipped
    assert model.config.eos_token_id == tokenizer.eos_token_id
    problems = ar.generate_problems(4, seed=123, split="test")
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(ar.prompt_messages(p.question), add_generation_prompt=True, tokenize=False)
             for p in problems]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=96, do_sample=False)
    for row, p in zip(out[:, batch.input_ids.shape[1]:], problems):
        completion = tokenizer.decode(row, skip_special_tokens=True)
        assert re.fullmatch(r"<reasoning>\n(\d+ [-+*] \d+ = -?\d+\n)+</reasoning>\n<answer>\n-?\d+\n</answer>\n",
                            completion), completion
        assert tokenizer.eos_token_id in row.tolist()

"""The `ahazero` command: the built-in default (shortened), eval, generate, export, and bad input."""
import json

import pytest

import tiny
from ahazero.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A shortened `ahazero train` on the built-in default."""
    out = tmp_path_factory.mktemp("demo") / "out"
    code = main(["train", "--output-dir", str(out), "--set", "train.max_steps=3", "--set", "train.save_steps=3",
                 "--set", "eval.n=24", "--set", "data.size=64", "--set", "train.per_device_train_batch_size=16"])
    assert code == 0
    return out


def test_default_job_writes_metrics_summary_and_plot(demo_run, capsys):
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["steps"] == 3
    assert 0 <= summary["eval_accuracy_before"] <= 1 and 0 <= summary["eval_accuracy_after"] <= 1
    assert summary["eval_before"]["format_rate"] > 0.9  # the shipped model knows the format
    assert summary["wall_seconds"] > 0
    rows = [json.loads(line) for line in (demo_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0 <= r["reward"] <= 3 and r["kl"] >= 0 for r in rows)
    png = (demo_run / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (demo_run / "final_lora" / "adapter_config.json").is_file()


def test_a_second_fresh_run_keeps_the_first(demo_run):
    main(["train", "--output-dir", str(demo_run), "--set", "train.max_steps=1", "--set", "eval.n=0",
          "--set", "data.size=16", "--set", "train.per_device_train_batch_size=8"])
    previous = [p for p in demo_run.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1
    assert (previous[0] / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert len((demo_run / "metrics.jsonl").read_text().splitlines()) == 1


def test_eval_and_generate_on_the_builtin_model(demo_run, capsys):
    assert main(["eval", "--model", "builtin:tiny-reasoner", "--adapter", str(demo_run / "final_lora"),
                 "--dataset", "demo", "--n", "12", "--samples", "3", "--max-tokens", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 12 and result["samples"] == 3
    assert 0 <= result["accuracy"] <= result["pass_at_k"] <= 1 and result["maj_at_k"] is not None
    assert main(["generate", "--model", "builtin:tiny-reasoner", "--max-tokens", "64",
                 "Mia has 14 apples. She buys 9 more. How many apples does Mia have now?"]) == 0
    assert "<answer>" in capsys.readouterr().out
    assert main(["generate", "--model", "builtin:tiny-reasoner", "--max-tokens", "64", "--load-in-4bit",
                 "Mia has 14 apples. She buys 9 more. How many apples does Mia have now?"]) == 0
    assert "<answer>" in capsys.readouterr().out  # the NF4 model still writes the format


def test_eval_on_a_local_gsm8k_file(tmp_path, capsys):
    model = tiny.save_tiny_model(tmp_path / "m", "qwen2")
    assert main(["eval", "--model", str(model), "--dataset", str(tiny.GSM8K_DIR / "test.jsonl"), "--n", "3",
                 "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "pass@1" in out and "problems    3" in out


def test_export_merged_from_the_cli(demo_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "merged"
    assert main(["export", "--model", "builtin:tiny-reasoner", "--adapter", str(demo_run / "final_lora"),
                 "--to", "merged_16bit", "--out", str(out)]) == 0
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--model", "/no/such/model", "--dataset", "demo", "--n", "2"], "/no/such/model"),
    (["generate", "--model", "builtin:tiny-reasoner", "--adapter", "/no/such/adapter", "hi"], "/no/such/adapter"),
    (["train", "/no/such/config.yaml"], "/no/such/config.yaml"),
    (["train", "--set", "nonsense"], "key=value"),
])
def test_bad_paths_are_clear_errors(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_corrupt_model_folder_and_foreign_adapter_and_empty_dataset(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert main(["eval", "--model", str(broken), "--dataset", "demo", "--n", "2"]) == 2
    assert str(broken) in capsys.readouterr().err

    # an adapter trained on another base model (hidden size 64 vs the tiny reasoner's)
    from ahazero import FastLanguageModel
    other, _ = FastLanguageModel.from_pretrained(str(tiny.save_tiny_model(tmp_path / "other", "qwen2")))
    other = FastLanguageModel.get_peft_model(other, r=4, lora_alpha=4, use_gradient_checkpointing=False)
    other.save_pretrained(tmp_path / "foreign")
    assert main(["generate", "--model", "builtin:tiny-reasoner", "--adapter", str(tmp_path / "foreign"), "hi"]) == 2
    assert "does not fit" in capsys.readouterr().err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["eval", "--model", "builtin:tiny-reasoner", "--dataset", str(empty), "--n", "2"]) == 2
    assert str(empty) in capsys.readouterr().err

"""The notebook users bring from Unsloth/TRL (shared/examples/seed_notebook.py, copied into tests/assets)
runs to DONE on the CPU: load, LoRA, GRPO, fast_generate with and without a saved LoRA, every save."""
import json
import os
import subprocess
import sys

import pytest

import tiny

# the notebook as Unsloth ships it: 4-bit base, 8-bit paged optimizer, a merged 4-bit save
QLORA_EDITS = [("load_in_4bit = False", "load_in_4bit = True"),
               ('optim = "adamw_torch" if not cli.gpu else "paged_adamw_8bit"', 'optim = "paged_adamw_8bit"'),
               ('save_method = "merged_16bit"', 'save_method = "merged_4bit"')]


@pytest.mark.slow
@pytest.mark.parametrize("edits", [[], QLORA_EDITS], ids=["16bit", "qlora"])
def test_seed_notebook_runs_to_done(tmp_path, edits):
    shared = tmp_path / "shared"  # the layout the notebook expects beside itself
    (shared / "examples").mkdir(parents=True)
    (shared / "models").mkdir()
    (shared / "data").mkdir()
    text = (tiny.ASSETS / "seed_notebook.py").read_text()
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (shared / "examples" / "seed_notebook.py").write_text(text)
    os.symlink(tiny.ASSETS / "configs", shared / "models" / "configs")
    os.symlink(tiny.TOKENIZER_DIR, shared / "models" / "qwen2.5-tokenizer")
    os.symlink(tiny.GSM8K_DIR, shared / "data" / "gsm8k")
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run([sys.executable, str(shared / "examples" / "seed_notebook.py"), "--workdir", str(work)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "DONE" in run.stdout
    assert (work / "outputs" / "metrics.jsonl").is_file()
    saved = json.loads((work / "model" / "config.json").read_text())
    assert ("quantization_config" in saved) == bool(edits)

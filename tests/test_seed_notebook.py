"""The notebook users bring from Unsloth/TRL (shared/examples/seed_notebook.py, copied into tests/assets)
runs to DONE on the CPU: load, LoRA, GRPO, fast_generate with and without a saved LoRA, every save."""
import os
import shutil
import subprocess
import sys

import tiny


def test_seed_notebook_runs_to_done(tmp_path):
    shared = tmp_path / "shared"  # the layout the notebook expects beside itself
    (shared / "examples").mkdir(parents=True)
    (shared / "models").mkdir()
    (shared / "data").mkdir()
    shutil.copy(tiny.ASSETS / "seed_notebook.py", shared / "examples" / "seed_notebook.py")
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

"""Robustness of training: non-finite steps are skipped, SIGTERM saves and exits cleanly, SIGKILL at any
moment (generation, backward, checkpoint write) loses nothing, and loading never runs pickles or remote code.

The kill tests run training in child processes forked from one "zygote" process (a script written to
tmp_path) that imported torch and ahazero and loaded the tiny model and its LoRA adapter once: each child
starts in ~0 s from exactly the state a fresh `from_pretrained` + `get_peft_model` gives, so several killed
and resumed runs fit in a few seconds of a 2-core machine. Run with `pytest -s` to see the fault counts.
"""
import ast
import inspect
import json
import math
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from ahazero import FastLanguageModel, GRPOConfig, GRPOTrainer
from ahazero.data import load_gsm8k
from ahazero.grpo import trainer as trainer_module
from ahazero.grpo.checkpoint import list_checkpoints

SRC = Path(__file__).resolve().parent.parent / "src" / "ahazero"
STEPS = 6  # optimizer steps of the runs the kill tests compare
N_KILLS = 8  # SIGKILLs injected at random moments before a run may finish


def odd_token_reward(completion_ids, **kwargs):
    """Varies between completions of random models, so advantages are non-zero."""
    return [sum(t % 2 for t in ids) / max(len(ids), 1) for ids in completion_ids]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save_tiny_model(tmp_path_factory.mktemp("qwen2") / "model", "qwen2")


@pytest.fixture(scope="module")
def gsm8k():
    return load_gsm8k("train", path=str(tiny.GSM8K_DIR / "train.jsonl")).select(range(16))


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- non-finite steps -------------------------------------------------------------------------------

class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.nan)


class _Snapshots:
    """Adapter weights after every step (index 0: before the first)."""

    def __init__(self, model):
        self.weights = [adapter_weights(model)]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append(adapter_weights(model))


def _nonfinite_trainer(model_dir, gsm8k, tmp_path, monkeypatch, bad_steps, kind, **kw):
    """A trainer whose loss (kind="loss") or gradient (kind="grad") is NaN on the 1-based `bad_steps`."""
    model, tok = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=256)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0,
                                             use_gradient_checkpointing=False)
    snapshots = _Snapshots(model)
    args = GRPOConfig(output_dir=str(tmp_path / "out"), num_generations=2, per_device_train_batch_size=4,
                      max_prompt_length=160, max_completion_length=8, learning_rate=5e-3, save_steps=100,
                      seed=3, disable_tqdm=True, **kw)
    trainer = GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=gsm8k,
                          reward_funcs=odd_token_reward, callbacks=[snapshots])
    real = trainer_module.per_token_loss

    def per_token_loss(logps, *a, **k):
        loss_tokens, stats = real(logps, *a, **k)
        if trainer.state.global_step + 1 in bad_steps:
            loss_tokens = loss_tokens * math.nan if kind == "loss" else _NanGrad.apply(loss_tokens)
        return loss_tokens, stats

    monkeypatch.setattr(trainer_module, "per_token_loss", per_token_loss)
    return trainer, snapshots


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_step_is_skipped_and_logged(model_dir, gsm8k, tmp_path, monkeypatch, kind):
    trainer, snap = _nonfinite_trainer(model_dir, gsm8k, tmp_path, monkeypatch, {2, 4}, kind,
                                       max_steps=5, max_nonfinite_steps=2)
    trainer.train()  # two NaN steps, never two in a row: no error
    rows = read_metrics(tmp_path / "out")
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 0, 1, 0]
    assert rows[1]["grad_norm"] is None and math.isfinite(rows[2]["grad_norm"])  # NaN is logged as null
    w = snap.weights
    for step in (2, 4):  # skipped: the weights are bit for bit those of the step before
        assert all(torch.equal(w[step][n], w[step - 1][n]) for n in w[0]), f"step {step} changed the adapter"
    for step in (1, 3, 5):  # the finite steps around them still train, and nothing NaN leaked in
        assert any(not torch.equal(w[step][n], w[step - 1][n]) for n in w[0]), f"step {step} did not train"
        assert all(torch.isfinite(t).all() for t in w[step].values())
    adam_steps = {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert adam_steps == {3.0}  # the optimizer saw 3 of the 5 steps
    assert trainer.scheduler.last_epoch == 3


def test_consecutive_nonfinite_steps_stop_with_a_clear_error(model_dir, gsm8k, tmp_path, monkeypatch):
    trainer, snap = _nonfinite_trainer(model_dir, gsm8k, tmp_path, monkeypatch, {2, 3, 4, 5}, "loss",
                                       max_steps=6, max_nonfinite_steps=3)
    with pytest.raises(FloatingPointError, match=r"3 steps in a row had a non-finite loss or gradient") as info:
        trainer.train()
    msg = str(info.value)
    assert "last finite step" in msg and "learning_rate" in msg
    assert trainer.state.global_step == 3  # the third NaN in a row (step 4) raised before it counted
    assert [r["nonfinite_skipped"] for r in read_metrics(tmp_path / "out")] == [0, 1, 1]
    last = snap.weights[-1]
    assert all(torch.equal(last[n], snap.weights[1][n]) for n in last)  # those of step 1


# ---- the zygote: children forked from a process that loaded everything once ----------------------

ZYGOTE = r'''
import json, os, sys, time, traceback
import torch
torch.set_num_threads(1)
sys.path.insert(0, TESTS_DIR)
import tiny
from ahazero import FastLanguageModel, GRPOConfig, GRPOTrainer
from ahazero.data import load_gsm8k
from ahazero.grpo import checkpoint as ckpt

dataset = load_gsm8k("train", path=str(tiny.GSM8K_DIR / "train.jsonl")).select(range(16))
model, tok = FastLanguageModel.from_pretrained(sys.argv[1], max_seq_length=256)
model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0,
                                         use_gradient_checkpointing=False)


def odd_token_reward(completion_ids, **kwargs):
    return [sum(t % 2 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def hang_in_fsync(step, marker):
    """save_checkpoint of `step` stops inside its fsync (the files are written, the rename is not done)."""
    real = ckpt._fsync_tree

    def fsync_tree(folder):
        real(folder)
        if folder.name.startswith(f"checkpoint-{step}.tmp"):
            open(marker, "w").write(str(folder))
            time.sleep(3600)
    ckpt._fsync_tree = fsync_tree


def train(job):
    if job.get("hang_in_fsync_at"):
        hang_in_fsync(job["hang_in_fsync_at"], job["marker"])
    args = GRPOConfig(output_dir=job["out"], max_steps=job["steps"], save_steps=job.get("save_steps", 1),
                      num_generations=2, per_device_train_batch_size=4, max_prompt_length=96,
                      max_completion_length=8, learning_rate=5e-3, seed=11, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=dataset,
                          reward_funcs=odd_token_reward)
    trainer.train(resume_from_checkpoint=True if job["resume"] else None)


print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: its output goes to the job's log, never to the zygote's protocol pipe
        code = 1
        try:
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            train(job)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"pid": pid, "exit": os.waitstatus_to_exitcode(status)}), flush=True)
'''


class Zygote:
    def __init__(self, tmp: Path, model_dir: Path):
        script = tmp / "zygote.py"
        script.write_text(f"TESTS_DIR = {str(Path(__file__).resolve().parent)!r}\n" + ZYGOTE)
        self.tmp, self.runs = tmp, 0
        self.stderr = open(tmp / "zygote.err", "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(script), str(model_dir)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._next(180) == {"ready": True}, (tmp / "zygote.err").read_text()[-3000:]

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def _next(self, timeout):
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        assert msg is not None, "the zygote died: " + (self.tmp / "zygote.err").read_text()[-3000:]
        return msg

    def start(self, out: Path, steps: int, resume: bool, **job) -> int:
        self.runs += 1
        self.log = self.tmp / f"run-{self.runs}.log"
        job.update(out=str(out), steps=steps, resume=resume, log=str(self.log))
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._next(60)["pid"]

    def wait(self, timeout: float) -> int | None:
        """The exit code of the running child (-9: SIGKILL), or None if it still runs after `timeout`."""
        msg = self._next(timeout)
        return None if msg is None else msg["exit"]

    def run(self, out: Path, steps: int, resume: bool = False, **job) -> None:
        self.start(out, steps, resume, **job)
        code = self.wait(300)
        assert code == 0, self.log.read_text()[-3000:]

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory, model_dir):
    z = Zygote(tmp_path_factory.mktemp("zygote"), model_dir)
    yield z
    z.close()


@pytest.fixture(scope="module")
def reference(zygote, tmp_path_factory):
    """The uninterrupted run: its final adapter and how long its training took."""
    out = tmp_path_factory.mktemp("reference") / "out"
    t0 = time.perf_counter()
    zygote.run(out, STEPS)
    return load_file(str(out / f"checkpoint-{STEPS}" / "trainable.safetensors")), time.perf_counter() - t0


def assert_same_adapter(out: Path, want: dict[str, torch.Tensor]) -> None:
    got = load_file(str(out / f"checkpoint-{STEPS}" / "trainable.safetensors"))
    assert set(got) == set(want) and any("lora_" in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def assert_checkpoint_readable(path: Path) -> None:
    """Every file of a complete checkpoint parses (safetensors; torch.load with weights_only=True)."""
    assert load_file(str(path / "trainable.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt"):
        torch.load(path / name, map_location="cpu", weights_only=True)
    assert json.loads((path / "trainer_state.json").read_text())["global_step"] == int(path.name.split("-")[1])


# ---- SIGTERM ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_writes_a_final_checkpoint_and_exits_cleanly(zygote, tmp_path):
    out = tmp_path / "out"
    pid = zygote.start(out, steps=1000, resume=False, save_steps=1000)
    deadline = time.monotonic() + 120
    while not read_metrics(out) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert read_metrics(out), zygote.log.read_text()[-3000:]
    os.kill(pid, signal.SIGTERM)
    assert zygote.wait(120) == 0, zygote.log.read_text()[-3000:]
    last = read_metrics(out)[-1]["step"]
    assert 1 <= last < 1000
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{last}"]  # only the final one
    assert_checkpoint_readable(out / f"checkpoint-{last}")
    assert "SIGTERM received" in zygote.log.read_text()
    print(f"\nSIGTERM: 1 injected, 1 survived (stopped after step {last}, checkpoint-{last} written)")


# ---- SIGKILL fault injection -------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_adapter(zygote, reference, tmp_path):
    want, duration = reference
    out, rng = tmp_path / "out", random.Random(20240609)
    kills, runs, mid_write, from_scratch = 0, 0, 0, 0
    while True:
        done = int(list_checkpoints(out)[-1].name.split("-")[1]) if list_checkpoints(out) else 0
        resume = done > 0  # resume_from_checkpoint=True with no checkpoint yet raises: start afresh instead
        from_scratch += not resume
        pid = zygote.start(out, STEPS, resume)
        runs += 1
        # a random moment within what is left to do, while kills remain to inject; afterwards, to the end
        leftovers = {p.name for p in out.iterdir() if ".tmp" in p.name} if out.is_dir() else set()
        code = zygote.wait(rng.uniform(0.0, duration * (STEPS - done) / STEPS) if kills < N_KILLS else 300)
        if code is None:
            os.kill(pid, signal.SIGKILL)
            code = zygote.wait(60)
            assert code == -signal.SIGKILL
            kills += 1
            mid_write += any(".tmp" in p.name and p.name not in leftovers for p in out.iterdir())
            if list_checkpoints(out):
                assert_checkpoint_readable(list_checkpoints(out)[-1])
            continue
        assert code == 0, zygote.log.read_text()[-3000:]
        break
    assert kills >= N_KILLS // 2, "too few kills landed inside a run: the random delays need adjusting"
    assert_same_adapter(out, want)
    print(f"\nSIGKILL at random moments: {kills} injected, {kills} survived ({runs} runs, {from_scratch} started "
          f"without a checkpoint, {mid_write} killed inside a checkpoint write); final adapter == uninterrupted")


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(zygote, reference, tmp_path):
    want, _ = reference
    out, marker = tmp_path / "out", tmp_path / "in-fsync"
    pid = zygote.start(out, STEPS, False, hang_in_fsync_at=3, marker=str(marker))
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), zygote.log.read_text()[-3000:]
    os.kill(pid, signal.SIGKILL)
    assert zygote.wait(60) == -signal.SIGKILL
    leftovers = [p.name for p in out.iterdir() if p.name.startswith("checkpoint-3.tmp")]
    assert len(leftovers) == 1 and not (out / "checkpoint-3").exists()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]  # the half write ignored
    assert_checkpoint_readable(out / "checkpoint-2")
    zygote.run(out, STEPS, resume=True)  # resumes from checkpoint-2
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert_same_adapter(out, want)
    print("\nSIGKILL inside a checkpoint write: 1 injected, 1 survived (checkpoint-2 chosen, adapter == uninterrupted)")


# ---- loading safety ----------------------------------------------------------------------------------

def test_from_pretrained_does_not_trust_remote_code_by_default():
    assert inspect.signature(FastLanguageModel.from_pretrained).parameters["trust_remote_code"].default is False


def test_ahazero_never_calls_torch_load_without_weights_only():
    calls = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
                calls.append((f"{path.relative_to(SRC)}:{node.lineno}", ok))
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "cloudpickle"} & set(names), f"{path}: imports a pickle module"
    assert calls, "no torch.load found: the scan is broken"
    assert all(ok for _, ok in calls), [where for where, ok in calls if not ok]

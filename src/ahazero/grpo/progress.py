"""Honest progress: every logged step goes to metrics.jsonl, TensorBoard when asked, and the terminal.

In a terminal the last rows of a metrics table sit live above a progress bar (rich); elsewhere (CI, a
log file) each logged step is one plain line.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

_TABLE_ROWS = 12


def table_columns(reward_names: list[str], with_kl: bool) -> list[tuple[str, str]]:
    """(metric key, column title) pairs shown in the live table."""
    cols = [("reward", "reward"), ("reward_std", "std")]
    cols += [(f"rewards/{n}/mean", _short(n)) for n in reward_names]
    cols += [("completions/mean_length", "len"), ("completions/clipped_ratio", "clip%")]
    if with_kl:
        cols.append(("kl", "kl"))
    cols += [("loss", "loss"), ("grad_norm", "gnorm"), ("step_time", "s/step")]
    return cols


def _short(name: str) -> str:
    return name.removesuffix("_reward_func").removesuffix("_reward")[:12]


def format_value(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


class MetricsLogger:
    def __init__(self, output_dir: str | Path, total_steps: int, reward_names: list[str], with_kl: bool,
                 report_to: list[str], logging_dir: str | None = None, live: bool | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns = table_columns(reward_names, with_kl)
        self.rows: list[dict] = []
        self.console = Console(stderr=False)
        self.live_mode = self.console.is_terminal if live is None else live
        self.tb = _tensorboard(logging_dir or str(Path(output_dir) / "runs")) if "tensorboard" in report_to else None
        self.progress = Progress(TextColumn("GRPO"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), console=self.console)
        self.task = self.progress.add_task("train", total=total_steps)
        self.live = None
        self.started = time.time()

    def start(self, completed: int = 0) -> None:
        """Keeps the rows of steps up to `completed` (a resumed run), drops any logged after them."""
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= completed]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.progress.update(self.task, completed=completed)
        if self.live_mode:
            self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def advance(self, step: int) -> None:
        self.progress.update(self.task, completed=step)
        if self.live:
            self.live.update(self._render())

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        self.rows.append(record)
        if self.live:
            self.live.update(self._render())
        else:
            cells = " ".join(f"{title}={format_value(record.get(key))}" for key, title in self.columns)
            print(f"step {step:>5} {cells}", flush=True, file=sys.stdout)

    def print(self, text: str) -> None:
        self.console.print(text)

    def close(self) -> None:
        if self.live:
            self.live.update(self._render())
            self.live.stop()
            self.live = None
        if self.tb is not None:
            self.tb.close()

    def _render(self):
        table = Table(box=None, header_style="bold", pad_edge=False)
        table.add_column("step", justify="right")
        for _, title in self.columns:
            table.add_column(title, justify="right")
        for r in self.rows[-_TABLE_ROWS:]:
            table.add_row(str(r["step"]), *(format_value(r.get(k)) for k, _ in self.columns))
        return Group(table, self.progress)


class NullLogger:
    """MetricsLogger's interface doing nothing: the logger of ranks other than 0 under torchrun."""

    def start(self, completed: int = 0) -> None:
        pass

    def advance(self, step: int) -> None:
        pass

    def log(self, step: int, metrics: dict) -> None:
        pass

    def print(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def _tensorboard(logdir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("report_to='tensorboard' needs the tensorboard package: "
                          "pip install 'ahazero[tensorboard]'") from e
    return SummaryWriter(log_dir=logdir)

"""training.png: reward (total and per function), completion length and KL against step."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_training(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_jsonl)
    if not rows:
        raise ValueError(f"no metrics in {metrics_jsonl}")
    steps = [r["step"] for r in rows]
    reward_keys = sorted({k for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, [r.get("reward") for r in rows], label="total", linewidth=2)
    for k in reward_keys:
        axes[0].plot(steps, [r.get(k) for r in rows], label=k.split("/")[1], alpha=0.7)
    axes[0].set_title("reward")
    axes[0].legend(fontsize=7)
    axes[1].plot(steps, [r.get("completions/mean_length") for r in rows])
    axes[1].set_title("completion length (tokens)")
    axes[2].plot(steps, [r.get("kl", float("nan")) if r.get("kl") is not None else float("nan") for r in rows])
    axes[2].set_title("KL to the base model")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png

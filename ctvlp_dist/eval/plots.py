"""The report's figures (matplotlib, no display needed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_grid(Y: np.ndarray, S: np.ndarray, names: list[str], aucs: list[float], path: Path) -> Path:
    from .metrics import roc_curve

    plt = _plt()
    cols = 6
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax, j in zip(axes.flat, range(len(names))):
        if len(np.unique(Y[:, j])) == 2:
            fpr, tpr, _ = roc_curve(Y[:, j], S[:, j])
            ax.plot(fpr, tpr, lw=1.5)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(f"{names[j]}\nAUC {aucs[j]:.3f}", fontsize=8)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.supxlabel("1 - specificity"), fig.supylabel("sensitivity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def auc_bars(names: list[str], aucs: list[float], macro: float, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.2))
    y = np.arange(len(names))
    ax.barh(y, [0 if np.isnan(a) else a for a in aucs], color="#4c72b0")
    ax.axvline(0.5, color="k", ls=":", lw=0.8)
    ax.axvline(macro, color="#c44e52", lw=1.2, label=f"macro {macro:.3f}")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("zero-shot AUC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(runs: list[str], path: Path) -> Path | None:
    """One line per training run (its metrics.jsonl; a resumed step counts once, its last value)."""
    series = []
    for run in runs:
        f = Path(run) / "metrics.jsonl"
        if f.exists():
            by_step = {}
            for line in f.read_text().splitlines():
                r = json.loads(line)
                by_step[r["step"]] = r["loss"]
            stage = json.loads((Path(run) / "summary.json").read_text())["stage"] if (Path(run) / "summary.json").exists() \
                else Path(run).name
            series.append((stage, sorted(by_step.items())))
    if not series:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
    for ax, (stage, pts) in zip(axes.flat, series):
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".", lw=1)
        ax.set_title(f"{stage} stage"), ax.set_xlabel("step"), ax.set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

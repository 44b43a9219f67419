"""PNG reports: per-class IoU bars per checkpoint, row-normalised confusion matrix."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def iou_bars(results: dict[str, dict], path) -> None:
    """results: label -> metrics.summarize() output."""
    first = next(iter(results.values()))
    names = [pc["name"] for pc in first["per_class"]]
    hard = [j for j, pc in enumerate(first["per_class"]) if pc["hard"]]
    x = np.arange(len(names))
    width = 0.8 / max(len(results), 1)
    fig, ax = plt.subplots(figsize=(max(10, len(names) * 0.6), 4.5))
    for j, (label, summary) in enumerate(results.items()):
        iou = [pc["iou"] for pc in summary["per_class"]]
        ax.bar(x + j * width - 0.4 + width / 2, iou, width, label=f"{label} (mIoU {summary['miou']:.3f})")
    for j in hard:
        ax.axvspan(j - 0.45, j + 0.45, color="0.9", zorder=0)
    ax.set_xticks(x, names, rotation=60, ha="right")
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1)
    ax.set_title("Per-class IoU (shaded: hard classes)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_plot(conf: np.ndarray, class_names, path, title: str) -> None:
    """Rows = ground truth (id 0 dropped), normalised to sum 1."""
    c = np.asarray(conf, dtype=np.float64)[1:, :]
    rows = c.sum(1, keepdims=True)
    norm = np.divide(c, rows, out=np.zeros_like(c), where=rows > 0)
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(np.arange(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set_yticks(np.arange(len(class_names) - 1), class_names[1:], fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=110)
    plt.close(fig)

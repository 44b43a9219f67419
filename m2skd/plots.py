"""PNG reports: per-class IoU bars per checkpoint, row-normalised confusion matrix."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .storage import save_figure  # noqa: E402


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
    save_figure(fig, path, dpi=110)
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
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def instance_plot(results: dict[str, dict], path) -> None:
    """Hit rate per instance bucket (points in the single scan; centroid range), one bar per
    checkpoint; the point recall as a dot on each bar; bucket sizes under the axis."""
    labelled = {k: v for k, v in results.items() if v.get("instances")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, title in ((axes[0], "by_points", "by points in the single scan"),
                           (axes[1], "by_range", "by centroid range from the sensor (m)")):
        if not labelled:
            ax.set_axis_off()
            continue
        first = next(iter(labelled.values()))["instances"][key]
        x = np.arange(len(first))
        width = 0.8 / len(labelled)
        for j, (label, summary) in enumerate(labelled.items()):
            rows = summary["instances"][key]
            pos = x + j * width - 0.4 + width / 2
            hit = [r["hit_rate"] if r["hit_rate"] is not None else np.nan for r in rows]
            rec = [r["point_recall"] if r["point_recall"] is not None else np.nan for r in rows]
            ax.bar(pos, hit, width, label=label)
            ax.plot(pos, rec, "k.", markersize=5)
        ax.set_xticks(x, [f"{r['bucket']}\n(n={r['count']})" for r in first])
        ax.set_ylim(0, 1)
        ax.set_ylabel("hit rate (bars), point recall (dots)")
        ax.set_title(f"Hard-class instances {title}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def effect_plot(by_form: dict[str, dict], path, title: str = "") -> None:
    """Paired effects (distilled - baseline): mean as a dot, its 95% interval as a bar, seeds as ticks.
    Left: hard-class mIoU, mIoU and every class (hard classes shaded, names in red); right: the
    instance buckets' hit rate. One colour per key of `by_form` (its legend label)."""
    first = next(iter(by_form.values()))
    rows = [("hard_miou", "hard-class mIoU", True), ("miou", "mIoU", False)]
    rows += [(name, name, e["hard"]) for name, e in first["per_class"].items()]
    inst_rows = [(g, b) for g, buckets in first["instances"].items() for b in buckets]
    fig, axes = plt.subplots(1, 2, figsize=(13, max(6, 0.3 * len(rows) + 1.5)),
                             gridspec_kw={"width_ratios": [3, 2]})
    offsets = np.linspace(-0.2, 0.2, len(by_form)) if len(by_form) > 1 else [0.0]
    colours = plt.get_cmap("tab10")

    def draw(ax, effects, y, colour, label):
        for yi, e in zip(y, effects):
            if e["mean"] is None:
                continue
            if e["ci_low"] is not None:
                ax.plot([e["ci_low"], e["ci_high"]], [yi, yi], color=colour, linewidth=2.5, alpha=0.6)
            ax.plot([e["mean"]], [yi], "o", color=colour, markersize=5, label=label)
            label = None
            seeds = [v for v in e["per_seed"] if v is not None]
            ax.plot(seeds, [yi] * len(seeds), "|", color="k", markersize=6, alpha=0.6)

    for k, (form, eff) in enumerate(by_form.items()):
        colour = colours(k)
        left = [eff[key] if key in ("hard_miou", "miou") else eff["per_class"][key] for key, _, _ in rows]
        draw(axes[0], left, np.arange(len(rows)) + offsets[k], colour, str(form))
        right = [eff["instances"][g][b]["hit_rate"] for g, b in inst_rows]
        draw(axes[1], right, np.arange(len(inst_rows)) + offsets[k], colour, str(form))
    for j, (_, _, hard) in enumerate(rows):
        if hard:
            axes[0].axhspan(j - 0.45, j + 0.45, color="0.92", zorder=0)
    axes[0].set_yticks(np.arange(len(rows)), [name for _, name, _ in rows], fontsize=8)
    for tick, (_, _, hard) in zip(axes[0].get_yticklabels(), rows):
        tick.set_color("tab:red" if hard else "black")
    axes[0].set_xlabel("IoU effect (distilled - baseline)")
    axes[0].set_title("per class (red, shaded: hard classes)", fontsize=10)
    axes[1].set_yticks(np.arange(len(inst_rows)),
                       [f"{b} {'pts' if g == 'by_points' else 'm'}" for g, b in inst_rows], fontsize=8)
    axes[1].set_xlabel("hit-rate effect (distilled - baseline)")
    axes[1].set_title("hard-class instances, by points / by range", fontsize=10)
    for ax in axes:
        ax.axvline(0, color="k", linewidth=0.8)
        ax.invert_yaxis()
        ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)

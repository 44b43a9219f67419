"""Pictures of what the method does, from arrays (the pipeline's `show` feeds them run outputs).

Every figure has a fixed pixel size (`figure_px`): panels of PANEL_IN inches at DPI, plus a
footer for the legend, saved without tight cropping, so a picture's size says how many panels
it has and pictures of different runs line up. Colours are SemanticKITTI's official ones
(data_manifests color_map, stored BGR as in semantic-kitti.yaml).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from . import storage  # noqa: E402

PANEL_IN = 4.8
FOOTER_IN = 1.0
DPI = 100
IGNORED_RGB = (0.8, 0.8, 0.8)


def figure_px(cols: int, rows: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of a figure of `cols` x `rows` panels."""
    return round(cols * PANEL_IN * DPI), round((rows * PANEL_IN + FOOTER_IN) * DPI)


def class_colours(spec) -> np.ndarray:
    """(C, 3) RGB in [0, 1] per training id, from the official raw-id colours; id 0 light grey."""
    out = np.tile(np.array(IGNORED_RGB), (spec.num_classes, 1))
    for train, raw in spec.learning_map_inv.items():
        if train and raw in spec.color_map:
            b, g, r = spec.color_map[raw]
            out[train] = (r / 255.0, g / 255.0, b / 255.0)
    return out


def _figure(cols: int, rows: int = 1):
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL_IN, rows * PANEL_IN + FOOTER_IN), dpi=DPI, squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.98, top=1 - 0.6 / (rows * PANEL_IN + FOOTER_IN),
                        bottom=FOOTER_IN / (rows * PANEL_IN + FOOTER_IN), wspace=0.08, hspace=0.15)
    return fig, axes


def _save(fig, path) -> str:
    path = storage.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.save_figure(fig, path, dpi=DPI)  # never bbox_inches="tight": the size must not depend on content
    plt.close(fig)
    return str(path)


def default_extent(xyz: np.ndarray, lo: float = 10.0, hi: float = 50.0) -> float:
    """Half-width (m) of a bird's-eye view that holds most points: the 98th percentile of |x|, |y|."""
    if len(xyz) == 0:
        return lo
    return float(np.clip(np.percentile(np.abs(xyz[:, :2]), 98), lo, hi))


def bev_figure(xyz: np.ndarray, gt: np.ndarray, panels: dict[str, np.ndarray], colours: np.ndarray,
               hard_mask: np.ndarray, class_names, path, title: str = "", extent: float | None = None) -> str:
    """Bird's-eye view: ground truth, then one panel per prediction (label -> (N,) training ids).

    Hard-class points (by ground truth or prediction) are drawn larger; a prediction that
    differs from a labelled ground truth is marked with a black x (red is a class colour).
    """
    xyz = np.asarray(xyz)
    gt = np.asarray(gt, dtype=np.int64)
    extent = extent or default_extent(xyz)
    names = ["ground truth"] + list(panels)
    fig, axes = _figure(len(names))
    labelled = gt > 0
    shown = set(np.unique(gt[labelled]).tolist())
    for ax, name in zip(axes[0], names):
        cls = gt if name == "ground truth" else np.asarray(panels[name], dtype=np.int64)
        shown |= set(np.unique(cls).tolist()) - {0}
        hard = hard_mask[cls] | hard_mask[gt]
        order = np.argsort(hard, kind="stable")  # hard-class points on top
        size = np.where(hard[order], 5.0, 0.4)
        ax.scatter(xyz[order, 0], xyz[order, 1], s=size, c=colours[cls[order]], linewidths=0, rasterized=True)
        if name == "ground truth":
            ax.set_title(f"ground truth ({labelled.sum()} labelled points)", fontsize=9)
        else:
            wrong = labelled & (cls != gt)
            ax.scatter(xyz[wrong, 0], xyz[wrong, 1], s=np.where(hard[wrong], 12.0, 1.5), c="black", marker="x",
                       linewidths=np.where(hard[wrong], 0.7, 0.25), rasterized=True)
            hard_gt = labelled & hard_mask[gt]
            hard_ok = (cls[hard_gt] == gt[hard_gt]).mean() if hard_gt.any() else float("nan")
            ax.set_title(f"{name}: {wrong.sum()} wrong, hard-class points {hard_ok:.0%} right", fontsize=9)
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    handles = [Patch(color=colours[c], label=class_names[c]) for c in sorted(shown)]
    handles.append(Line2D([], [], color="black", marker="x", linestyle="", label="wrong"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 10), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def fusion_figure(single_xyz: np.ndarray, fused_xyz: np.ndarray, fused_source: np.ndarray, k: int, path,
                  title: str = "") -> str:
    """One instance before and after fusion: top (x-y) and side (x-z) views of its single-scan
    points, then of the same points with those fused from t-1..t-k, coloured by source scan."""
    single_xyz, fused_xyz = np.asarray(single_xyz), np.asarray(fused_xyz)
    fused_source = np.asarray(fused_source, dtype=np.int64)
    everything = np.concatenate([single_xyz[:, :3], fused_xyz[:, :3]]) if len(fused_xyz) else single_xyz[:, :3]
    centre = everything.mean(0)
    palette = plt.get_cmap("viridis")
    source_colour = {0: (0.0, 0.0, 0.0)}
    source_colour.update({s: palette((s - 1) / max(k - 1, 1) * 0.85 + 0.1) for s in range(1, k + 1)})
    fig, axes = _figure(2, 2)
    for row, (dims, view) in enumerate((((0, 1), "top view x-y"), ((0, 2), "side view x-z"))):
        half = max(float(np.abs(everything[:, dims] - centre[list(dims)]).max()) * 1.15, 0.5)
        for col in range(2):
            ax = axes[row, col]
            ax.scatter(single_xyz[:, dims[0]], single_xyz[:, dims[1]], s=10, c=[source_colour[0]], linewidths=0, zorder=3)
            if col == 1:
                for s in range(1, k + 1):
                    sel = fused_source == s
                    if sel.any():
                        ax.scatter(fused_xyz[sel, dims[0]], fused_xyz[sel, dims[1]], s=6, c=[source_colour[s]],
                                   linewidths=0, alpha=0.8)
            what = (f"single scan t: {len(single_xyz)} points" if col == 0
                    else f"fused t..t-{k}: {len(single_xyz) + len(fused_xyz)} points")
            ax.set_title(f"{what} ({view})", fontsize=9)
            ax.set_xlim(centre[dims[0]] - half, centre[dims[0]] + half)
            ax.set_ylim(centre[dims[1]] - half, centre[dims[1]] + half)
            ax.set_aspect("equal")
            ax.tick_params(labelsize=7)
    handles = [Line2D([], [], color=source_colour[s], marker="o", linestyle="", label="t" if s == 0 else f"t-{s}")
               for s in range(k + 1)]
    fig.legend(handles=handles, loc="lower center", ncol=k + 1, fontsize=8, frameon=False, title="source scan",
               title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)

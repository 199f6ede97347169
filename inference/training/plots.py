"""Evaluation plots (matplotlib, Agg backend): ROC curves, KL confusion matrix, heatmaps, label efficiency."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inference.training import data as D


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_plot(records, results, path: Path, model) -> None:
    from sklearn.metrics import roc_curve

    pairs = [(r.fractured, res.fracture.probability) for r, res in zip(records, results)
             if r.fractured >= 0 and res.fracture is not None]
    if not pairs or len({y for y, _ in pairs}) < 2:
        return
    plt = _plt()
    y, p = map(np.array, zip(*pairs))
    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label="fracture")
    ops = model.card.heads["fracture"].operating_points
    for name, thr, mk in (("suspected", ops.suspected, "o"), ("definite", ops.definite, "s")):
        ax.plot(np.mean(p[y == 0] >= thr), np.mean(p[y == 1] >= thr), mk, label=f"{name} ({thr:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"Fracture ROC, {len(y)} images")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_plot(confusion, path: Path) -> None:
    plt = _plt()
    c = np.array(confusion)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(c, cmap="Blues")
    for i in range(c.shape[0]):
        for j in range(c.shape[1]):
            ax.text(j, i, str(c[i, j]), ha="center", va="center", color="black")
    ax.set_xlabel("predicted KL grade")
    ax.set_ylabel("true KL grade")
    ax.set_title("Kellgren-Lawrence grade")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def heatmap_grid(records, results, path: Path, n: int = 6) -> None:

    chosen = [(r, res) for r, res in zip(records, results) if r.fractured == 1 and r.boxes
              and res.anomaly_map is not None][:n]
    if not chosen:
        return
    plt = _plt()
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(len(chosen), 3, figsize=(9, 3 * len(chosen)), squeeze=False)
    for row, (r, res) in zip(axes, chosen):
        img = D.read_image(r.path)
        for ax, (title, m) in zip(row, (("image", None), ("anomaly map", res.anomaly_map),
                                        ("fracture map", res.fracture_map))):
            ax.imshow(img, cmap="gray")
            if m is not None:
                ax.imshow(m, cmap="inferno", alpha=0.45, vmin=0, vmax=1)
            for x0, y0, x1, y1 in r.boxes:
                ax.add_patch(Rectangle((x0 * res.columns, y0 * res.rows), (x1 - x0) * res.columns,
                                       (y1 - y0) * res.rows, fill=False, edgecolor="cyan", lw=1.5))
            ax.set_title(f"{r.image_id} {title}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def label_efficiency_plot(le: dict, path: Path) -> None:
    plt = _plt()
    pts = le["points"]
    x = [p["labels"] for p in pts]
    y = [p["auroc_mean"] for p in pts]
    e = [p["auroc_sd"] for p in pts]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.errorbar(x, y, yerr=e, marker="o", capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("val AUROC")
    ax.set_title("Label efficiency: implant (hardware)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

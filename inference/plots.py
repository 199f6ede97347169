"""Evaluation plots (matplotlib, Agg backend): ROC curves, KL confusion matrix, heatmaps, label efficiency."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
    from inference.evaluate import _load

    chosen = [(r, res) for r, res in zip(records, results) if r.fractured == 1 and r.boxes
              and res.anomaly_map is not None][:n]
    if not chosen:
        return
    plt = _plt()
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(len(chosen), 3, figsize=(9, 3 * len(chosen)), squeeze=False)
    for row, (r, res) in zip(axes, chosen):
        img = _load(r.path)
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


def overlay_png(image: np.ndarray, heat: np.ndarray | None, path: Path, boxes=(), max_side: int = 1024) -> None:
    """The displayed image with a heatmap blended over it (and boxes), as a PNG, no matplotlib."""
    from PIL import Image, ImageDraw

    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)
    base = np.repeat(img[..., None], 3, axis=2).astype(np.float32)
    if heat is not None:
        h = np.clip(np.asarray(heat, dtype=np.float32), 0, 1)
        colour = np.stack([np.clip(3 * h, 0, 1), np.clip(3 * h - 1, 0, 1), np.clip(3 * h - 2, 0, 1)], -1) * 255
        alpha = (0.55 * np.clip(h * 1.5, 0, 1))[..., None]
        base = base * (1 - alpha) + colour * alpha
    pil = Image.fromarray(np.rint(base).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    for (x0, y0, x1, y1), colour in boxes:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=max(1, img.shape[1] // 300))
    scale = max_side / max(pil.size)
    if scale < 1:
        pil = pil.resize((int(pil.size[0] * scale), int(pil.size[1] * scale)), Image.BILINEAR)
    pil.save(path)

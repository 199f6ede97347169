"""What the heads learn: targets of a head from the data's records, patch targets of the fracture
map from the fracture boxes, and the loss of each head kind.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from inference.preprocess import Geometry
from inference.training import data as D

log = logging.getLogger(__name__)

def head_targets(name: str, records: list[D.Record]):
    """(predicate selecting usable records, target function record -> label)."""
    if name == "fracture":
        return (lambda r: r.fractured >= 0), (lambda r: r.fractured)
    if name == "hardware":
        return (lambda r: r.hardware >= 0), (lambda r: r.hardware)
    if name == "kl_grade":
        return (lambda r: r.kl >= 0), (lambda r: r.kl)
    if name == "anatomy":
        return (lambda r: r.anatomy >= 0), (lambda r: r.anatomy)
    if name == "view":
        return (lambda r: min(r.views) >= 0 and sum(r.views) > 0), (lambda r: r.views)
    return (lambda r: r.label >= 0), (lambda r: r.label)


def patch_targets(records: list[D.Record], geos: list[Geometry], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch fracture targets from boxes: (targets (N, P) 0..1, usable mask (N,)).

    Images without a fracture: every patch 0. Fractured images with boxes: the share of
    each patch covered by a box, scaled so that a quarter-covered patch counts as positive.
    Fractured images without boxes are left out of the patch loss.
    """
    n = len(records)
    tgt = np.zeros((n, grid * grid), np.float32)
    usable = np.zeros(n, bool)
    for i, (r, g) in enumerate(zip(records, geos)):
        if r.fractured == 0:
            usable[i] = True
        elif r.fractured == 1 and r.boxes:
            mask = np.zeros((g.size, g.size), np.float32)
            for (x0, y0, x1, y1) in r.boxes:
                cx0, cy0, cx1, cy1 = g.box_to_canvas((x0 * g.columns, y0 * g.rows, x1 * g.columns, y1 * g.rows))
                mask[int(np.floor(cy0)):int(np.ceil(cy1)), int(np.floor(cx0)):int(np.ceil(cx1))] = 1.0
            p = g.size // grid
            cov = mask.reshape(grid, p, grid, p).mean(axis=(1, 3)).ravel()
            tgt[i] = np.clip(cov * 4.0, 0.0, 1.0)
            usable[i] = True
    return tgt, usable


def head_loss(kind: str, out: dict, y: torch.Tensor, pos_weight: float | None = None,
          ordinal_weight: float = 0.25) -> torch.Tensor:
    """binary: BCE; soft targets: cross-entropy; categorical: CE with label smoothing; ordinal: that CE
    plus ``ordinal_weight`` x smooth-L1 between the expected grade and the true grade."""
    logits = out["logits"].float()
    y = y.to(logits.device)
    if kind == "binary":
        pw = torch.tensor(pos_weight, device=logits.device) if pos_weight else None
        return F.binary_cross_entropy_with_logits(logits[:, 0], y.float(), pos_weight=pw)
    if y.ndim == 2:  # soft targets (views)
        t = y.float() / y.float().sum(1, keepdim=True)
        return -(t * F.log_softmax(logits, 1)).sum(1).mean()
    ce = F.cross_entropy(logits, y.long(), label_smoothing=0.05)
    if kind == "ordinal":
        grades = torch.arange(logits.shape[1], dtype=torch.float32, device=logits.device)
        expected = (torch.softmax(logits, 1) * grades).sum(1)
        ce = ce + ordinal_weight * F.smooth_l1_loss(expected, y.float())
    return ce

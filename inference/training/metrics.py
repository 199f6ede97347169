"""Scores of head predictions: AUC, Cohen's kappa or accuracy (:func:`score`), the log loss, and a
binary head's two operating points.
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)

def score(kind: str, y: np.ndarray, p: np.ndarray, decision: str = "argmax") -> float:
    """Selection score on the development split (higher is better); ordinal: accuracy + quadratic kappa
    of the grades that ``decision`` (:func:`inference.results.decide`) reads from ``p``."""
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    from inference.results import decide

    if kind == "binary":
        return float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else 0.0
    if y.ndim == 2:
        return float(np.mean(y[np.arange(len(y)), p.argmax(1)] > 0))
    pred = decide(p, decision)
    if kind == "ordinal":
        return float(np.mean(pred == y) + cohen_kappa_score(y, pred, weights="quadratic"))
    return float(np.mean(pred == y))


def log_loss(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against 0/1 labels ``y``."""
    return float(np.mean(np.logaddexp(0.0, logits) - y * logits))


def operating_points(y: np.ndarray, p: np.ndarray, sensitivity: float = 0.90, specificity: float = 0.95) -> dict:
    """'suspected': the highest threshold keeping sensitivity >= ``sensitivity``;
    'definite': the lowest threshold reaching specificity >= ``specificity`` (on validation data)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("operating points need positive and negative validation images")
    k = int(math.floor((1 - sensitivity) * len(pos)))  # may miss k positives
    suspected = float(pos[k])
    j = int(math.ceil(specificity * len(neg))) - 1
    definite = float(np.nextafter(neg[min(j, len(neg) - 1)], 1.0))
    definite = min(max(definite, suspected), 1.0)
    return {"suspected": suspected, "definite": definite,
            "target_sensitivity": sensitivity, "target_specificity": specificity}


def threshold_split(y_dev: np.ndarray | None, y_val: np.ndarray | None, head: str = "") -> str | None:
    """Where a binary head's operating points are chosen: "development", the split its epoch was chosen on,
    whenever it holds both classes (val then only measures them); "val" where it does not (a label budget
    leaves none), logged, and recorded by the caller as the points' ``split``; None where neither has both."""
    if y_dev is not None and len(set(np.asarray(y_dev).tolist())) == 2:
        return "development"
    if y_val is not None and len(set(np.asarray(y_val).tolist())) == 2:
        log.warning("head %s: no development split with both classes; operating points chosen on val", head)
        return "val"
    return None

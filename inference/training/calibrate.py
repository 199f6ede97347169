"""Calibration of binary heads: Platt scaling fitted on a development split and folded into the head's
last layer (``dicom-node model calibrate``), and the log loss it is judged by.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from inference.training.metrics import log_loss, operating_points, threshold_split
from inference.training.splits import dev_split
from inference.training.targets import head_targets
from inference.training.tokens import Embedded, predict_logits, predict_tokens

log = logging.getLogger(__name__)

def platt(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt scaling: ``(scale, shift)`` minimising the log loss of ``sigmoid(scale * logit + shift)`` on
    held-out labels, against Platt's smoothed targets ((n+ + 1)/(n+ + 2) and 1/(n- + 2)) so that a
    few dozen held-out positives cannot make it overconfident. ``scale`` > 0 keeps the ranking:
    AUROC, and the sensitivity and specificity at operating points chosen afterwards, do not change."""
    from scipy.optimize import minimize
    from scipy.special import expit

    z, y = np.asarray(logits, np.float64), np.asarray(y, np.float64)
    n_pos = float(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("calibration needs held-out images of both classes")
    t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def loss(w):
        s = w[0] * z + w[1]
        g = expit(s) - t
        return float(np.sum(np.logaddexp(0.0, s) - t * s)), np.array([np.sum(g * z), np.sum(g)])

    res = minimize(loss, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=[(1e-3, None), (None, None)])
    return float(res.x[0]), float(res.x[1])


def calibrate(head, tokens: torch.Tensor, y: np.ndarray) -> dict:
    """Platt-scale a binary head on held-out ``tokens``/``y``, in place (folded into its weights, as
    stored: float16); returns the record for the card."""
    from inference.bundle import half
    from inference.heads import rescale_logits

    y = np.asarray(y, np.float64)
    z = predict_logits(head, tokens)
    scale, shift = platt(z, y)
    rescale_logits(head, scale, shift)
    head.load_state_dict(half(head.state_dict()))
    after = predict_logits(head, tokens)
    return {"method": "platt", "scale": round(scale, 5), "shift": round(shift, 5), "images": int(len(y)),
            "positives": int(y.sum()), "log_loss_before": round(log_loss(z, y), 4),
            "log_loss_after": round(log_loss(after, y), 4)}


def calibrate_head(emb: Embedded, bundle: str | Path, name: str, command: str = "") -> dict:
    """Platt-scale the binary head ``name`` of ``bundle`` on the development split it was selected on,
    then choose its operating points again on that split (same sensitivity and specificity, thresholds on
    the calibrated probabilities; on val only where it lacks a class, recorded so). For heads fitted
    before ``fit-heads`` calibrated them itself. Calibrating twice composes: the record gives the total
    scale and shift."""
    from safetensors.torch import load_file

    from inference.bundle import _now, half, read_metadata, save_tensors, write_metadata
    from inference.heads import build_head, input_layer

    bundle = Path(bundle)
    meta = read_metadata(bundle)
    entry = meta["msk_node"]["heads"].get(name)
    if not entry or not entry.get("weights"):
        raise ValueError(f"{bundle}: no head {name!r} with weights")
    if entry["kind"] != "binary":
        raise ValueError(f"head {name!r} is {entry['kind']}: Platt scaling is for binary heads")
    arch = entry.get("arch", {})
    if int(arch.get("members", 1)) > 1:
        raise ValueError(f"head {name!r} is an ensemble: its members average probabilities, calibrate them on refit")
    head = build_head(arch, emb.cfg.dim, 1, emb.mae.encoder)
    head.load_state_dict(load_file(str(bundle / entry["weights"])))
    head = head.to(emb.device).eval()
    usable, target = head_targets(name, emb.records)
    by = entry.get("training", {}).get("dev_split") or "image"  # heads recorded without one used the image split
    _, dev = dev_split(emb.index("train", usable), emb.records, by=by)
    va = emb.index("val", usable)
    tokens = emb.inputs(input_layer(arch, emb.cfg.depth))
    y_dev = np.array([target(emb.records[i]) for i in dev])
    y_va = np.array([target(emb.records[i]) for i in va])
    split = threshold_split(y_dev, y_va, name)
    if split is None:
        raise ValueError(f"head {name!r}: neither the development split nor val has both classes to choose "
                         f"thresholds on")
    cal = calibrate(head, tokens[dev], y_dev)
    on, y_on = (dev, y_dev) if split == "development" else (va, y_va)
    p_on, _ = predict_tokens(head, "binary", tokens[on])
    ops = {**operating_points(y_on, p_on), "split": split}
    previous = entry.get("calibration")
    if previous:  # a second Platt step on calibrated logits: a2 (a1 z + c1) + c2
        cal["scale_total"] = round(cal["scale"] * previous.get("scale_total", previous["scale"]), 5)
        cal["shift_total"] = round(cal["scale"] * previous.get("shift_total", previous["shift"]) + cal["shift"], 5)
    cal["dev_split"], cal["command"], cal["calibrated"] = by, command, _now()
    save_tensors(bundle, entry["weights"], half(head.state_dict()), meta)
    entry["operating_points"], entry["calibration"] = ops, cal
    write_metadata(bundle, meta)
    return entry

"""Development splits: the part of the training split that selects heads, held out by patient or by
image (:data:`DEV_SPLITS`), and the split the encoder's adaptation held out (:func:`clean_dev_split`).
"""

from __future__ import annotations

import logging

import numpy as np

from inference.training import data as D

log = logging.getLogger(__name__)

DEV_SPLITS = ("patient", "image", "image-exclusive")


def dev_split(idx: np.ndarray, records: list[D.Record], fraction: float = 0.1, by: str = "patient"
              ) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a deterministic 10 % of the training indices (by hash) to pick the epoch.

    ``by`` "patient": hash the patient where the data names one (the knee set's two knees of a patient
    then fall on the same side; otherwise a head is selected on the other knee of patients it trained
    on); "image": hash the image id (what heads fitted before model 0.4.0 were selected with);
    "image-exclusive": the development images of "image" (so, the images an encoder adapted with
    "image" never trained on), with every other image of their patients left out of training."""
    if by not in DEV_SPLITS:
        raise ValueError(f"dev split by {by!r}: expected one of {', '.join(DEV_SPLITS)}")
    dev = np.array([D.hash_fraction("dev:" + (records[i].split_key if by == "patient" else records[i].image_id))
                    < fraction for i in idx], dtype=bool)
    train = ~dev
    if by == "image-exclusive":
        held = {records[i].split_key for i in idx[dev]}
        train &= np.array([records[i].split_key not in held for i in idx], dtype=bool)
    return idx[train], idx[dev]


def clean_dev_split(training: dict) -> str:
    """The development split a head must be selected on so that neither the encoder nor the head has
    trained on it: the encoder's adaptation stages (``training`` of a bundle's card) each held out a
    split; a head's split must be theirs, and patient-disjoint from its own training images.

    No adaptation: "patient". Stages held out by image (or recorded before the split was recorded):
    "image-exclusive". By patient: "patient". Mixed: no split is clean for every stage; "patient"
    (the last resort, logged)."""
    from inference.card import adapt_stages

    modes = {st.get("dev_split", "image") for st in adapt_stages((training or {}).get("pretrain") or {})}
    if not modes or modes == {"patient"}:
        return "patient"
    if modes <= {"image", "image-exclusive"}:
        return "image-exclusive"
    log.warning("the encoder's adaptation stages held out different splits (%s): no development split "
                "is unseen by all of them; selecting heads on a patient-level split", ", ".join(sorted(modes)))
    return "patient"

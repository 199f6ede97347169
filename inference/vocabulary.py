"""The one vocabulary of the product: head names, the modalities the model reads, and (to come) every
coded concept the results use. ``dicom_node`` (SR and capture encoding, config, routing) and the model
card writer read it from here; nothing else spells these lists out.
"""

from __future__ import annotations

#: heads whose findings the node reports and routing rules may name, in report order
HEAD_NAMES = ("fracture", "kl_grade", "anatomy", "view", "tumour")

#: modalities of the images the model reads (computed and digital radiography, digitised films); an
#: empty Modality is read too, since the SOP class already says it is an image
MODEL_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "OT"})


def reads_modality(modality: str | None) -> bool:
    """True when the model reads images of ``modality`` (an empty value included)."""
    m = (modality or "").strip().upper()
    return not m or m in MODEL_MODALITIES

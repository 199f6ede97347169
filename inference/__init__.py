"""The model: bundle loading, preprocessing, encoder, heads, anomaly maps (training and evaluation:
:mod:`inference.training`, which serving never imports).

Importing this package is light (no torch): ``load_bundle`` and ``Model`` import
the torch parts on first use.

    from inference import load_bundle
    model = load_bundle()                       # the shipped default bundle
    results = model.predict_datasets([ds])      # list[ImageResult]
"""

from __future__ import annotations

from pathlib import Path

from inference.results import (
    BinaryFinding,
    CategoricalFinding,
    CodedConcept,
    ImageResult,
    ModelInfo,
    OperatingPoints,
    Region,
)

DEFAULT_BUNDLE = Path(__file__).resolve().parent / "bundles" / "msk-foundation"

__all__ = ["load_bundle", "Model", "DEFAULT_BUNDLE", "BinaryFinding", "CategoricalFinding", "CodedConcept",
           "ImageResult", "ModelInfo", "OperatingPoints", "Region"]


def load_bundle(path: str | Path | None = None, device: str | None = None):
    """Load a model bundle (None: the shipped default); ``device`` None = cuda if available, else cpu."""
    from inference.bundle import load_bundle as _load

    return _load(path, device)


def __getattr__(name: str):
    if name == "Model":
        from inference.bundle import Model

        return Model
    raise AttributeError(name)

"""Plain result objects: what ``inference`` hands to the rest of the node.

No torch, no DICOM in here: numbers, labels, boxes and arrays. ``dicom_node``
encodes these as a TID 1500 SR and secondary captures; the JSON form is what
``dicom-node infer --json`` prints.

Coordinates are in the *source image's* pixel geometry: x is the column,
y the row, (0, 0) the top-left corner of the top-left pixel, boxes are
``(x0, y0, x1, y1)`` with x1/y1 exclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Decision = Literal["absent", "suspected", "definite"]


@dataclass(frozen=True)
class CodedConcept:
    """A code as the bundle's card declares it (scheme designator, value, meaning)."""

    value: str
    scheme_designator: str
    meaning: str
    scheme_version: str | None = None


@dataclass(frozen=True)
class OperatingPoints:
    """Two thresholds on a probability: high-sensitivity 'suspected', high-specificity 'definite'."""

    suspected: float
    definite: float

    def __post_init__(self) -> None:
        if not (0.0 <= self.suspected <= self.definite <= 1.0):
            raise ValueError(f"operating points must satisfy 0 <= suspected <= definite <= 1, got {self}")

    def decide(self, probability: float) -> Decision:
        if probability >= self.definite:
            return "definite"
        if probability >= self.suspected:
            return "suspected"
        return "absent"


@dataclass(frozen=True)
class BinaryFinding:
    """A present/absent finding (fracture, bone tumour, hardware)."""

    name: str
    probability: float
    operating_points: OperatingPoints
    concept: CodedConcept | None = None

    @property
    def decision(self) -> Decision:
        return self.operating_points.decide(self.probability)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "probability": float(self.probability),
            "decision": self.decision,
            "thresholds": {"suspected": self.operating_points.suspected,
                           "definite": self.operating_points.definite},
        }


DECISIONS = ("argmax", "median")


def decide(probabilities: np.ndarray, rule: str = "argmax") -> np.ndarray:
    """Class index per row of ``probabilities`` (N, C): the most probable class, or, for ordered
    classes (KL grades), the median of the predicted distribution (the first class whose cumulative
    probability reaches one half), which minimises the expected distance to the true grade."""
    p = np.asarray(probabilities, dtype=np.float64)
    if rule == "argmax":
        return p.argmax(1)
    if rule == "median":
        c = np.cumsum(p, 1)
        return np.minimum((c < 0.5 * c[:, -1:]).sum(1), p.shape[1] - 1)
    raise ValueError(f"decision must be one of {DECISIONS}, got {rule!r}")


@dataclass(frozen=True)
class CategoricalFinding:
    """A one-of-N finding (anatomy, view, Kellgren-Lawrence grade)."""

    name: str
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]
    concepts: tuple[CodedConcept, ...] | None = None  # one per label, same order
    rule: str = "argmax"  # how the label is read: "argmax", or "median" for ordered labels (see decide)
    floor: float = 0.0  # confidence below which the answer is reported as uncertain (the card's confidence_floor)

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.probabilities):
            raise ValueError("labels and probabilities differ in length")
        if self.rule not in DECISIONS:
            raise ValueError(f"decision rule must be one of {DECISIONS}, got {self.rule!r}")

    @property
    def index(self) -> int:
        return int(decide(np.asarray(self.probabilities, dtype=np.float64)[None], self.rule)[0])

    @property
    def label(self) -> str:
        return self.labels[self.index]

    @property
    def confidence(self) -> float:
        return float(self.probabilities[self.index])

    @property
    def concept(self) -> CodedConcept | None:
        return self.concepts[self.index] if self.concepts else None

    @property
    def uncertain(self) -> bool:
        """The model's answer is below the card's confidence floor: reported as uncertain, not as a label."""
        return self.confidence < self.floor

    @property
    def shown(self) -> str:
        """What a report says: the label, or "uncertain (most likely <label>)" below the floor."""
        return f"uncertain (most likely {self.label})" if self.uncertain else self.label

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "label": self.label,
            "confidence": self.confidence,
            "uncertain": self.uncertain,
            "probabilities": dict(zip(self.labels, map(float, self.probabilities))),
        }


@dataclass(frozen=True)
class Region:
    """A localised region on the source image."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in source pixels
    score: float  # peak value of the map inside the region
    area_px: int  # area in source pixels
    source: Literal["anomaly", "fracture"]

    def to_json(self) -> dict:
        return {"box": [float(v) for v in self.box], "score": float(self.score),
                "area_px": int(self.area_px), "source": self.source}


def _box_inside(box: tuple[float, float, float, float], rows: int, columns: int) -> bool:
    """Whether ``box`` (x0, y0, x1, y1) keeps a part of non-zero area inside a ``columns`` x ``rows`` image."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        return False
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return False
    x0, x1 = max(0.0, min(x0, x1)), min(float(columns), max(x0, x1))
    y0, y1 = max(0.0, min(y0, y1)), min(float(rows), max(y0, y1))
    return x1 > x0 and y1 > y0


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model that produced a result (from the bundle)."""

    name: str
    version: str
    weights_sha256: str
    manufacturer: str
    for_diagnostic_use: bool = False
    description: str = ""


@dataclass(frozen=True)
class ImageResult:
    """Everything the model says about one image.

    ``image_id`` is the caller's identifier (a SOPInstanceUID, a file path).
    ``processed`` is False when the image could not be processed; then
    ``reason`` says why and the findings are None/empty.
    Maps are float32 arrays of shape ``(rows, columns)`` in the source geometry,
    scaled to 0..1 for display (``anomaly_map``: normalised reconstruction error;
    ``fracture_map``: the fracture head's localisation).
    """

    image_id: str
    rows: int
    columns: int
    processed: bool = True
    reason: str | None = None
    fracture: BinaryFinding | None = None
    tumour: BinaryFinding | None = None
    kl_grade: CategoricalFinding | None = None
    anatomy: CategoricalFinding | None = None
    view: CategoricalFinding | None = None
    anomaly_map: np.ndarray | None = field(default=None, repr=False, compare=False)
    fracture_map: np.ndarray | None = field(default=None, repr=False, compare=False)
    regions: tuple[Region, ...] = ()  # anomaly regions
    fracture_regions: tuple[Region, ...] = ()
    anomaly_note: str | None = None  # what the anomaly map is not (the card's anomaly.not_a_localiser)

    @classmethod
    def not_processed(cls, image_id: str, reason: str, rows: int = 0, columns: int = 0) -> ImageResult:
        # one line: decoders' messages span several, and reports and captures show it in one
        return cls(image_id=image_id, rows=rows, columns=columns, processed=False, reason=" ".join(reason.split()))

    def reported_regions(self) -> tuple[Region, ...]:
        """The regions every report of this image shows (SR, captures, presentation states, summary):
        the fracture boxes while the fracture call is suspected or definite, then the anomaly regions;
        a box with no part inside the image is left out."""
        if not self.processed:
            return ()
        positive = self.fracture is not None and self.fracture.decision != "absent"
        regions = (self.fracture_regions if positive else ()) + tuple(self.regions)
        return tuple(r for r in regions if _box_inside(r.box, self.rows, self.columns))

    def not_localised(self) -> list[BinaryFinding]:
        """Positive binary findings (suspected or definite) that no reported region localises."""
        if not self.processed:
            return []
        boxed = {r.source for r in self.reported_regions()}
        return [f for f in (self.fracture, self.tumour)
                if f is not None and f.decision != "absent" and f.name not in boxed]

    def findings(self) -> list[BinaryFinding | CategoricalFinding]:
        return [f for f in (self.fracture, self.tumour, self.kl_grade, self.anatomy, self.view) if f is not None]

    def to_json(self) -> dict:
        return {
            "image_id": self.image_id,
            "rows": self.rows,
            "columns": self.columns,
            "processed": self.processed,
            "reason": self.reason,
            "findings": {f.name: f.to_json() for f in self.findings()},
            "regions": [r.to_json() for r in self.regions],
            "fracture_regions": [r.to_json() for r in self.fracture_regions],
            "not_localised": [f.name for f in self.not_localised()],
            **({"anomaly_map_note": self.anomaly_note} if self.anomaly_note and self.anomaly_map is not None else {}),
        }

"""The bundle's card: ``configs/metadata.json`` (MONAI bundle metadata fields plus our ``msk_node`` section).

Parsing and validation only (no torch). :class:`Card` is what ``Model.card`` returns.
Every error is a :class:`inference.errors.BundleError` naming the bundle and the key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from inference.errors import BundleError
from inference.results import DECISIONS, CodedConcept, OperatingPoints

METADATA = Path("configs") / "metadata.json"
HEAD_KINDS = ("binary", "categorical", "ordinal")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def concept_from(d, where: str) -> CodedConcept:
    try:
        return CodedConcept(value=str(d["value"]), scheme_designator=str(d["scheme_designator"]),
                            meaning=str(d["meaning"]), scheme_version=d.get("scheme_version"))
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{where}: a coded concept needs value, scheme_designator and meaning ({exc})") from exc


@dataclass(frozen=True)
class HeadSpec:
    name: str
    kind: str  # binary | categorical | ordinal
    labels: tuple[str, ...]
    concept: CodedConcept | None  # the finding itself (binary) or the question (categorical)
    label_concepts: tuple[CodedConcept, ...] | None
    operating_points: OperatingPoints | None
    weights: str | None  # file under the bundle, None: slot without weights
    arch: dict
    applies_to: tuple[str, ...]  # anatomy labels the head is reported for (empty: all)
    metrics: dict
    notes: str

    @property
    def has_weights(self) -> bool:
        return self.weights is not None

    @property
    def decision(self) -> str:
        """How a categorical label is read from the probabilities (see inference.results.decide)."""
        return str(self.arch.get("decision", "argmax"))


class Card:
    """The parsed, validated metadata of a bundle."""

    def __init__(self, meta: dict, root: Path):
        self.meta = meta
        self.root = Path(root)
        where = f"{self.root / METADATA}"
        try:
            node = meta["msk_node"]
            self.name = str(meta.get("name") or node["name"])
            self.version = str(meta["version"])
            self.architecture = dict(node["architecture"])
            self.preprocessing = dict(node["preprocessing"])
            self.weights = dict(node["weights"])  # file -> sha256
            self.anomaly = dict(node["anomaly"])
            self.domain = dict(node.get("domain") or {})  # the out-of-domain decline (inference.domain)
            self.manufacturer = str(node.get("manufacturer", "msk-dicom-node project"))
            heads = node["heads"]
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: malformed card, missing or invalid {exc}") from exc
        for f, digest in self.weights.items():
            if not isinstance(digest, str) or len(digest) != 64:
                raise BundleError(f"{where}: weights[{f!r}] is not a sha256 hex digest")
        if "encoder" not in self.architecture or "file" not in self.architecture:
            raise BundleError(f"{where}: architecture needs 'encoder' and 'file'")
        if self.architecture["file"] not in self.weights:
            raise BundleError(f"{where}: the encoder file {self.architecture['file']!r} has no sha256 in weights")
        self.heads: dict[str, HeadSpec] = {}
        for name, h in heads.items():
            self.heads[name] = self._head(name, h, where)
        if self.anomaly.get("file") and self.anomaly["file"] not in self.weights:
            raise BundleError(f"{where}: anomaly file {self.anomaly['file']!r} has no sha256 in weights")
        if self.domain.get("file") and self.domain["file"] not in self.weights:
            raise BundleError(f"{where}: domain file {self.domain['file']!r} has no sha256 in weights")
        if self.domain.get("file"):
            try:
                float(self.domain["threshold"]), float(self.domain.get("top_fraction", 0.25))
            except (KeyError, TypeError, ValueError) as exc:
                raise BundleError(f"{where}: domain needs a numeric threshold ({exc})") from exc

    def _head(self, name: str, h: dict, where: str) -> HeadSpec:
        w = f"{where}: heads.{name}"
        try:
            kind = h["kind"]
            if kind not in HEAD_KINDS:
                raise BundleError(f"{w}.kind must be one of {HEAD_KINDS}, got {kind!r}")
            labels = tuple(str(x) for x in h["labels"])
            concept = concept_from(h["concept"], f"{w}.concept") if h.get("concept") else None
            lc = h.get("label_concepts")
            label_concepts = tuple(concept_from(c, f"{w}.label_concepts") for c in lc) if lc else None
            if label_concepts is not None and len(label_concepts) != len(labels):
                raise BundleError(f"{w}: label_concepts and labels differ in length")
            op = h.get("operating_points")
            ops = None
            if op is not None:
                try:
                    ops = OperatingPoints(float(op["suspected"]), float(op["definite"]))
                except (ValueError, KeyError, TypeError) as exc:
                    raise BundleError(f"{w}.operating_points: {exc}") from exc
            weights = h.get("weights")
            if weights is not None and weights not in self.weights:
                raise BundleError(f"{w}: weights file {weights!r} has no sha256 in weights")
            if kind == "binary" and weights is not None and ops is None:
                raise BundleError(f"{w}: a binary head with weights needs operating_points")
            if kind == "binary" and len(labels) != 2:
                raise BundleError(f"{w}: a binary head has two labels (absent, present)")
            spec = HeadSpec(name=name, kind=kind, labels=labels, concept=concept, label_concepts=label_concepts,
                            operating_points=ops, weights=weights, arch=dict(h.get("arch", {})),
                            applies_to=tuple(h.get("applies_to", ())), metrics=dict(h.get("metrics", {})),
                            notes=str(h.get("notes", "")))
            if spec.decision not in DECISIONS or (spec.decision == "median" and kind != "ordinal"):
                raise BundleError(f"{w}.arch.decision: {spec.decision!r} (argmax, or median for an ordinal head)")
            return spec
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{w}: malformed head, missing or invalid {exc}") from exc

    @property
    def validation_metrics(self) -> dict:
        return dict(self.meta.get("msk_node", {}).get("validation_metrics", {}))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self.meta))


def weights_digest(weights: dict[str, str]) -> str:
    """One SHA-256 for all the weights of a bundle: over the sorted ``file sha256`` lines.

    It identifies the model in results (UIDs, Device UID): re-training any head changes it.
    """
    lines = "".join(f"{f} {h}\n" for f, h in sorted(weights.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def adapt_stages(pretrain: dict) -> list[dict]:
    """The encoder's multi-task adaptation stages in a card's ``training.pretrain`` record, oldest first
    (cards written before stages were listed keep the one stage under ``adapt``)."""
    return list(pretrain.get("adapt_stages") or ([pretrain["adapt"]] if pretrain.get("adapt") else []))


def read_card(root: Path) -> Card:
    root = Path(root)
    path = root / METADATA
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    if not path.is_file():
        raise BundleError(f"{path}: bundle card (configs/metadata.json) not found")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: malformed card, not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: malformed card, top level is not an object")
    return Card(meta, root)


def verify_weights(card: Card, files: list[str] | None = None) -> None:
    """Check every (or the named) weights file exists and matches its recorded sha256."""
    for f in files if files is not None else list(card.weights):
        path = card.root / f
        if not path.is_file():
            raise BundleError(f"{card.root}: weights file {f} is missing")
        digest = sha256_file(path)
        if digest != card.weights[f]:
            raise BundleError(f"{card.root}: weights file {f} does not match its sha256 "
                              f"(card {card.weights[f][:16]}..., file {digest[:16]}...)")

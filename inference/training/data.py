"""Reading the training data layout (``msk-xray``: ``fracatlas/`` and/or ``knee-kl/``) and caching it.

FracAtlas has no split folders; its validation split is defined here,
deterministically: within each stratum (region x fractured) images are sorted
by ``sha256(image_id)`` and the first 20 % (rounded) go to ``val``. The knee set
brings its own ``train``/``val`` folders (split by patient). No torch in here.

Records carry every label the heads use; a label that a source does not have is
-1 (a knee crop says nothing about fractures). The cache is a uint8 array of
model canvases (see :mod:`inference.preprocess`) plus the records as JSON, so
that epochs do not decode JPEGs again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from inference.pixels import load_image_file
from inference.preprocess import Geometry, canvas_uint8
from inference.vocabulary import ANATOMY_LABELS, KL_GRADES, VIEW_LABELS

FRACATLAS_REGION_TO_ANATOMY = {"hand": "hand", "leg": "leg", "hip": "hip", "shoulder": "shoulder", "mixed": "other"}
VAL_FRACTION = 0.2
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".dicom")


@dataclass
class Record:
    image_id: str
    path: str
    source: str  # fracatlas | knee | csv
    split: str  # train | val
    fractured: int = -1
    hardware: int = -1
    anatomy: int = -1
    views: tuple[int, int, int] = (-1, -1, -1)
    kl: int = -1
    boxes: list = field(default_factory=list)  # fracture boxes, fractions of width/height (x0, y0, x1, y1)
    label: int = -1  # generic label column (fit-heads --labels CSV)
    group: str = ""  # the patient, where known: images of one patient stay on one side of a split

    @property
    def split_key(self) -> str:
        return self.group or self.image_id


def hash_fraction(image_id: str) -> float:
    return int(hashlib.sha256(image_id.encode()).hexdigest()[:12], 16) / float(16 ** 12)


def stratified_val(ids_by_stratum: dict) -> set[str]:
    val = set()
    for _, ids in sorted(ids_by_stratum.items()):
        ranked = sorted(ids, key=lambda i: (hashlib.sha256(i.encode()).hexdigest(), i))
        val.update(ranked[: int(round(len(ranked) * VAL_FRACTION))])
    return val


def read_fracatlas(root: Path) -> list[Record]:
    root = Path(root)
    rows = list(csv.DictReader(open(root / "labels.csv", newline="")))
    boxes = defaultdict(list)
    if (root / "boxes.csv").exists():
        for b in csv.DictReader(open(root / "boxes.csv", newline="")):
            boxes[b["image_id"]].append(tuple(float(b[k]) for k in ("x0", "y0", "x1", "y1")))
    strata = defaultdict(list)
    for r in rows:
        strata[(r["region"], r["fractured"])].append(r["image_id"])
    val = stratified_val(strata)
    out = []
    for r in rows:
        views = tuple(int(r[v]) for v in VIEW_LABELS)
        out.append(Record(
            image_id=r["image_id"], path=str(root / "images" / (r.get("file") or r["image_id"])),
            source="fracatlas",
            split="val" if r["image_id"] in val else "train", fractured=int(r["fractured"]),
            hardware=int(r["hardware"]), anatomy=ANATOMY_LABELS.index(FRACATLAS_REGION_TO_ANATOMY[r["region"]]),
            views=views, boxes=boxes.get(r["image_id"], [])))
    return out


def read_knee(root: Path) -> list[Record]:
    out = []
    for split_dir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        split = "val" if split_dir.name in ("val", "valid", "validation", "test") else "train"
        for grade_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and p.name in KL_GRADES):
            for f in sorted(grade_dir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    # <patient><L|R>: a patient's two knees may be in different grade folders
                    patient = f.stem[:-1] if f.stem[-1:] in ("L", "R") else f.stem
                    out.append(Record(image_id=f"{split_dir.name}/{grade_dir.name}/{f.name}", path=str(f),
                                      source="knee", split=split, anatomy=ANATOMY_LABELS.index("knee"),
                                      views=(1, 0, 0), kl=int(grade_dir.name), group=f"knee:{patient}"))
    return out


def read_layout(data_dir: str | Path) -> list[Record]:
    """Every record under ``data_dir`` (fracatlas/ and/or knee-kl/; either may be absent)."""
    data_dir = Path(data_dir)
    records = []
    if (data_dir / "fracatlas" / "labels.csv").exists():
        records += read_fracatlas(data_dir / "fracatlas")
    if (data_dir / "knee-kl").is_dir():
        records += read_knee(data_dir / "knee-kl")
    if not records:
        raise FileNotFoundError(f"{data_dir}: neither fracatlas/labels.csv nor knee-kl/ found")
    return records


def read_label_csv(csv_path: str | Path, label_column: str = "label", images_dir: str | Path | None = None
                   ) -> tuple[list[Record], list[str]]:
    """A generic labelled CSV: an ``image``/``image_id``/``path`` column and ``label_column``.

    Images resolve against ``images_dir`` (default: the CSV's folder, or its ``images/``
    subfolder when that exists). A ``split`` column (train/val) is honoured; without one
    the split is the stratified hash split. Returns (records, class names in label order).
    """
    csv_path = Path(csv_path)
    rows = list(csv.DictReader(open(csv_path, newline="")))
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    id_col = next((c for c in ("image", "image_id", "path", "file") if c in rows[0]), None)
    if id_col is None or label_column not in rows[0]:
        raise ValueError(f"{csv_path}: needs an image/image_id column and a {label_column!r} column")
    if images_dir is None:
        images_dir = csv_path.parent / "images" if (csv_path.parent / "images").is_dir() else csv_path.parent
    raw = [r[label_column].strip() for r in rows]
    try:
        classes = [str(v) for v in sorted({int(v) for v in raw})]
    except ValueError:
        classes = sorted(set(raw))
    strata = defaultdict(list)
    for r, lab in zip(rows, raw):
        strata[lab].append(r[id_col])
    val = stratified_val(strata)
    out = []
    for r, lab in zip(rows, raw):
        split = r.get("split") or ("val" if r[id_col] in val else "train")
        key = str(int(lab)) if lab.lstrip("-").isdigit() else lab
        out.append(Record(image_id=r[id_col], path=str(Path(images_dir) / r[id_col]), source="csv",
                          split="val" if split in ("val", "valid", "validation") else "train",
                          label=classes.index(key)))
    return out, classes


def read_image(path: str | Path) -> np.ndarray:
    """A record's displayed image (:func:`inference.pixels.load_image_file`), truncated JPEGs read as far as
    they go."""
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = True
    return load_image_file(path)


def _cache_one(args):
    path, size = args
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = True  # ~59 FracAtlas originals are truncated at the source
    img = load_image_file(path)
    canvas, geo = canvas_uint8(img, size)
    return canvas, asdict(geo)


def build_cache(records: list[Record], size: int, cache_path: str | Path | None, workers: int | None = None):
    """(canvases uint8 (N, size, size), geometries) for ``records``; memoised in ``cache_path`` (.npz)."""
    key = hashlib.sha256(json.dumps([size] + [r.path for r in records]).encode()).hexdigest()[:16]
    if cache_path is not None:
        cache_path = Path(cache_path)
        if cache_path.exists():
            z = np.load(cache_path, allow_pickle=False)
            if str(z["key"]) == key:
                geos = [Geometry(**g) for g in json.loads(str(z["geometries"]))]
                return z["canvases"], geos
    jobs = [(r.path, size) for r in records]
    workers = workers or min(16, os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            results = list(ex.map(_cache_one, jobs, chunksize=32))
    else:
        results = [_cache_one(j) for j in jobs]
    canvases = np.stack([c for c, _ in results])
    geos = [g for _, g in results]
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, canvases=canvases, geometries=json.dumps(geos), key=key)
        os.replace(tmp, cache_path)
    return canvases, [Geometry(**g) for g in geos]

"""Shared helpers of the result-encoding tests (no tests in here).

- real source studies: the pydicom-data CR radiographs (MONOCHROME1, JPEG 2000) and
  DX images built from the committed FracAtlas JPEGs (tests/fixtures/fracatlas);
- result objects for them: built from each image's own pixels (the maps are the image's
  smoothed, normalised display values), with decisions across absent/suspected/definite
  and one image reported as not processed, so that every branch of the encoder is used;
- ``dciodvfy`` with an explicit allowlist of warnings, each with its reason.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from inference.pixels import display_uint8
from inference.results import (
    BinaryFinding,
    CategoricalFinding,
    CodedConcept,
    ImageResult,
    ModelInfo,
    OperatingPoints,
    Region,
)
from tests import dicomgen, peers

MODEL = ModelInfo(name="msk-test-encoder", version="0.0.1", weights_sha256="0f" * 32,
                  manufacturer="msk-dicom-node tests", description="result objects built by the tests")

#: dciodvfy warnings the node's objects may carry, each with the reason it is acceptable.
ALLOWED_WARNINGS: list[tuple[str, str]] = [
    (r"Unrecognized defined term <99MSKAI> for value 1 of attribute <Coding Scheme Designator>",
     "99MSKAI is the node's private coding scheme (declared in the Coding Scheme Identification Sequence); "
     "dciodvfy only knows the standard designators"),
    (r"Attribute is not present in standard DICOM IOD - \(0x0018,0x1002\) UI Device UID",
     "Device UID of the algorithm in its Contributing Equipment Sequence item (required by issue 4: tied to "
     "the weights hash); dicom3tools 2022 does not list Device UID among that sequence's attributes"),
    (r"Dicom dataset contains attributes not present in standard DICOM IOD - this is a Standard Extended SOP Class",
     "consequence of the Device UID above: a standard attribute in a place the IOD tables do not list"),
    (r"Value dubious for this VR - \(0x0008,0x0090\) PN Referring Physician's Name .*Retired Person Name form",
     "Referring Physician's Name copied unchanged from the source study (the pydicom-data RG files carry 'ward')"),
    (r"is only permitted to be empty when actually unknown.*attribute <Laterality>",
     "Laterality (Type 2C) of a secondary capture whose source does not say R or L: it is actually unknown, "
     "and dciodvfy reports the attribute as missing (an error) when it is absent"),
]


def validate(path: Path | str) -> list[str]:
    """Run dciodvfy (fails when it is missing); assert exit 0, no Error line, only allowlisted warnings.

    Returns the allowlisted warnings found (for information).
    """
    proc = peers.dciodvfy(path)
    out = (proc.stdout or "") + (proc.stderr or "")
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    unexpected = [w for w in warnings if not any(re.search(rx, w) for rx, _ in ALLOWED_WARNINGS)]
    assert proc.returncode == 0, f"dciodvfy exit {proc.returncode} for {path}:\n{out}"
    assert not errors, f"dciodvfy errors for {path}:\n" + "\n".join(errors)
    assert not unexpected, f"dciodvfy warnings not in the allowlist for {path}:\n" + "\n".join(unexpected)
    return warnings


@contextlib.contextmanager
def strict_pydicom():
    """pydicom raising on invalid values when reading and writing."""
    from pydicom import config

    settings = config.settings
    old = (settings.reading_validation_mode, settings.writing_validation_mode)
    settings.reading_validation_mode = config.RAISE
    settings.writing_validation_mode = config.RAISE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = old


# -- source studies ---------------------------------------------------------------------------------------------
def cr_study(tmp: Path, names=("RG1_UNCI.dcm", "RG1_J2KI.dcm", "RG1_J2KR.dcm")) -> list[pydicom.Dataset]:
    """One CR study of the pydicom-data radiographs (the RG1 files are one image in three transfer
    syntaxes: each copy gets its own SOP Instance UID, as three images of one study would have)."""
    tmp.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = {p.name: p for p in dicomgen.pydicom_radiographs()}
    out = []
    for i, name in enumerate(names, 1):
        dst = dicomgen.copy_with_new_uids(paths[name], tmp / f"cr_{i}.dcm", study_uid=study, series_uid=series)
        ds = pydicom.dcmread(dst)
        out.append(ds)
    return out


def dx_study(tmp: Path, n: int = 3, offset: int = 0, scale: int = 1) -> list[pydicom.Dataset]:
    paths = dicomgen.write_dx_study(tmp / "dx", dicomgen.fracatlas_images(n, offset=offset), scale=scale)
    return [pydicom.dcmread(p) for p in paths]


# -- results -----------------------------------------------------------------------------------------------------
OPS = OperatingPoints(suspected=0.3, definite=0.7)


def image_map(ds: pydicom.Dataset) -> np.ndarray:
    """A 0..1 map from the image itself: its displayed values, block-smoothed, min-max normalised."""
    img = display_uint8(ds).astype(np.float32)
    k = max(1, min(img.shape) // 32)
    h, w = (img.shape[0] // k) * k, (img.shape[1] // k) * k
    small = img[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))
    up = np.kron(small, np.ones((k, k), dtype=np.float32))
    full = np.zeros(img.shape, dtype=np.float32)
    full[:h, :w] = up
    full -= full.min()
    if full.max() > 0:
        full /= full.max()
    return full


def brightest_box(m: np.ndarray, frac: float = 0.25) -> tuple[float, float, float, float]:
    """A box of ``frac`` of the image around the map's maximum (inside the image)."""
    r, c = np.unravel_index(int(np.argmax(m)), m.shape)
    bh, bw = max(8, int(m.shape[0] * frac)), max(8, int(m.shape[1] * frac))
    y0 = int(np.clip(r - bh // 2, 0, m.shape[0] - bh))
    x0 = int(np.clip(c - bw // 2, 0, m.shape[1] - bw))
    return (float(x0), float(y0), float(x0 + bw), float(y0 + bh))


FRACTURE_PROBABILITIES = (0.12, 0.45, 0.91, 0.33, 0.78)


def written_results(tmp: Path, sources: list[pydicom.Dataset], results: list[ImageResult]) -> tuple:
    """(sources, results, result objects, their files under ``tmp/out``): what the results fixtures share."""
    from dicom_node.results_dicom import build_result_objects, write_result_objects

    objs = build_result_objects(sources, results, MODEL)
    return sources, results, objs, write_result_objects(objs, tmp / "out")


def make_results(datasets: list[pydicom.Dataset], *, not_processed: int | None = None,
                 with_kl: bool = False, concepts: bool = False) -> list[ImageResult]:
    """Result objects for ``datasets`` (see the module docstring). Image ``not_processed`` is reported
    as not processed."""
    out = []
    for i, ds in enumerate(datasets):
        if i == not_processed:
            out.append(ImageResult.not_processed(str(ds.SOPInstanceUID), "pixel data cannot be decoded (test)",
                                                 rows=int(ds.Rows), columns=int(ds.Columns)))
            continue
        m = image_map(ds)
        box = brightest_box(m)
        area = int((box[2] - box[0]) * (box[3] - box[1]))
        p = FRACTURE_PROBABILITIES[i % len(FRACTURE_PROBABILITIES)]
        fconcept = CodedConcept("125605004", "SCT", "Fracture of bone") if concepts else None
        anatomy_labels = ("hand", "leg", "hip", "shoulder", "mixed")
        probs = np.roll(np.array([0.6, 0.2, 0.1, 0.06, 0.04]), i)
        out.append(ImageResult(
            image_id=str(ds.SOPInstanceUID), rows=int(ds.Rows), columns=int(ds.Columns),
            fracture=BinaryFinding("fracture", p, OPS, fconcept),
            tumour=BinaryFinding("tumour", 0.05 + 0.01 * i, OperatingPoints(0.2, 0.6)),
            kl_grade=CategoricalFinding("kl_grade", ("0", "1", "2", "3", "4"),
                                        tuple(float(v) for v in np.roll([0.1, 0.15, 0.5, 0.15, 0.1], i)))
            if with_kl else None,
            anatomy=CategoricalFinding("anatomy", anatomy_labels, tuple(float(v) for v in probs)),
            view=CategoricalFinding("view", ("frontal", "lateral", "oblique"), (0.7, 0.2, 0.1)),
            anomaly_map=m, fracture_map=m if i % 2 == 0 else None,
            regions=(Region(box, float(m.max()), area, "anomaly"),),
            fracture_regions=(Region(box, float(m.max()), area, "fracture"),) if OPS.decide(p) != "absent" else (),
        ))
    return out

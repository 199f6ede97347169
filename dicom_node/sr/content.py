"""Content of the node's TID 1500 Measurement Report, built from :mod:`inference.results` objects.

One measurement group (TID 1501) per source image: tracking identifier and UID,
finding type, the processing status, qualitative evaluations (fracture and tumour
decisions, knee osteoarthritis from the KL grade, KL grade, anatomy, view), each
probability as a numeric measurement, and algorithm identification (TID 4019) with
the operating points as parameters. One planar ROI group (TID 1410) per localised
region with a closed-polyline SCOORD box on the source image. Images that were
not processed get a group with status "Failed" and the reason as text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from dicom_node.errors import EncodingError
from dicom_node.identity import ResultIdentity
from dicom_node.sr import enum
from inference.results import BinaryFinding, CategoricalFinding, CodedConcept, ImageResult, ModelInfo, Region

ConceptLike = Code | hd.sr.CodedConcept | CodedConcept


# -- codes ---------------------------------------------------------------------------------------
def to_code(concept: ConceptLike) -> hd.sr.CodedConcept:
    """A highdicom coded concept from a card concept or a pydicom code."""
    if isinstance(concept, hd.sr.CodedConcept):
        return concept
    if isinstance(concept, CodedConcept):
        return hd.sr.CodedConcept(concept.value, concept.scheme_designator, concept.meaning,
                                  concept.scheme_version)
    return hd.sr.CodedConcept(concept.value, concept.scheme_designator, concept.meaning, concept.scheme_version)


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def finding_concept(name: str, overrides: Mapping[str, ConceptLike] | None = None) -> hd.sr.CodedConcept:
    """Concept naming the finding ``name`` (card override, else standard, else private)."""
    if overrides and name in overrides:
        return to_code(overrides[name])
    code = enum.FINDING_CONCEPTS.get(_key(name))
    if code is None:
        code = enum.private(f"F-{_key(name).upper()}"[:16], name.replace("_", " ").capitalize())
    return to_code(code)


def binary_concept(finding: BinaryFinding, overrides: Mapping[str, ConceptLike] | None = None
                   ) -> hd.sr.CodedConcept:
    if finding.concept is not None and not (overrides and finding.name in overrides):
        return to_code(finding.concept)
    return finding_concept(finding.name, overrides)


def label_concept(finding: CategoricalFinding, index: int) -> hd.sr.CodedConcept:
    """Concept of label ``index`` of a categorical finding (card, else fallback, else private)."""
    if finding.concepts:
        return to_code(finding.concepts[index])
    label = finding.labels[index]
    code = enum.LABEL_CONCEPTS.get(_key(finding.name), {}).get(_key(label))
    if code is None:
        value = f"{_key(finding.name)[:6].upper()}-{_key(label).upper()}"[:16]
        code = enum.private(value, f"{finding.name.replace('_', ' ')}: {label}")
    return to_code(code)


# -- algorithm -------------------------------------------------------------------------------------
def algorithm_parameters(results: Sequence[ImageResult]) -> list[str]:
    """The operating points used, as ``name.point=value`` strings (TID 4019 Algorithm Parameters)."""
    seen: dict[str, str] = {}
    for r in results:
        for f in (r.fracture, r.tumour):
            if f is None:
                continue
            for point in ("suspected", "definite"):
                key = f"{f.name}.{point}"
                value = f"{getattr(f.operating_points, point):.6g}"
                if seen.setdefault(key, value) != value:
                    raise EncodingError(f"results of one study use different thresholds for {key}")
    return [f"{k}={v}" for k, v in sorted(seen.items())]


def algorithm_identification(model: ModelInfo, parameters: Sequence[str]) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version,
                                         parameters=list(parameters) or None,
                                         manufacturer=model.manufacturer or None)


# -- geometry ----------------------------------------------------------------------------------------
def pixel_spacing_mm(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm from PixelSpacing or ImagerPixelSpacing, None when absent or zero."""
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(kw)
        if value is None:
            continue
        try:
            dr, dc = float(value[0]), float(value[1])
        except (TypeError, ValueError, IndexError):
            continue
        if dr > 0 and dc > 0 and math.isfinite(dr) and math.isfinite(dc):
            return dr, dc
    return None


def box_polyline(box: tuple[float, float, float, float], rows: int, columns: int) -> np.ndarray:
    """Closed polyline (column, row) around ``box`` in DICOM image coordinates (0,0 = top-left corner)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = max(0.0, min(x0, x1)), min(float(columns), max(x0, x1))
    y0, y1 = max(0.0, min(y0, y1)), min(float(rows), max(y0, y1))
    if not (x1 > x0 and y1 > y0):
        raise EncodingError(f"region box {box} is empty inside a {columns}x{rows} image")
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


def box_inside(box: tuple[float, float, float, float], rows: int, columns: int) -> bool:
    """Whether ``box`` keeps a non-empty part inside the image."""
    try:
        if not all(math.isfinite(float(v)) for v in box):
            return False
        box_polyline(box, rows, columns)
        return True
    except (EncodingError, TypeError, ValueError):
        return False


def polyline_box(points: np.ndarray) -> tuple[float, float, float, float]:
    """Inverse of :func:`box_polyline`."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))


# -- groups ---------------------------------------------------------------------------------------------
def _status_item(code: Code) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(enum.PROCESSING_STATUS, code)


def _probability(name: hd.sr.CodedConcept, value: float, algo) -> hd.sr.Measurement:
    value = float(value)
    if not (0.0 <= value <= 1.0) or not math.isfinite(value):
        raise EncodingError(f"probability {value} of {name.meaning} is not in 0..1")
    return hd.sr.Measurement(name=name, value=value, unit=enum.UNIT_PROBABILITY, algorithm_id=algo)


def image_group(ds: Dataset, result: ImageResult, identity: ResultIdentity, algo, image_number: int,
                overrides: Mapping[str, ConceptLike] | None = None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group with every finding of one processed image."""
    sop_uid = str(ds.SOPInstanceUID)
    evaluations: list[hd.sr.QualitativeEvaluation] = [_status_item(enum.STATUS_SUCCEEDED)]
    measurements: list[hd.sr.Measurement] = []
    for f in (result.fracture, result.tumour):
        if f is None:
            continue
        concept = binary_concept(f, overrides)
        evaluations.append(hd.sr.QualitativeEvaluation(concept, enum.DECISION_CODES[f.decision]))
        measurements.append(_probability(concept, f.probability, algo))
    if result.kl_grade is not None:
        grade = _kl_number(result.kl_grade.label)
        if grade is not None:
            present = grade >= enum.KNEE_OA_MIN_KL_GRADE
            evaluations.append(hd.sr.QualitativeEvaluation(
                enum.KNEE_OSTEOARTHRITIS, enum.DECISION_CODES["definite" if present else "absent"]))
    for cat in (result.kl_grade, result.anatomy, result.view):
        if cat is None:
            continue
        evaluations.append(hd.sr.QualitativeEvaluation(finding_concept(cat.name, overrides),
                                                       label_concept(cat, cat.index)))
        for i in range(len(cat.labels)):
            measurements.append(_probability(label_concept(cat, i), cat.probabilities[i], algo))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.tracking_uid(sop_uid, "image"),
                                                     identifier=f"Image {image_number} findings"),
        finding_type=enum.IMAGE_FINDINGS,
        algorithm_id=algo,
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)],
    )


def _kl_number(label: str) -> int | None:
    digits = "".join(ch for ch in str(label) if ch.isdigit())
    return int(digits) if digits else None


def not_processed_group(ds: Dataset, result: ImageResult, identity: ResultIdentity, algo,
                        image_number: int) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for an image the model could not process: status "Failed" and the reason."""
    sop_uid = str(ds.SOPInstanceUID)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.tracking_uid(sop_uid, "image"),
                                                     identifier=f"Image {image_number} findings"),
        finding_type=enum.IMAGE_FINDINGS,
        algorithm_id=algo,
        qualitative_evaluations=[_status_item(enum.STATUS_FAILED)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)],
    )
    reason = (result.reason or "not processed").strip() or "not processed"
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=enum.REASON_NOT_PROCESSED, value=reason[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def region_group(ds: Dataset, result: ImageResult, region: Region, number: int, image_number: int,
                 identity: ResultIdentity, algo, overrides: Mapping[str, ConceptLike] | None = None
                 ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group for one localised region: SCOORD box, type, peak score, area, decision."""
    sop_uid = str(ds.SOPInstanceUID)
    polyline = box_polyline(region.box, result.rows, result.columns)
    image_region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=polyline,
        source_image=hd.sr.SourceImageForRegion(referenced_sop_class_uid=ds.SOPClassUID,
                                                referenced_sop_instance_uid=sop_uid))
    measurements = [hd.sr.Measurement(name=enum.REGION_PEAK_SCORE, value=float(region.score),
                                      unit=enum.UNIT_SCORE, algorithm_id=algo)]
    spacing = pixel_spacing_mm(ds)
    if spacing is not None:
        measurements.append(hd.sr.Measurement(name=enum.AREA, value=float(region.area_px) * spacing[0] * spacing[1],
                                              unit=enum.UNIT_MM2, algorithm_id=algo))
    evaluations = None
    if region.source == "fracture" and result.fracture is not None:
        concept = binary_concept(result.fracture, overrides)
        finding_type = concept
        evaluations = [hd.sr.QualitativeEvaluation(concept, enum.DECISION_CODES[result.fracture.decision])]
    elif region.source == "fracture":
        finding_type = finding_concept("fracture", overrides)
    else:
        finding_type = to_code(enum.ABNORMAL_REGION)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=identity.tracking_uid(sop_uid, f"{region.source}-region-{number}"),
            identifier=f"Image {image_number} {region.source} region {number}"),
        referenced_region=image_region,
        finding_type=finding_type,
        algorithm_id=algo,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


# -- report level -----------------------------------------------------------------------------------------
def report_evaluations(model: ModelInfo, n_images: int, n_failed: int) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 "Qualitative Evaluations" container: overall status and the use statement."""
    container = hd.sr.ContainerContentItem(name=enum.QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence()
    if n_failed == 0:
        status = enum.STATUS_SUCCEEDED
    elif n_failed < n_images:
        status = enum.STATUS_PARTIAL
    else:
        status = enum.STATUS_FAILED
    container.ContentSequence.append(hd.sr.CodeContentItem(
        name=enum.PROCESSING_STATUS, value=status, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    container.ContentSequence.append(hd.sr.TextContentItem(
        name=enum.USE_RESTRICTION, value=use_statement(model),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return container


def use_statement(model: ModelInfo) -> str:
    if model.for_diagnostic_use:
        return f"AI RESULT ({model.name} {model.version}) - to be reviewed by a qualified reader"
    return f"{enum.NOT_FOR_DIAGNOSTIC_USE_TEXT} ({model.name} {model.version})"


def observation_context(model: ModelInfo, identity: ResultIdentity) -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid, name=model.name[:64], manufacturer_name=(model.manufacturer or "unknown")[:64],
            model_name=f"{model.name} {model.version}"[:64])))


def contributing_equipment(model: ModelInfo, identity: ResultIdentity, description: str) -> hd.ContributingEquipment:
    """The algorithm as Contributing Equipment with the purpose "Processing Algorithm" (IHE AIR).

    highdicom accepts only CID 7005 purposes, so the item is built as "Processing Equipment" and its
    purpose then set to AIR's code. The Device UID is added on the finished dataset (:func:`add_device_uid`).
    """
    item = hd.ContributingEquipment(
        manufacturer=(model.manufacturer or "unknown")[:64],
        purpose_of_reference=hd.sr.CodedConcept("109102", "DCM", "Processing Equipment"),
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
        device_serial_number=model.weights_sha256[:16],
        contribution_description=description[:1024],
    )
    item.PurposeOfReferenceCodeSequence = [to_code(enum.PURPOSE_PROCESSING)]
    return item


def add_device_uid(ds: Dataset, model: ModelInfo, identity: ResultIdentity) -> None:
    """Set the Device UID on the algorithm's Contributing Equipment item."""
    found = False
    for item in ds.get("ContributingEquipmentSequence", []):
        purpose = item.get("PurposeOfReferenceCodeSequence")
        if purpose and purpose[0].CodeValue == enum.PURPOSE_PROCESSING.value \
                and purpose[0].CodingSchemeDesignator == enum.PURPOSE_PROCESSING.scheme_designator \
                and item.get("DeviceSerialNumber") == model.weights_sha256[:16] \
                and item.get("ManufacturerModelName") == model.name[:64]:
            item.DeviceUID = identity.device_uid
            found = True
    if not found:
        raise EncodingError("the algorithm's Contributing Equipment item is missing")


def ihe_scheme() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    """Declaration of IHE's scheme (the Contributing Equipment purpose "Processing Algorithm")."""
    return hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=enum.IHE_SCHEME, name=enum.IHE_SCHEME_NAME, responsible_organization=enum.IHE_SCHEME_ORGANIZATION)


def coding_schemes(content: Dataset) -> list[hd.coding_schemes.CodingSchemeIdentificationItem]:
    """Coding Scheme Identification items for every non-standard scheme used in ``content``, and IHE's (used
    by the Contributing Equipment Sequence)."""
    used: set[str] = {enum.IHE_SCHEME}

    def walk(items) -> None:
        for item in items:
            for kw in ("ConceptNameCodeSequence", "ConceptCodeSequence", "MeasurementUnitsCodeSequence",
                       "PurposeOfReferenceCodeSequence"):
                for code in item.get(kw, []):
                    used.add(str(code.CodingSchemeDesignator))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk([content])
    out = []
    for designator in sorted(used - enum.STANDARD_SCHEMES):
        if designator == enum.IHE_SCHEME:
            out.append(ihe_scheme())
        elif designator == enum.PRIVATE_SCHEME:
            out.append(hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=designator, name=enum.PRIVATE_SCHEME_NAME, version=enum.PRIVATE_SCHEME_VERSION,
                responsible_organization=enum.PRIVATE_SCHEME_ORGANIZATION))
        else:
            out.append(hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=designator, name=f"coding scheme {designator} (from the model card)"))
    return out


# -- image library (TID 1600) ----------------------------------------------------------------------------------
_MODALITY = Code("121139", "DCM", "Modality")
_SOURCE = Code("260753009", "SCT", "Source")
ILLUSTRATION_OF_FINDING = Code("125201", "DCM", "Illustration of Finding")
SUMMARY = Code("121111", "DCM", "Summary")


def image_library(sources: Sequence[Dataset], heatmaps: Sequence[Dataset],
                  summary: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library: source images ("Source"), heatmaps ("Illustration of Finding") and the
    summary page ("Summary"), grouped by modality (TID 1602 descriptor at group level).

    Built here rather than with ``hd.sr.ImageLibrary`` because that one requires descriptors
    (Imager Pixel Spacing) that real CR images often lack.
    """
    relation = hd.sr.RelationshipTypeValues
    library = hd.sr.ContainerContentItem(name=hd.sr.CodedConcept("111028", "DCM", "Image Library"),
                                         relationship_type=relation.CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence()
    groups: dict[str, list] = {}
    for purpose, datasets in ((_SOURCE, sources), (ILLUSTRATION_OF_FINDING, heatmaps), (SUMMARY, summary)):
        for ds in datasets:
            item = hd.sr.ImageContentItem(name=purpose, referenced_sop_class_uid=ds.SOPClassUID,
                                          referenced_sop_instance_uid=ds.SOPInstanceUID,
                                          relationship_type=relation.CONTAINS)
            groups.setdefault(str(ds.get("Modality", "OT") or "OT"), []).append(item)
    for modality, items in groups.items():
        group = hd.sr.ContainerContentItem(name=hd.sr.CodedConcept("126200", "DCM", "Image Library Group"),
                                           relationship_type=relation.CONTAINS)
        group.ContentSequence = hd.sr.ContentSequence()
        group.ContentSequence.append(hd.sr.CodeContentItem(
            name=_MODALITY, value=hd.sr.CodedConcept(modality, "DCM", _modality_meaning(modality)),
            relationship_type=relation.HAS_ACQ_CONTEXT))
        group.ContentSequence.extend(items)
        library.ContentSequence.append(group)
    return library


def _modality_meaning(modality: str) -> str:
    return {"CR": "Computed Radiography", "DX": "Digital Radiography", "OT": "Other",
            "MG": "Mammography", "RG": "Radiographic imaging", "PX": "Panoramic X-Ray",
            "IO": "Intra-oral Radiography", "XA": "X-Ray Angiography", "RF": "Radio Fluoroscopy",
            "DOC": "Document", "SR": "SR Document"}.get(modality, modality)

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

import copy
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
# Every measurement group is a TID 1410 planar ROI group with an SCOORD on its source image: viewers that
# display TID 1500 (OHIF among them) draw each group's region and label it with the group's NUM items,
# and a group without an SCOORD makes OHIF fail the whole report. The image-level findings therefore sit
# in a group whose region is the whole image (the finding is about the image), the regions the model
# localised in one group each. The NUM items come in the order a viewer should show them: the calls
# first ("Fracture of bone, definite: 72.00 %"), then the rest.
def _status_item(code: Code) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(enum.PROCESSING_STATUS, code)


def _percent(name: hd.sr.CodedConcept, value: float, algo=None, what: str = "probability") -> hd.sr.Measurement:
    """A probability or score in 0..1 as a NUM in percent."""
    value = float(value)
    if not (0.0 <= value <= 1.0) or not math.isfinite(value):
        raise EncodingError(f"{what} {value} of {name.meaning} is not in 0..1")
    return hd.sr.Measurement(name=name, value=round(value * 100.0, 4), unit=enum.UNIT_PERCENT)


def whole_image(ds: Dataset, rows: int, columns: int) -> hd.sr.ImageRegion:
    """The whole image as a closed polyline region (the region of the image-level findings)."""
    return _region(ds, box_polyline((0.0, 0.0, float(columns), float(rows)), rows, columns))


def _region(ds: Dataset, polyline: np.ndarray) -> hd.sr.ImageRegion:
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=polyline,
        source_image=hd.sr.SourceImageForRegion(referenced_sop_class_uid=ds.SOPClassUID,
                                                referenced_sop_instance_uid=str(ds.SOPInstanceUID)))


def image_geometry(ds: Dataset, result: ImageResult) -> tuple[int, int] | None:
    """(rows, columns) of the image a group is drawn on: the result's, else the header's; None if unknown."""
    for rows, columns in ((result.rows, result.columns), (ds.get("Rows"), ds.get("Columns"))):
        try:
            r, c = int(rows or 0), int(columns or 0)
        except (TypeError, ValueError):
            continue
        if r > 0 and c > 0:
            return r, c
    return None


def _image_tracking(ds: Dataset, identity: ResultIdentity, image_number: int) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=identity.tracking_uid(str(ds.SOPInstanceUID), "image"),
                                    identifier=f"Image {image_number} findings")


def image_group(ds: Dataset, result: ImageResult, identity: ResultIdentity, algo, image_number: int,
                overrides: Mapping[str, ConceptLike] | None = None
                ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group with every finding of one processed image, on the whole image."""
    evaluations: list[hd.sr.QualitativeEvaluation] = [_status_item(enum.STATUS_SUCCEEDED)]
    calls: list[hd.sr.Measurement] = []
    others: list[hd.sr.Measurement] = []
    for f in (result.fracture, result.tumour):
        if f is None:
            continue
        concept = binary_concept(f, overrides)
        evaluations.append(hd.sr.QualitativeEvaluation(concept, enum.DECISION_CODES[f.decision]))
        calls.append(_percent(to_code(enum.decision_probability(concept, f.decision)), f.probability, algo))
    if result.kl_grade is not None:
        grade = _kl_number(result.kl_grade.label)
        if grade is not None:
            present = grade >= enum.KNEE_OA_MIN_KL_GRADE
            evaluations.append(hd.sr.QualitativeEvaluation(
                enum.KNEE_OSTEOARTHRITIS, enum.DECISION_CODES["definite" if present else "absent"]))
    for cat in (result.kl_grade, result.anatomy, result.view):
        if cat is None:
            continue
        if cat.uncertain:  # below the card's confidence floor: no coded answer, only the probabilities
            others += [_percent(label_concept(cat, i), cat.probabilities[i], algo) for i in range(len(cat.labels))]
            continue
        evaluations.append(hd.sr.QualitativeEvaluation(finding_concept(cat.name, overrides),
                                                       label_concept(cat, cat.index)))
        # the chosen label first (the line a viewer shows), the others after the calls
        calls.append(_percent(label_concept(cat, cat.index), cat.probabilities[cat.index], algo))
        others += [_percent(label_concept(cat, i), cat.probabilities[i], algo)
                   for i in range(len(cat.labels)) if i != cat.index]
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_image_tracking(ds, identity, image_number),
        referenced_region=whole_image(ds, result.rows, result.columns),
        finding_type=enum.IMAGE_FINDINGS,
        algorithm_id=algo,
        measurements=(calls + others) or None,
        qualitative_evaluations=evaluations,
    )
    for f in result.not_localised():
        _append_text(group, enum.LOCALISATION, f"{binary_concept(f, overrides).meaning}: {enum.NOT_LOCALISED_TEXT}")
    if result.anomaly_map is not None and result.anomaly_note:
        _append_text(group, enum.ANOMALY_MAP_NOTE, result.anomaly_note)
    return for_viewers(group, image_comment(result, image_number, overrides))


def call_text(f: BinaryFinding, overrides: Mapping[str, ConceptLike] | None = None) -> str:
    """"Fracture of bone, definite, p = 0.72"."""
    return f"{binary_concept(f, overrides).meaning}, {f.decision}, p = {f.probability:.2f}"


def image_comment(result: ImageResult, image_number: int, overrides: Mapping[str, ConceptLike] | None = None
                  ) -> str:
    """The whole-image group's label: every finding of the image in one line."""
    parts = [call_text(f, overrides) for f in (result.fracture, result.tumour) if f is not None]
    unboxed = {f.name for f in result.not_localised()}
    parts = [p + (f" ({enum.NOT_LOCALISED_TEXT})" if f.name in unboxed else "")
             for p, f in zip(parts, [f for f in (result.fracture, result.tumour) if f is not None])]
    for cat in (result.kl_grade, result.anatomy, result.view):
        if cat is not None:
            said = label_concept(cat, cat.index).meaning
            said = f"uncertain (most likely {said})" if cat.uncertain else said
            parts.append(f"{finding_concept(cat.name, overrides).meaning}: {said} ({cat.confidence:.2f})")
    return f"Image {image_number}: " + ("; ".join(parts) if parts else "no findings reported")


def for_viewers(group, comment: str):
    """What a TID 1500 viewer needs beyond the template's required rows (OHIF 3.x as the reference):

    - a Comment (DCM 121106) TEXT item: the label a viewer's measurement panel shows for the group;
    - the group's region again under its first NUM, as INFERRED FROM (TID 300 allows it): OHIF's
      "track measurements" reads the geometry of a group from its first NUM's only child, so the NUMs
      carry no other children (the algorithm identification, TID 4019, is on the group).
    """
    items = group[0].ContentSequence
    region = next(item for item in items if item.ValueType == "SCOORD")
    first_num = next((item for item in items if item.ValueType == "NUM"), None)
    if first_num is not None:
        inferred = copy.deepcopy(region)
        inferred.RelationshipType = hd.sr.RelationshipTypeValues.INFERRED_FROM.value
        first_num.ContentSequence = hd.sr.ContentSequence([inferred])
    items.append(hd.sr.TextContentItem(name=enum.COMMENT, value=comment[:1024],
                                       relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _append_text(group, name: Code, value: str) -> None:
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=name, value=value[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))


def _kl_number(label: str) -> int | None:
    digits = "".join(ch for ch in str(label) if ch.isdigit())
    return int(digits) if digits else None


def not_processed_group(ds: Dataset, result: ImageResult, identity: ResultIdentity, algo,
                        image_number: int) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | None:
    """TID 1410 group on the whole image for an image the model could not process: status "Failed" and
    the reason. None when the image's size is unknown (no region can be drawn): the report-level
    evaluations then carry the reason (:func:`report_evaluations`)."""
    geometry = image_geometry(ds, result)
    if geometry is None:
        return None
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_image_tracking(ds, identity, image_number),
        referenced_region=whole_image(ds, *geometry),
        finding_type=enum.IMAGE_FINDINGS,
        algorithm_id=algo,
        qualitative_evaluations=[_status_item(enum.STATUS_FAILED)],
    )
    _append_text(group, enum.REASON_NOT_PROCESSED, not_processed_reason(result))
    return for_viewers(group, f"Image {image_number}: not processed: {not_processed_reason(result)}")


def not_processed_reason(result: ImageResult) -> str:
    return (result.reason or "not processed").strip() or "not processed"


def region_group(ds: Dataset, result: ImageResult, region: Region, number: int, image_number: int,
                 identity: ResultIdentity, algo, overrides: Mapping[str, ConceptLike] | None = None
                 ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group for one localised region: SCOORD box, finding, the call with its probability (fracture)
    or the anomaly score, the map's peak score and the area."""
    sop_uid = str(ds.SOPInstanceUID)
    measurements: list[hd.sr.Measurement] = []
    evaluations = None
    if region.source == "fracture" and result.fracture is not None:
        concept = binary_concept(result.fracture, overrides)
        finding_type = concept
        evaluations = [hd.sr.QualitativeEvaluation(concept, enum.DECISION_CODES[result.fracture.decision])]
        measurements.append(_percent(to_code(enum.decision_probability(concept, result.fracture.decision)),
                                     result.fracture.probability, algo))
        measurements.append(_percent(to_code(enum.REGION_PEAK_SCORE), region.score, algo, "score"))
    elif region.source == "fracture":
        finding_type = finding_concept("fracture", overrides)
        measurements.append(_percent(to_code(enum.REGION_PEAK_SCORE), region.score, algo, "score"))
    else:
        finding_type = to_code(enum.ABNORMAL_REGION)
        measurements.append(_percent(to_code(enum.ANOMALY_SCORE), region.score, algo, "score"))
    spacing = pixel_spacing_mm(ds)
    if spacing is not None:
        measurements.append(hd.sr.Measurement(name=enum.AREA, value=float(region.area_px) * spacing[0] * spacing[1],
                                              unit=enum.UNIT_MM2))
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=identity.tracking_uid(sop_uid, f"{region.source}-region-{number}"),
            identifier=f"Image {image_number} {region.source} region {number}"),
        referenced_region=_region(ds, box_polyline(region.box, result.rows, result.columns)),
        finding_type=finding_type,
        algorithm_id=algo,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    tag = f"image {image_number}, {'F' if region.source == 'fracture' else 'A'}{number}"
    if region.source == "fracture" and result.fracture is not None:
        comment = f"{call_text(result.fracture, overrides)} ({tag})"
    elif region.source == "fracture":
        comment = f"{finding_type.meaning}, map score {region.score:.2f} ({tag})"
    else:
        comment = f"{enum.ABNORMAL_REGION.meaning}, anomaly score {region.score:.2f} ({tag})"
    return for_viewers(group, comment)


# -- report level -----------------------------------------------------------------------------------------
def report_evaluations(model: ModelInfo, n_images: int, n_failed: int,
                       unplaced: Sequence[str] = ()) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 "Qualitative Evaluations" container: overall status, the use statement, and the
    reasons of images not processed whose size is unknown (``unplaced``: no group can be drawn on them)."""
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
    for text in unplaced:
        container.ContentSequence.append(hd.sr.TextContentItem(
            name=enum.REASON_NOT_PROCESSED, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
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

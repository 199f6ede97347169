"""The node's Comprehensive 3D SR (TID 1500 root) and a reader for it.

:func:`build_sr` turns the model's results for one study into a
``highdicom.sr.Comprehensive3DSR``; :func:`read_sr` reads one back (with
highdicom) into plain findings, which is what the round-trip tests and a
re-run's predecessor lookup use.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

import highdicom as hd
from pydicom.dataset import Dataset

import dicom_node
from dicom_node.errors import EncodingError
from dicom_node.identity import ResultIdentity
from dicom_node.logs import describe_error
from dicom_node.result_series import created_now, series_description, stamp
from dicom_node.sr import content as c
from dicom_node.sr import enum
from inference.results import ImageResult, ModelInfo

SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
log = logging.getLogger("dicom_node.sr")


def build_sr(sources: Sequence[Dataset], results: Sequence[ImageResult], model: ModelInfo,
             identity: ResultIdentity, *, heatmaps: Sequence[Dataset] = (), summary: Sequence[Dataset] = (),
             predecessor: Dataset | None = None, created: datetime | None = None,
             concept_overrides: Mapping[str, c.ConceptLike] | None = None) -> hd.sr.Comprehensive3DSR:
    """The SR for one study. ``sources[i]`` is the image ``results[i]`` is about.

    ``heatmaps`` and ``summary`` (secondary captures) are listed in the image library and as
    evidence; ``predecessor`` (an SR this one supersedes) goes into the Predecessor
    Documents Sequence.
    """
    if len(sources) != len(results) or not sources:
        raise EncodingError(f"{len(sources)} source datasets for {len(results)} results")
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    if len(set(uids)) != len(uids):
        raise EncodingError("the source datasets repeat a SOP Instance UID")
    params = c.algorithm_parameters(results)
    params.append(f"weights_sha256={model.weights_sha256}")
    algo = c.algorithm_identification(model, params)

    groups: list = []
    unplaced: list[str] = []
    n_failed = 0
    for number, (ds, result) in enumerate(zip(sources, results), 1):
        if not result.processed:
            n_failed += 1
            group = c.not_processed_group(ds, result, identity, algo, number)
            if group is not None:
                groups.append(group)
            else:
                unplaced.append(f"image {number} (SOP Instance UID {ds.SOPInstanceUID}): "
                                f"{c.not_processed_reason(result)}")
            continue
        if (int(ds.Rows), int(ds.Columns)) != (int(result.rows), int(result.columns)):
            raise EncodingError(f"result for image {number} is {result.columns}x{result.rows}, "
                                f"the image is {ds.Columns}x{ds.Rows}")
        groups.append(c.image_group(ds, result, identity, algo, number, concept_overrides))
        numbers: dict[str, int] = {}
        for region in result.reported_regions():
            numbers[region.source] = k = numbers.get(region.source, 0) + 1
            groups.append(c.region_group(ds, result, region, k, number, identity, algo, concept_overrides))

    library = [*sources, *heatmaps, *summary]
    report = hd.sr.MeasurementReport(
        observation_context=c.observation_context(model, identity),
        procedure_reported=enum.PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    root = report[0].ContentSequence
    # TID 1500: the image library (row 6) comes before the imaging measurements (row 8)
    measurements_at = next(i for i, item in enumerate(root)
                           if item.ConceptNameCodeSequence[0].CodeValue == "126010")
    root.insert(measurements_at, c.image_library(sources, heatmaps, summary))
    root.append(c.report_evaluations(model, len(results), n_failed, unplaced))

    description = f"AI processing algorithm {model.name} {model.version}, weights sha256 {model.weights_sha256}"
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=library,
            content=report[0],
            series_instance_uid=identity.sr_series_uid,
            series_number=identity.sr_series_number,
            sop_instance_uid=identity.sr_instance_uid,
            instance_number=1,
            manufacturer=(model.manufacturer or "unknown")[:64],
            manufacturer_model_name=model.name[:64],
            software_versions=model.version[:64],
            device_serial_number=model.weights_sha256[:16],
            is_complete=n_failed == 0,
            is_final=True,
            is_verified=False,
            previous_versions=[predecessor] if predecessor is not None else None,
            contributing_equipment=[c.contributing_equipment(model, identity, description)],
            series_description=series_description(model, "SR", identity),
            coding_schemes=c.coding_schemes(report[0]),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodingError(f"the SR could not be built: {describe_error(exc)}") from exc
    if n_failed:
        sr.CompletionFlagDescription = f"{n_failed} of {len(results)} images not processed"[:64]
    # highdicom types SoftwareVersions as str | tuple[str] (one-tuple); the LO element is multi-valued
    sr.SoftwareVersions = [model.version[:64], f"msk-dicom-node {dicom_node.__version__}"]  # type: ignore[assignment]
    sr.DeviceUID = identity.device_uid
    c.add_device_uid(sr, model, identity)
    stamp(sr, created or created_now())
    if predecessor is not None and predecessor.StudyInstanceUID != sr.StudyInstanceUID:
        raise EncodingError("the predecessor SR belongs to another study")
    return sr


# -- reading back -------------------------------------------------------------------------------------------
@dataclass
class RegionRead:
    source_sop_instance_uid: str
    finding_type: hd.sr.CodedConcept | None
    box: tuple[float, float, float, float]
    peak_score: float | None
    area_mm2: float | None
    evaluations: dict[hd.sr.CodedConcept, hd.sr.CodedConcept]
    tracking_uid: str | None
    #: the image's probability of the finding the region localises (fracture regions)
    probability: float | None = None


@dataclass
class ImageRead:
    source_sop_instance_uid: str
    tracking_uid: str | None
    status: hd.sr.CodedConcept | None
    reason: str | None
    evaluations: dict[hd.sr.CodedConcept, hd.sr.CodedConcept] = field(default_factory=dict)
    probabilities: dict[hd.sr.CodedConcept, float] = field(default_factory=dict)
    algorithm: tuple[str, str, tuple[str, ...]] | None = None
    regions: list[RegionRead] = field(default_factory=list)
    #: "<finding>: not localised" for each positive finding no region localises
    not_localised: list[str] = field(default_factory=list)


@dataclass
class SRRead:
    images: list[ImageRead]
    status: hd.sr.CodedConcept | None
    use_statement: str | None
    library: list[str]
    #: reasons of images not processed whose size was unknown (no group on them)
    unplaced: list[str] = field(default_factory=list)


def _code_key(code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def _algorithm(group) -> tuple[str, str, tuple[str, ...]] | None:
    """(name, version, parameters) of the TID 4019 items of a group."""
    name = version = None
    params: list[str] = []
    for item in group[0].ContentSequence:
        if item.ValueType != "TEXT":
            continue
        v = item.ConceptNameCodeSequence[0].CodeValue
        if v == "111001":
            name = str(item.TextValue)
        elif v == "111003":
            version = str(item.TextValue)
        elif v == "111002":
            params.append(str(item.TextValue))
    return (name, version or "", tuple(params)) if name is not None else None


def _is_image_group(group) -> bool:
    ft = group.finding_type
    return ft is not None and (ft.value, ft.scheme_designator) == (enum.IMAGE_FINDINGS.value,
                                                                   enum.IMAGE_FINDINGS.scheme_designator)


def _texts(group, name) -> list[str]:
    return [str(item.TextValue) for item in group[0].ContentSequence
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == name.value
            and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == name.scheme_designator]


def _fraction(m) -> float:
    """A NUM in percent (the node's unit for probabilities and scores) as 0..1."""
    unit = m.unit
    value = float(m.value)
    return value / 100.0 if unit is not None and unit.value == enum.UNIT_PERCENT.value else value


def read_sr(ds: Dataset) -> SRRead:
    """Read one of the node's SRs back with highdicom into plain findings per source image."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    images: dict[str, ImageRead] = {}
    order: list[str] = []
    groups = report.get_planar_roi_measurement_groups()
    for group in groups:
        if not _is_image_group(group):
            continue
        region = cast(hd.sr.ImageRegion, group.roi)
        src = str(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        # highdicom annotates QualitativeEvaluation.value as int | float; it is the CODE item's CodedConcept
        status: hd.sr.CodedConcept | None = None
        evaluations: dict[hd.sr.CodedConcept, hd.sr.CodedConcept] = {}
        for ev in group.get_qualitative_evaluations():
            if ev.name == enum.PROCESSING_STATUS:
                status = cast(hd.sr.CodedConcept, ev.value)
            else:
                evaluations[_code_key(ev.name)] = cast(hd.sr.CodedConcept, ev.value)
        reasons = _texts(group, enum.REASON_NOT_PROCESSED)
        # a call's NUM is named "<finding>, <decision>": read back under the finding's concept
        call_names = {}
        for finding, decision in evaluations.items():
            for word, code in enum.DECISION_CODES.items():
                if (code.value, code.scheme_designator) == (decision.value, decision.scheme_designator):
                    call = enum.decision_probability(finding, word)
                    call_names[(call.value, call.scheme_designator)] = finding
        probabilities = {}
        for m in group.get_measurements():
            key = _code_key(m.name)
            probabilities[call_names.get((key.value, key.scheme_designator), key)] = _fraction(m)
        images[src] = ImageRead(src, group.tracking_uid, status, reasons[0] if reasons else None, evaluations,
                                probabilities, _algorithm(group),
                                not_localised=_texts(group, enum.LOCALISATION))
        order.append(src)
    for roi_group in groups:
        if _is_image_group(roi_group):
            continue
        region = cast(hd.sr.ImageRegion, roi_group.roi)  # the node's region groups reference a 2D image region
        src = str(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        peak = area = probability = None
        for m in roi_group.get_measurements():
            if m.name in (enum.REGION_PEAK_SCORE, enum.ANOMALY_SCORE):
                peak = _fraction(m)
            elif m.name == enum.AREA:
                area = float(m.value)
            else:
                probability = _fraction(m)
        evaluations = {_code_key(ev.name): cast(hd.sr.CodedConcept, ev.value)
                       for ev in roi_group.get_qualitative_evaluations()}
        read = RegionRead(src, roi_group.finding_type, c.polyline_box(region.value), peak, area, evaluations,
                          roi_group.tracking_uid, probability)
        if src not in images:
            raise EncodingError(f"region on {src} without an image group")
        images[src].regions.append(read)
    status = use = None
    unplaced: list[str] = []
    for item in report[0].ContentSequence:
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == \
                enum.QUALITATIVE_EVALUATIONS.value:
            for sub in item.ContentSequence:
                name = sub.ConceptNameCodeSequence[0].CodeValue
                if name == enum.PROCESSING_STATUS.value:
                    status = hd.sr.CodedConcept.from_dataset(sub.ConceptCodeSequence[0])
                elif name == enum.USE_RESTRICTION.value:
                    use = sub.TextValue
                elif name == enum.REASON_NOT_PROCESSED.value:
                    unplaced.append(str(sub.TextValue))
    library = []
    for item in report[0].ContentSequence:
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "111028":  # Image Library
            for grp in item.ContentSequence:
                for entry in grp.get("ContentSequence", []):
                    if entry.ValueType == "IMAGE":
                        library.append(str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    return SRRead([images[k] for k in order], status, use, library, unplaced)

"""The model's results for one study as DICOM: the SR, the heatmaps, the summary page and the presentation states.

This is what the pipeline and ``dicom-node infer --dicom-out`` call::

    objs = build_result_objects(datasets, results, model)            # validated datasets
    paths = write_result_objects(objs, out_dir)                      # Part 10 files

UIDs are derived (:mod:`dicom_node.identity`) from the study, the bundle and the
result version, so that building the same results twice gives the same objects.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.errors import EncodingError, ImageNotProcessable
from dicom_node.identity import ResultIdentity
from dicom_node.pr.sop import build_gsps, presentable
from dicom_node.result_series import created_now
from dicom_node.sc import content as sc_content
from dicom_node.sc import enum as sc_enum
from dicom_node.sc.sop import build_sc
from dicom_node.sr.sop import build_sr
from inference.pixels import Displayed
from inference.results import CodedConcept, ImageResult, ModelInfo

# highdicom logs every module it copies at INFO; the node's log has no use for that chatter
logging.getLogger("highdicom").setLevel(logging.WARNING)


@dataclass
class ResultObjects:
    """The result objects of one study (``datasets()`` is the order to send them in)."""

    identity: ResultIdentity
    sr: Dataset
    heatmaps: list[Dataset]
    summary: Dataset
    #: heatmap file ids, parallel to ``heatmaps`` (derived from the source SOP Instance UIDs)
    heatmap_ids: list[str]
    #: grayscale softcopy presentation states, one per processed greyscale image
    presentation_states: list[Dataset] = field(default_factory=list)
    #: their file ids, parallel to ``presentation_states``
    presentation_state_ids: list[str] = field(default_factory=list)

    def datasets(self) -> list[Dataset]:
        """Secondary captures first (the SR references them), then the presentation states, the SR last."""
        return [self.summary, *self.heatmaps, *self.presentation_states, self.sr]

    def kinds(self) -> list[str]:
        """The object kind of each of :meth:`datasets` ("summary", "heatmap", "gsps", "sr")."""
        return (["summary"] + ["heatmap"] * len(self.heatmaps) + ["gsps"] * len(self.presentation_states)
                + ["sr"])


def align(source_datasets: Sequence[Dataset], results: Sequence[ImageResult]) -> list[tuple[Dataset, ImageResult]]:
    """Pair each source dataset with its result: by SOP Instance UID when the results' ``image_id`` are
    those UIDs, else by position. Every dataset needs exactly one result."""
    if not source_datasets:
        raise EncodingError("no source datasets")
    if len(source_datasets) != len(results):
        raise EncodingError(f"{len(source_datasets)} source datasets but {len(results)} results")
    for ds in source_datasets:
        for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"):
            if not str(ds.get(kw, "") or ""):
                raise EncodingError(f"a source dataset has no {kw}")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    if len(by_uid) != len(source_datasets):
        raise EncodingError("the source datasets repeat a SOP Instance UID")
    if all(r.image_id in by_uid for r in results):
        if len({r.image_id for r in results}) != len(results):
            raise EncodingError("two results name the same image")
        pairs = [(by_uid[r.image_id], r) for r in results]
        # keep the source order (the order of the study as received)
        order = {str(ds.SOPInstanceUID): i for i, ds in enumerate(source_datasets)}
        pairs.sort(key=lambda p: order[str(p[0].SOPInstanceUID)])
        return pairs
    return list(zip(source_datasets, results))


def card_concepts(card) -> dict[str, CodedConcept]:
    """Finding name -> concept from a bundle card (``card.heads[name].concept``), for ``concept_overrides``:
    the card's concept of a categorical head (the question, e.g. anatomy) is not in the results."""
    out: dict[str, CodedConcept] = {}
    for name, spec in (getattr(card, "heads", None) or {}).items():
        concept = getattr(spec, "concept", None)
        if isinstance(concept, CodedConcept):
            out[name] = concept
    return out


def predecessor_reference(study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str,
                          sop_class_uid: str = "1.2.840.10008.5.1.4.1.1.88.34") -> Dataset:
    """The ``predecessor`` argument when only the superseded SR's UIDs were kept (not the SR itself)."""
    ref = Dataset()
    ref.StudyInstanceUID = study_instance_uid
    ref.SeriesInstanceUID = series_instance_uid
    ref.SOPInstanceUID = sop_instance_uid
    ref.SOPClassUID = sop_class_uid
    return ref


def _check_one_study(sources: Sequence[Dataset]) -> None:
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise EncodingError(f"the source datasets belong to {len(studies)} studies; results are per study")
    patients = {str(ds.get("PatientID", "") or "") for ds in sources}
    if len(patients) != 1:
        raise EncodingError("the source datasets of one study name different patients")


def image_label(ds: Dataset) -> str:
    n = ds.get("InstanceNumber")
    modality = str(ds.get("Modality", "") or "")
    if n not in (None, ""):
        return f"{modality} #{n}".strip()
    return f"...{str(ds.SOPInstanceUID)[-10:]}"


def _summary_header(first: Dataset, results: Sequence[ImageResult]) -> list[str]:
    name = str(first.get("PatientName", "") or "")
    pid = str(first.get("PatientID", "") or "")
    date = str(first.get("StudyDate", "") or "")
    if len(date) == 8 and date.isdigit():
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    acc = str(first.get("AccessionNumber", "") or "")
    desc = str(first.get("StudyDescription", "") or "")
    n_ok = sum(1 for r in results if r.processed)
    lines = [f"Patient: {name}  (ID {pid})", f"Study date: {date}   Accession: {acc}   {desc}".rstrip(),
             f"Images: {len(results)}   processed: {n_ok}   not processed: {len(results) - n_ok}"]
    return lines


def build_result_objects(source_datasets: Sequence[Dataset], results: Sequence[ImageResult], model: ModelInfo,
                         result_version: int = 1, predecessor: Dataset | None = None, *,
                         concept_overrides: Mapping[str, CodedConcept] | None = None,
                         created: datetime | None = None, displays: Mapping[str, Displayed] | None = None
                         ) -> ResultObjects:
    """SR, heatmap SCs, summary SC and presentation states for one study.

    ``source_datasets`` are the study's images (pixel data needed for the processed ones),
    ``results`` the model's results (one per dataset; ``image_id`` the SOP Instance UID, or
    in the same order). ``result_version`` > 1 for a re-run; ``predecessor`` (any dataset
    with the SOP Class/Instance, Series and Study UIDs of the SR it supersedes) goes into
    the Predecessor Documents Sequence. ``concept_overrides`` maps finding names to the
    model card's concepts. ``created`` (default: now) is the instant every object of this version
    carries as its Series, Content and Instance Creation Date/Time. ``displays`` (by SOP Instance UID):
    images already decoded (:func:`inference.pixels.displayed`, e.g. for the model or ahead of it), used
    for the heatmap capture and the presentation state when large enough for the capture
    (:func:`~dicom_node.sc.content.capture_side`); any other processed image is decoded here once, at the
    smallest resolution the capture needs, for both.
    Raises :class:`EncodingError` on anything inconsistent.
    """

    pairs = align(source_datasets, results)
    sources = [p[0] for p in pairs]
    results = [p[1] for p in pairs]
    _check_one_study(sources)
    if predecessor is not None and result_version < 2:
        raise EncodingError("a result that supersedes another needs result_version >= 2")
    identity = ResultIdentity(str(sources[0].StudyInstanceUID), model.name, model.version, model.weights_sha256,
                              result_version)
    if predecessor is not None and str(predecessor.SOPInstanceUID) == identity.sr_instance_uid:
        raise EncodingError("the predecessor SR has the UID of the new one: raise result_version")

    created = created or created_now()
    heatmaps: list[Dataset] = []
    heatmap_ids: list[str] = []
    presentation_states: list[Dataset] = []
    pr_ids: list[str] = []
    instance_number = 2  # the summary page is instance 1
    labels = [image_label(ds) for ds in sources]
    for ds, result, shown, pixels in _heatmaps(sources, results, model, displays, labels):
        map_label = sc_content.map_label(result)
        derivation = (f"{map_label or 'no'} map of {model.name} {model.version} blended over the source image as "
                      f"displayed (VOI applied); fracture boxes: solid = definite, dotted = suspected")
        sop_uid = str(ds.SOPInstanceUID)
        heatmaps.append(build_sc(pixels, [ds], model, identity, sop_instance_uid=identity.heatmap_uid(sop_uid),
                                 instance_number=instance_number, derivation=derivation, created=created))
        heatmap_ids.append(identity.file_id("heatmap", sop_uid))
        instance_number += 1
        if presentable(ds):  # a colour source gets no grayscale presentation state
            presentation_states.append(build_gsps(ds, result, model, identity, instance_number=len(pr_ids) + 1,
                                                  created=created, window=shown.window))
            pr_ids.append(identity.file_id("gsps", sop_uid))

    page = sc_content.render_summary(results, labels, model, _summary_header(sources[0], results))
    summary = build_sc(page, sources, model, identity, sop_instance_uid=identity.summary_uid, instance_number=1,
                       derivation=f"table of the findings of {model.name} {model.version} for every image of the "
                                  f"study", created=created)

    sr = build_sr(sources, results, model, identity, heatmaps=heatmaps, summary=[summary], predecessor=predecessor,
                  created=created, concept_overrides=concept_overrides)
    return ResultObjects(identity=identity, sr=sr, heatmaps=heatmaps, summary=summary, heatmap_ids=heatmap_ids,
                         presentation_states=presentation_states, presentation_state_ids=pr_ids)


def _heatmaps(sources: Sequence[Dataset], results: Sequence[ImageResult], model: ModelInfo,
              displays: Mapping[str, Displayed] | None, labels: Sequence[str], max_side: int = sc_enum.MAX_SIDE):
    """(dataset, result, the decode shown, the heatmap capture's pixels) of each processed image of a study,
    in order (``sources`` and ``results`` aligned); the captures' long side at most ``max_side``."""
    for number, (ds, result) in enumerate(zip(sources, results), 1):
        if not result.processed:
            continue
        if (int(ds.Rows), int(ds.Columns)) != (int(result.rows), int(result.columns)):
            raise EncodingError(f"result for image {number} is {result.columns}x{result.rows}, "
                                f"the image is {ds.Columns}x{ds.Rows}")
        try:
            shown = capture_display(ds, (displays or {}).get(str(ds.SOPInstanceUID)), max_side)
        except ImageNotProcessable as exc:
            raise EncodingError(f"image {number} was processed but cannot be displayed: {exc.reason}") from exc
        pixels = sc_content.render_heatmap(shown.image, result, model,
                                           title=f"image {number} of {len(sources)} ({labels[number - 1]})",
                                           max_side=max_side)
        yield ds, result, shown, pixels


def render_heatmaps(source_datasets: Sequence[Dataset], results: Sequence[ImageResult], model: ModelInfo, *,
                    displays: Mapping[str, Displayed] | None = None, max_side: int = sc_enum.MAX_SIDE
                    ) -> dict[str, np.ndarray]:
    """The pixels of the heatmap captures :func:`build_result_objects` would make for this study (by source
    SOP Instance UID), without building any object: ``dicom-node infer``'s heatmap PNGs. ``max_side``: their
    long side at most (MAX_SIDE: the captures themselves; less: a preview, rendered from a smaller decode).
    Raises :class:`EncodingError`."""
    pairs = align(source_datasets, results)
    sources = [p[0] for p in pairs]
    _check_one_study(sources)
    labels = [image_label(ds) for ds in sources]
    return {str(ds.SOPInstanceUID): pixels
            for ds, _, _, pixels in _heatmaps(sources, [p[1] for p in pairs], model, displays, labels, max_side)}


def capture_display(ds: Dataset, decoded: Displayed | None = None, max_side: int = sc_enum.MAX_SIDE) -> Displayed:
    """The image of ``ds`` as its heatmap capture (long side at most ``max_side``) and presentation state show
    it: ``decoded`` when it is the full image or a reduced decode at least as large as the capture needs, else
    one decode at the smallest resolution that gives the capture its size.
    Raises :class:`~inference.errors.ImageNotProcessable`."""
    from inference.pixels import displayed

    rows, columns = int(ds.Rows), int(ds.Columns)
    need = sc_content.capture_side(rows, columns, max_side)
    if decoded is not None and (decoded.image.shape == (rows, columns) or max(decoded.image.shape) >= need):
        return decoded
    return displayed(ds, need)


def _write(ds: Dataset, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def output_names(objs: ResultObjects) -> list[str]:
    """File names (from derived ids, never from UIDs) in the order of :meth:`ResultObjects.datasets`."""
    ident = objs.identity
    return ([f"summary_{ident.file_id('summary')}.dcm"]
            + [f"heatmap_{i}.dcm" for i in objs.heatmap_ids]
            + [f"gsps_{i}.dcm" for i in objs.presentation_state_ids]
            + [f"sr_{ident.file_id('sr')}.dcm"])


def write_result_objects(objs: ResultObjects, out_dir: Path | str) -> list[Path]:
    """Write the objects as DICOM Part 10 files into ``out_dir`` (created); returns the paths.

    Writing the same results again overwrites the same files (names derive from the identity).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds, name in zip(objs.datasets(), output_names(objs)):
        path = out / name
        _write(ds, path)
        paths.append(path)
    return paths


def write_results_for_files(pairs: Sequence[tuple[Path | str, ImageResult]], model: ModelInfo, out_dir: Path | str,
                            *, card=None, result_version: int = 1) -> tuple[list[Path], list[str]]:
    """Results of DICOM files -> SR, heatmaps, summary and presentation states per study, through the stages of
    :mod:`dicom_node.stages` (load, encode, write), as ``dicom-node infer --dicom-out`` does.

    ``pairs`` are (DICOM file, its result). Files are grouped by study (re-read here, so the caller
    need not keep the datasets); each study's objects go into ``out_dir/<study id>/`` (an id derived
    from the Study Instance UID). A file repeating a SOP Instance UID already seen is skipped, and so
    is a file the node would not read (its SOP class or modality). Returns (paths written, one
    message per study or file that could not be encoded).
    """
    from dicom_node import stages
    from dicom_node.identity import derive_id

    log = logging.getLogger("dicom_node.results")
    studies: dict[str, list[tuple[stages.LoadedImage, ImageResult]]] = {}
    seen: set[str] = set()
    errors: list[str] = []
    for path, result in pairs:
        image = stages.load_file(path)
        if image.ds is None or not str(image.ds.get("StudyInstanceUID", "") or "") \
                or not str(image.ds.get("SOPInstanceUID", "") or ""):
            errors.append(f"{path}: not encoded as DICOM ({image.reason or 'no Study or SOP Instance UID'})")
            continue
        study, sop = str(image.ds.StudyInstanceUID), str(image.ds.SOPInstanceUID)
        if sop in seen:
            errors.append(f"{path}: skipped, SOP Instance UID already given by another file")
            continue
        seen.add(sop)
        studies.setdefault(study, []).append((image, result))
    written: list[Path] = []
    for study, items in studies.items():
        try:
            objs = stages.encode([im for im, _ in items], [r for _, r in items], model, card=card,
                                 result_version=result_version)
            written += stages.write_files(objs, Path(out_dir) / f"study_{derive_id('study', study, length=16)}")
        except EncodingError as exc:
            log.error("study %s: results not encoded: %s", study, exc)
            errors.append(f"study {study}: results not encoded: {exc}")
    return written, errors


__all__ = ["ResultObjects", "build_result_objects", "render_heatmaps", "capture_display", "write_result_objects",
           "write_results_for_files", "align", "output_names", "card_concepts", "predecessor_reference"]

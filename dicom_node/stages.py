"""The stages from a DICOM image to its result objects, shared by the node and ``dicom-node infer``.

Each stage is a function with declared inputs and outputs (as MONAI Deploy operators are):

========  ==============================================  ================================================
stage     input                                           output
========  ==============================================  ================================================
load      instance rows of the index, or files            :class:`LoadedImage` per image (with the reason
                                                          it cannot be processed: SOP class, modality,
                                                          unreadable file)
infer     loaded images, model, ``pipeline.batch_size``   one :class:`ImageResult` per image
route     images, results, ``routing``, calling AE        :class:`Routed`: results filtered to each rule's
                                                          heads, destinations per output kind
encode    images, results, model                          :class:`ResultObjects` (SR, heatmap SCs, summary,
                                                          presentation states)
write     result objects                                  :class:`EncodedObject` (Part 10 bytes) per object,
                                                          or files in a folder
========  ==============================================  ================================================

:class:`dicom_node.pipeline.Pipeline` composes them with the index calls (claim, skip, finish);
:mod:`dicom_node.cli_infer` composes them over files. Both therefore filter, route, encode and
render the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO

from dicom_node import header_clean, imagesize
from dicom_node.config import OUTPUT_KINDS, LimitsSection, RoutingRule, RoutingSection
from dicom_node.decoding import Decoded, DecoderPool, decode_image
from dicom_node.logs import describe_error
from dicom_node.results_dicom import (
    ResultObjects,
    build_result_objects,
    card_concepts,
    render_heatmaps,
    write_result_objects,
)
from dicom_node.routing import ImageFacts, apply_heads, destinations
from dicom_node.routing import route as route_rule
from dicom_node.sc.enum import MAX_SIDE
from dicom_node.sop import STORAGE_SOP_CLASSES
from inference.pixels import Displayed
from inference.results import ImageResult, ModelInfo
from inference.vocabulary import reads_modality

log = logging.getLogger("dicom_node.stages")

#: ``LoadedImage.reason_kind`` values
UNSUPPORTED = "unsupported SOP class"
ROUTING_RULE = "routing rule"
NOT_PROCESSABLE = "not processable"

#: the most pixels an image may declare when no configuration says otherwise (``infer`` without --config)
DEFAULT_MAX_PIXELS = LimitsSection().max_image_pixels


# -- load ------------------------------------------------------------------------------------------------
@dataclass
class LoadedImage:
    """One image as the load stage hands it on.

    ``image_id`` names the image in its result (the SOP Instance UID for the node, the file for
    ``infer``); ``facts`` are what routing rules match on; ``ds`` is the dataset (pixel data
    included), None when the image is not loaded; ``reason`` says why the image cannot be
    processed (None: it can), ``reason_kind`` is one of :data:`UNSUPPORTED`, :data:`ROUTING_RULE`,
    :data:`NOT_PROCESSABLE`. ``row`` is the index row it came from (the node), ``source`` its file.
    ``decoded``: its decode by the infer stage, which the encode stage renders the capture from.
    """

    image_id: str
    facts: ImageFacts
    ds: Dataset | None
    reason: str | None = None
    reason_kind: str | None = None
    rows: int = 0
    columns: int = 0
    row: dict | None = None
    source: Path | None = None
    decoded: Decoded | None = None

    @property
    def processable(self) -> bool:
        return self.ds is not None and self.reason is None


def unsupported_reason(sop_class_uid: str, modality: str) -> str | None:
    """Why an image of this SOP class and modality is not read by the model (None: it is)."""
    if sop_class_uid not in STORAGE_SOP_CLASSES or not reads_modality(modality):
        return f"unsupported SOP class or modality ({modality or sop_class_uid})"
    return None


def _too_large(ds: Dataset, max_pixels: int | None) -> str | None:
    """Why this image is not decoded (its declared size, dicom_node.imagesize), or None."""
    if max_pixels is None or "PixelData" not in ds:
        return None
    try:
        imagesize.check(ds, str(ds.file_meta.get("TransferSyntaxUID", "")), max_pixels)
    except imagesize.DeclaredSizeError as exc:
        return f"not decoded: {exc}"
    return None


def load_instances(rows: Sequence[Mapping], abspath: Callable[[str], Path | str],
                   calling_ae: str = "", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[LoadedImage]:
    """Instance rows of a study (the index's columns, ``file_path`` relative to the store, resolved by
    ``abspath``) -> loaded images. Only images the model reads are read from disk; an image that declares
    more than ``max_pixels`` (or a codestream of another size) is reported, never decoded."""
    images = []
    for row in rows:
        facts = ImageFacts(calling_ae, row["Modality"] or "", row["BodyPartExamined"] or "",
                           row["ViewPosition"] or "", row["SOPClassUID"])
        image = LoadedImage(row["SOPInstanceUID"], facts, None, rows=int(row.get("Rows") or 0),
                            columns=int(row.get("Columns") or 0), row=dict(row))
        reason = unsupported_reason(row["SOPClassUID"], row["Modality"] or "")
        if reason is not None:
            image.reason, image.reason_kind = reason, UNSUPPORTED
        else:
            try:
                image.ds = pydicom.dcmread(abspath(row["file_path"]))
            except Exception as exc:
                image.reason, image.reason_kind = f"stored file cannot be read: {describe_error(exc)}", NOT_PROCESSABLE
            else:
                too_large = _too_large(image.ds, max_pixels)
                if too_large is not None:
                    image.ds, image.reason, image.reason_kind = None, too_large, NOT_PROCESSABLE
        images.append(image)
    return images


def load_file(path: Path | str, image_id: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
              ) -> LoadedImage:
    """A DICOM file -> a loaded image (``image_id`` defaults to the path), with the same SOP class and
    modality filter as :func:`load_instances` (an image the model does not read is not kept); an
    unreadable file is reported, not raised."""
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    image_id = str(path) if image_id is None else image_id
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        return LoadedImage(image_id, ImageFacts("", "", "", "", ""), None, f"not a readable DICOM file: {exc}",
                           NOT_PROCESSABLE, source=path)
    sop_class = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "")
    facts = ImageFacts("", modality, str(ds.get("BodyPartExamined", "") or ""),
                       str(ds.get("ViewPosition", "") or ""), sop_class)
    image = LoadedImage(image_id, facts, ds, rows=int(ds.get("Rows", 0) or 0),
                        columns=int(ds.get("Columns", 0) or 0), source=path)
    reason = unsupported_reason(sop_class, modality)
    if reason is not None:  # as in the node: an image the model does not read is not in the results
        image.ds, image.reason, image.reason_kind = None, reason, UNSUPPORTED
    elif (too_large := _too_large(ds, max_pixels)) is not None:
        image.ds, image.reason, image.reason_kind = None, too_large, NOT_PROCESSABLE
    return image


# -- infer -----------------------------------------------------------------------------------------------
def infer(model, images: Sequence[LoadedImage], batch_size: int, heads: set[str] | None = None,
          decoder: DecoderPool | None = None, captures: bool = True, capture_max_side: int = MAX_SIDE
          ) -> list[ImageResult]:
    """One result per image, parallel to ``images``; an image that cannot be processed gets a
    not-processed result with its reason. The model sees at most ``batch_size`` images at a time
    (``pipeline.batch_size``: the images of one forward pass); ``decoder`` (``pipeline.decode_workers``
    threads; None: the calling thread) decodes the next batch while the model reads one.

    Each image is decoded at the smallest resolution that gives the model its input and, with
    ``captures``, its heatmap capture its size (long side at most ``capture_max_side``: MAX_SIDE for the
    captures the node sends, less for ``dicom-node infer``'s PNG preview) (:func:`dicom_node.decoding.decode_image`);
    the decode is kept on the image (``LoadedImage.decoded``), for the encode stage to render from."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    results: list[ImageResult | None] = [None] * len(images)
    todo = [i for i, im in enumerate(images) if im.processable]
    for i, im in enumerate(images):
        if not im.processable:
            results[i] = ImageResult.not_processed(im.image_id, im.reason or "not loaded", im.rows, im.columns)
    if hasattr(model, "batch_size"):
        model.batch_size = batch_size  # the model's own chunking: one forward pass per batch
    side = getattr(model, "decode_side", None)
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]

    def decode(i: int) -> Decoded:
        return decode_image(images[i].ds, side, captures, capture_max_side)

    pool = decoder if decoder is not None else DecoderPool(0)
    for batch, decoded in zip(batches, pool.batches(decode, batches)):
        for i, d in zip(batch, decoded):
            images[i].decoded = d
        predicted = model.predict_datasets([images[i].ds for i in batch], [images[i].image_id for i in batch], heads,
                                           decoded=[d.model.image if isinstance(d.model, Displayed) else d.model
                                                    for d in decoded])
        for i, r in zip(batch, predicted, strict=True):
            results[i] = r
    return results  # type: ignore[return-value]


def predict_in_batches(model, predict: Callable[..., list[ImageResult]], inputs: Sequence, ids: Sequence[str],
                       batch_size: int, heads: set[str] | None = None) -> list[ImageResult]:
    """``predict(inputs, ids, heads)`` (the model's ``predict_datasets`` or ``predict_arrays``) over
    ``batch_size`` inputs at a time, which is also the model's forward-pass batch: at most one batch of
    images is decoded at once."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if hasattr(model, "batch_size"):
        model.batch_size = batch_size  # the model's own chunking: one forward pass per batch
    out: list[ImageResult] = []
    for start in range(0, len(inputs), batch_size):
        out += predict(list(inputs[start:start + batch_size]), list(ids[start:start + batch_size]), heads)
    return out


# -- route -----------------------------------------------------------------------------------------------
@dataclass
class Routed:
    """The route stage's output: ``images`` and ``results`` (parallel) with each image's rule applied
    (a skipping rule or a not-processed result gives the image its reason), the rules of the
    processed images, and the destinations of each output kind (their union)."""

    images: list[LoadedImage]
    results: list[ImageResult]
    rules: list[RoutingRule]
    destinations: dict[str, tuple[str, ...]] = field(default_factory=lambda: {k: () for k in OUTPUT_KINDS})
    #: where a study none of whose images the model could read still gets its report (the SR and the summary
    #: capture, saying why): the ``sr`` and ``summary`` destinations of the rules of its radiographs that
    #: were loaded but declined (outside the model's domain) or could not be decoded; empty if there are none
    report_destinations: dict[str, tuple[str, ...]] = field(default_factory=lambda: {k: () for k in OUTPUT_KINDS})

    @property
    def processed(self) -> list[LoadedImage]:
        return [im for im, r in zip(self.images, self.results) if r.processed]


def route(images: Sequence[LoadedImage], results: Sequence[ImageResult], routing: RoutingSection,
          calling_ae: str = "") -> Routed:
    """Apply the first matching routing rule (else ``routing.default``) to each loaded image's result."""
    out_images, out_results, rules, declined_rules = [], [], [], []
    for im, r in zip(images, results, strict=True):
        if im.ds is None:  # not loaded: its reason stands
            out_images.append(im)
            out_results.append(r)
            continue
        anatomy = r.anatomy.label if r.processed and r.anatomy and not r.anatomy.uncertain else None
        rule = route_rule(routing, im.facts, anatomy)
        if rule.skip:
            reason = f"routing rule {rule.name!r}"
            r = ImageResult.not_processed(r.image_id, reason, r.rows, r.columns)
            im = replace(im, reason=reason, reason_kind=ROUTING_RULE)
        else:
            r = apply_heads(rule, r)
            if r.processed:
                rules.append(rule)
            else:
                im = replace(im, reason=r.reason, reason_kind=NOT_PROCESSABLE)
                declined_rules.append(rule)
        out_images.append(im)
        out_results.append(r)
    report = destinations(declined_rules, calling_ae)
    report = {k: (v if k in REPORT_KINDS else ()) for k, v in report.items()}
    return Routed(out_images, out_results, rules, destinations(rules, calling_ae), report)


#: the outputs a study with no processed image still gets: the documents that say why (no maps to show)
REPORT_KINDS = ("sr", "summary")


def skip_reason(images: Sequence[LoadedImage]) -> str:
    """Why a study none of whose images was processed is skipped: the kind, then the reasons."""
    kinds = {im.reason_kind for im in images}
    reason = (UNSUPPORTED if kinds == {UNSUPPORTED} else ROUTING_RULE if kinds == {ROUTING_RULE}
              else "no processable image")
    detail = "; ".join(sorted({im.reason for im in images if im.reason}))[:500]
    return f"{reason}: {detail}" if detail else reason


# -- encode ----------------------------------------------------------------------------------------------
def _study_pairs(images: Sequence[LoadedImage], results: Sequence[ImageResult]
                 ) -> tuple[list[tuple[Dataset, ImageResult]], dict[str, Displayed]]:
    """The (dataset, result) pairs a study's result objects are made of, and the decodes kept for them."""
    pairs = [(im.ds, replace(r, image_id=str(im.ds.SOPInstanceUID)) if r.image_id != im.ds.get("SOPInstanceUID")
              else r) for im, r in zip(images, results, strict=True) if im.ds is not None]
    # a bad value in a copied attribute is emptied, not fatal; an image naming another patient is left out
    pairs = [(header_clean.clean(ds, f"image {i}"), r) for i, (ds, r) in enumerate(pairs, 1)]
    keep, other = header_clean.one_patient([ds for ds, _ in pairs])
    for i in other:
        log.warning("image %d names another patient than the study's first image; left out of the study's "
                    "results", i + 1)
    displays = {str(im.ds.SOPInstanceUID): shown for im in images
                if im.ds is not None and im.decoded is not None and (shown := im.decoded.for_capture()) is not None}
    return [pairs[i] for i in keep], displays


def heatmaps_only(images: Sequence[LoadedImage], results: Sequence[ImageResult], model: ModelInfo,
                  max_side: int = MAX_SIDE) -> dict[str, np.ndarray]:
    """The pixels of the heatmap captures :func:`encode` would make (by SOP Instance UID), their long side at
    most ``max_side``, without building the SR, the captures as DICOM or the presentation states
    (``dicom-node infer``'s PNGs). Raises :class:`~dicom_node.errors.EncodingError`."""
    pairs, displays = _study_pairs(images, results)
    return render_heatmaps([d for d, _ in pairs], [r for _, r in pairs], model, displays=displays,
                           max_side=max_side)


def encode(images: Sequence[LoadedImage], results: Sequence[ImageResult], model: ModelInfo, *, card=None,
           result_version: int = 1, predecessor: Dataset | None = None) -> ResultObjects:
    """SR, heatmap SCs, summary SC and presentation states of one study: every loaded image (``ds`` not None) is in the
    summary and the SR, processed or not. ``card`` (the bundle's) supplies the coded concepts.
    Raises :class:`~dicom_node.errors.EncodingError`."""
    pairs, displays = _study_pairs(images, results)
    return build_result_objects([d for d, _ in pairs], [r for _, r in pairs], model, result_version=result_version,
                                predecessor=predecessor,
                                concept_overrides=card_concepts(card) if card is not None else None,
                                displays=displays)


def heatmap_pixels(objs: ResultObjects, image: LoadedImage) -> np.ndarray | None:
    """The pixels of the heatmap SC made for ``image`` (RGB uint8), None if it has none."""
    if image.ds is None:
        return None
    uid = objs.identity.heatmap_uid(str(image.ds.SOPInstanceUID))
    for hm in objs.heatmaps:
        if str(hm.SOPInstanceUID) == uid:
            return np.asarray(hm.pixel_array, dtype=np.uint8)
    return None


# -- write -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncodedObject:
    """One result object as DICOM Part 10 bytes, with the output kind that decides where it goes."""

    kind: str  # "summary" | "heatmap" | "gsps" | "sr"
    dataset: Dataset
    data: bytes


def to_part10(objs: ResultObjects) -> list[EncodedObject]:
    """Result objects -> Part 10 bytes, in the order to send them (captures first, then the presentation
    states, the SR last)."""
    out = []
    for kind, ds in zip(objs.kinds(), objs.datasets(), strict=True):
        buf = DicomBytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(EncodedObject(kind, ds, buf.getvalue()))
    return out


#: output kind of each object kind (``routing`` outputs are named per kind of object)
OUTPUT_OF = {"summary": "summary", "heatmap": "heatmaps", "gsps": "gsps", "sr": "sr"}


def write_files(objs: ResultObjects, out_dir: Path | str) -> list[Path]:
    """Result objects -> Part 10 files in ``out_dir`` (names derived from the identity, never from UIDs)."""
    return write_result_objects(objs, out_dir)


__all__ = ["LoadedImage", "Routed", "EncodedObject", "load_instances", "load_file", "unsupported_reason", "infer",
           "predict_in_batches", "route", "skip_reason", "encode", "heatmaps_only", "heatmap_pixels", "to_part10",
           "write_files", "OUTPUT_OF", "REPORT_KINDS", "UNSUPPORTED", "ROUTING_RULE", "NOT_PROCESSABLE"]

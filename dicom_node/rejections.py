"""Superseded results at the destinations: IHE IOCM rejection notes, through the send queue.

A re-run of a study (late images) makes a new result version; storage marks the older objects
``superseded`` and cancels what of them was not sent yet. What a destination already holds stays
there unless its ``superseded_results`` setting (``peers[].superseded_results``, default
``sending.superseded_results``) is ``reject``: then, once every object of the new version routed
to that destination is delivered, the node makes one rejection note for it (a Key Object
Selection Document, :mod:`dicom_node.ko`) that lists exactly the older objects delivered there,
writes it to the result store (its file named from a hash) and queues it like any result object:
retried, recovered after a crash with a C-FIND, sent once. A PACS with IOCM then hides or deletes
the listed objects; one without IOCM stores the note as an instance among the others.

The sender calls :func:`queue_rejection_notes` after the batches it delivered (and once over the
whole index when it starts, so that nothing waits on a restart).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pydicom
from pydicom.filebase import DicomBytesIO

from dicom_node.config import Config
from dicom_node.errors import EncodingError
from dicom_node.identity import rejection_note_uids
from dicom_node.ko import build_rejection_note
from storage.deliveries import DeliveryQueue, RejectionDue
from storage.files import InstanceStore

log = logging.getLogger("dicom_node.rejections")


def rejects(cfg: Config, destination: str) -> bool:
    """Whether ``destination`` is sent rejection notes for the superseded results it holds."""
    peer = cfg.peer(destination)
    setting = peer.superseded_results if peer is not None else None
    return (setting or cfg.sending.superseded_results) == "reject"


def any_rejects(cfg: Config) -> bool:
    return cfg.sending.superseded_results == "reject" or any(p.superseded_results == "reject" for p in cfg.peers)


def encode_rejection_note(due: RejectionDue, store: InstanceStore) -> tuple[pydicom.Dataset, bytes]:
    """The note of ``due`` (validated at construction) and its Part 10 bytes. The rejected objects'
    headers are read from the store: they give the note its patient and study, and say which are
    images. Raises :class:`EncodingError`."""
    headers = []
    for it in due.rejected:
        try:
            headers.append(pydicom.dcmread(store.abspath(it.file_path), stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001
            raise EncodingError(f"the {it.kind} object of v{it.result_version} cannot be read: "
                                f"{type(exc).__name__}: {exc}") from exc
    series_uid, sop_uid = rejection_note_uids(due.superseding_sr_uid, due.destination)
    manufacturer = str(headers[0].get("Manufacturer", "") or "")
    doc = build_rejection_note(headers, rejected_versions=[it.result_version for it in due.rejected],
                               superseding_version=due.result_version, series_instance_uid=series_uid,
                               sop_instance_uid=sop_uid, manufacturer=manufacturer)
    buf = DicomBytesIO()
    doc.save_as(buf, enforce_file_format=True)
    return doc, buf.getvalue()


def queue_rejection_notes(cfg: Config, queue: DeliveryQueue, store: InstanceStore,
                          study_ids: Iterable[int] | None = None) -> int:
    """Make and queue the rejection notes due now (of ``study_ids``, or every study), for the
    destinations that reject superseded results. Returns how many were queued. A note that cannot
    be made is logged and tried again at the next call; nothing is queued for it."""
    if not any_rejects(cfg):
        return 0
    queued = 0
    for due in queue.rejections_due(study_ids):
        if not rejects(cfg, due.destination):
            continue
        try:
            doc, data = encode_rejection_note(due, store)
        except EncodingError as exc:
            log.error("study %s to %s: rejection note of the results superseded by v%d not made: %s",
                      due.StudyInstanceUID, due.destination, due.result_version, exc)
            continue
        sop_uid = str(doc.SOPInstanceUID)
        rel = store.result_relpath(due.StudyInstanceUID, f"rejection:{sop_uid}")
        stored = store.write(rel, data)
        if queue.queue_rejection(due, SOPInstanceUID=sop_uid, SOPClassUID=str(doc.SOPClassUID),
                                 SeriesInstanceUID=str(doc.SeriesInstanceUID),
                                 TransferSyntaxUID=str(doc.file_meta.TransferSyntaxUID), file_path=rel,
                                 file_size=stored.size):
            queued += 1
            versions = sorted({it.result_version for it in due.rejected})
            log.info("study %s to %s: rejection note queued for %d object(s) of %s (superseded by v%d)",
                     due.StudyInstanceUID, due.destination, len(due.rejected),
                     ", ".join(f"v{v}" for v in versions), due.result_version)
    return queued

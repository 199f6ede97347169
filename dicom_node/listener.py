"""The C-ECHO / C-STORE service class provider.

The C-STORE handler only persists and records: it checks the dataset, writes
the bytes as they arrived (durably), records the instance in the index in one
transaction, tells the tracker, and only then answers success. Every error
becomes a DICOM status (0xA700 out of resources, 0xA900 mismatch, 0xC210
cannot understand) and a log line; the association and the node go on.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from dicom_node import edge, imagesize, tls
from dicom_node.audit import AUDIT
from dicom_node.config import Config
from dicom_node.connections import ConnectionBudget, normalise_address
from dicom_node.connections import start_server as start_node_server
from dicom_node.errors import EXPECTED_ERRORS, DatasetMismatch, ImageTooLarge, InvalidDataset, dicom_status_for
from dicom_node.logs import describe_error
from dicom_node.metrics import METRICS
from dicom_node.sop import NATIVE_SYNTAXES, STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from storage.errors import PatientConflict
from storage.files import InstanceStore
from storage.index import Index, InstanceMeta

if TYPE_CHECKING:
    from pynetdicom.events import EventHandlerType
    from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger("dicom_node.listener")

_SUPPORTED_TS = frozenset(TRANSFER_SYNTAXES)
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID.match(value))


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        v = ds.get(keyword)
        return int(v) if v is not None and v != "" else None
    except (TypeError, ValueError):
        return None


def instance_meta(ds: Dataset, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                  max_pixels: int | None = None) -> InstanceMeta:
    """Check a received dataset and take the attributes the index keeps.

    ``sop_class_uid``/``sop_instance_uid`` are those of the C-STORE request
    (Affected SOP Class/Instance UID); ``transfer_syntax`` the context's; ``max_pixels`` the most
    pixels an image may declare (``limits.max_image_megapixels``; None: no limit).
    Raises :class:`InvalidDataset` (0xC210), :class:`ImageTooLarge` (0xC210) or :class:`DatasetMismatch` (0xA900).
    """
    try:
        uids = {k: ds.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
    except Exception as exc:  # pydicom raises many kinds on garbage
        raise InvalidDataset(f"dataset cannot be parsed: {describe_error(exc)}") from None
    for k, v in uids.items():
        if v is None or v == "":
            raise InvalidDataset(f"{k} is missing")
        if not valid_uid(str(v)):
            raise InvalidDataset(f"{k} is not a valid UID")
    if str(uids["SOPClassUID"]) != sop_class_uid:
        raise DatasetMismatch("SOPClassUID differs from the Affected SOP Class UID of the request")
    if str(uids["SOPInstanceUID"]) != sop_instance_uid:
        raise InvalidDataset("SOPInstanceUID differs from the Affected SOP Instance UID of the request")
    _check_pixel_data(ds, transfer_syntax)
    if max_pixels is not None:
        try:
            imagesize.check(ds, transfer_syntax, max_pixels)
        except imagesize.DeclaredSizeError as exc:
            raise ImageTooLarge(f"refused before decoding: {exc}") from None

    laterality = _text(ds, "ImageLaterality") or _text(ds, "Laterality")
    return InstanceMeta(
        SOPInstanceUID=str(uids["SOPInstanceUID"]), SOPClassUID=sop_class_uid,
        StudyInstanceUID=str(uids["StudyInstanceUID"]), SeriesInstanceUID=str(uids["SeriesInstanceUID"]),
        TransferSyntaxUID=transfer_syntax,
        PatientID=_text(ds, "PatientID"), IssuerOfPatientID=_text(ds, "IssuerOfPatientID"),
        PatientName=_text(ds, "PatientName"), PatientBirthDate=_text(ds, "PatientBirthDate"),
        PatientSex=_text(ds, "PatientSex"), StudyDate=_text(ds, "StudyDate"), StudyTime=_text(ds, "StudyTime"),
        AccessionNumber=_text(ds, "AccessionNumber"), StudyDescription=_text(ds, "StudyDescription"),
        SeriesNumber=_text(ds, "SeriesNumber"), SeriesDescription=_text(ds, "SeriesDescription"),
        Modality=_text(ds, "Modality"), BodyPartExamined=_text(ds, "BodyPartExamined"),
        ViewPosition=_text(ds, "ViewPosition"), Laterality=laterality,
        InstanceNumber=_text(ds, "InstanceNumber"),
        PhotometricInterpretation=_text(ds, "PhotometricInterpretation"),
        Rows=_int(ds, "Rows"), Columns=_int(ds, "Columns"),
    )


def _check_pixel_data(ds: Dataset, transfer_syntax: str) -> None:
    """Image SOP classes need whole pixel data: a truncated stream is refused, not stored."""
    if "PixelData" not in ds:
        raise InvalidDataset("Pixel Data is missing (truncated or empty dataset)")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    bits = _int(ds, "BitsAllocated")
    if not rows or not cols or not bits:
        raise InvalidDataset("Rows, Columns or Bits Allocated is missing")
    if transfer_syntax in NATIVE_SYNTAXES:
        spp = _int(ds, "SamplesPerPixel") or 1
        frames = _int(ds, "NumberOfFrames") or 1
        expected = (rows * cols * spp * frames * bits + 7) // 8
        got = len(ds["PixelData"].value or b"")
        if got < expected:
            raise InvalidDataset(f"Pixel Data holds {got} bytes, {expected} expected (truncated)")
    else:
        value = ds["PixelData"].value
        if not value or len(value) < 8 or value[:4] != b"\xfe\xff\x00\xe0":
            raise InvalidDataset("encapsulated Pixel Data has no Basic Offset Table item (truncated or corrupt)")


def _status(status: int, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (0000,0902): LO, 64 characters, printable ASCII."""
    ds = Dataset()
    ds.Status = status
    text = "".join(c if " " <= c <= "~" and c != "\\" else " " for c in comment)
    ds.ErrorComment = text[:61] + "..." if len(text) > 64 else text
    return ds


@dataclass
class _AssocStats:
    calling_ae: str
    address: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    failed: int = 0
    resent: int = 0
    bytes: int = 0
    studies: dict[str, dict[str, int]] = field(default_factory=dict)  # study UID -> SOP class -> instances


def _resolve(host: str) -> set[str]:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        log.warning("peer host %s does not resolve; that peer cannot connect", host)
        return set()
    # AF_INET/AF_INET6 results: the address is a non-empty str, so normalise_address gives a str
    return {cast(str, normalise_address(cast(str, i[4][0]))) for i in infos}


class Listener:
    """The node's DICOM front door."""

    def __init__(self, cfg: Config, store: InstanceStore, index: Index, on_recorded=None):
        self.cfg = cfg
        self.store = store
        self.index = index
        self.on_recorded = on_recorded  # called with a RecordOutcome after each committed instance
        self.quiet = cfg.study.quiet_seconds
        self._stats: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        self.server: ThreadedAssociationServer | None = None
        lim = cfg.limits
        self.budget = ConnectionBudget(cfg.node.max_associations, lim.max_pending_connections,
                                       lim.max_pending_per_address, lim.associate_seconds)
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        # calling AE title -> addresses it may connect from (None: any); checked on EVT_REQUESTED
        self._peers = {p.ae_title: (_resolve(p.host) if p.host else None) for p in self.cfg.peers}
        ae = AE(self.cfg.node.ae_title)
        ae.require_called_aet = True
        # node.max_associations is enforced by the ConnectionBudget on A-ASSOCIATE-RQ, where only associations
        # count; pynetdicom counts every accepted socket, so its own limit only has to stay out of the way
        lim = self.cfg.limits
        ae.maximum_associations = self.cfg.node.max_associations + 2 * lim.max_pending_connections + 16
        # the largest P-DATA PDU a peer may send (dicom_node.edge refuses larger ones unread)
        ae.maximum_pdu_size = self.cfg.limits.max_pdu_bytes
        edge.install(edge.Limits(self.cfg.limits.max_associate_rq_bytes, self.cfg.limits.max_pdu_bytes,
                                 self.cfg.limits.pdu_seconds, self.cfg.limits.max_dataset_mb << 20))
        ae.network_timeout = lim.idle_seconds  # an association with no PDU this long is aborted
        # how long an acceptor thread waits for an A-ASSOCIATE-RQ: a backstop; the budget closes them first
        ae.acse_timeout = lim.associate_seconds + 5
        ae.dimse_timeout = 60
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        return ae

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        address = (self.cfg.node.bind, self.cfg.node.port)
        # TLS only on node.port when enabled, its handshake out of the accept loop
        ctx = tls.server_context(self.cfg.node.tls) if self.cfg.node.tls.enabled else None
        self.server = start_node_server(self.ae, address, ctx, handlers, self.budget)
        log.info("listening as %s on %s:%d%s (%d peer(s) allowed)", self.cfg.node.ae_title, self.cfg.node.bind,
                 self.cfg.node.port, " (DICOM TLS)" if self.cfg.node.tls.enabled else "", len(self.cfg.peers))

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.budget.stop()

    # -- events --------------------------------------------------------------
    def _on_conn_open(self, event) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        self.budget.opened(id(event.assoc), sock)

    def _on_conn_close(self, event) -> None:
        self.budget.closed(id(event.assoc))

    def _on_requested(self, event) -> None:
        """A-ASSOCIATE-RQ received: admit only configured peers, then prefer the caller's own syntaxes.

        pynetdicom negotiates in the acceptor's order of transfer syntaxes; to store
        what arrives as it arrived, each association gets contexts ordered as the
        requestor proposed them (a sender lists its file's own syntax first).
        """
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = str(rq.calling_ae_title).strip()
        address = normalise_address(assoc.requestor.address)
        self.budget.requested(id(assoc))
        if calling not in self._peers:
            log.warning("association rejected: calling AE %r from %s is not a configured peer", calling, address)
            self._refused(calling, address, "calling AE title is not a configured peer")
            self._reject(assoc)
            return
        hosts = self._peers[calling]
        if hosts is not None and address not in hosts:
            log.warning("association rejected: calling AE %r connected from %s, not from its configured host",
                        calling, address)
            self._refused(calling, address, "connected from another address than the peer's configured host")
            self._reject(assoc)
            return
        if not self.budget.request(id(assoc)):
            log.warning("association rejected: calling AE %r from %s: no capacity (node.max_associations = %d "
                        "in use); the peer may try again", calling, address, self.cfg.node.max_associations)
            self._refused(calling, address, f"no capacity (node.max_associations = {self.cfg.node.max_associations} "
                          "in use)")
            assoc.acse.send_reject(0x02, 0x03, 0x02)  # rejected-transient, service provider (presentation), local
            assoc.kill()  # limit exceeded
            return
        order: dict[str, list[str]] = {}
        for cx in rq.presentation_context_definition_list:
            if cx.abstract_syntax in STORAGE_SOP_CLASSES:
                lst = order.setdefault(cx.abstract_syntax, [])
                lst.extend(ts for ts in cx.transfer_syntax if ts in _SUPPORTED_TS and ts not in lst)
        contexts = [build_context(Verification)]
        for sop_class in STORAGE_SOP_CLASSES:
            preferred = order.get(sop_class, [])
            contexts.append(build_context(sop_class, preferred + [t for t in TRANSFER_SYNTAXES
                                                                  if t not in preferred]))
        assoc.acceptor.supported_contexts = contexts

    @staticmethod
    def _refused(calling: str, address: str | None, why: str) -> None:
        METRICS.associations.labels("rejected", METRICS.ae(calling)).inc()
        AUDIT.refused(calling, address, why)

    @staticmethod
    def _reject(assoc) -> None:
        """A-ASSOCIATE-RJ: rejected-permanent, service user, calling AE title not recognised."""
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        assoc.kill()  # as pynetdicom does after its own rejections: lets the DUL send the PDU and stop

    def _on_accepted(self, event) -> None:
        req = event.assoc.requestor
        with self._lock:
            self._stats[id(event.assoc)] = _AssocStats(req.ae_title, f"{req.address}:{req.port}")
        METRICS.associations.labels("accepted", METRICS.ae(req.ae_title)).inc()
        AUDIT.association(True, str(req.ae_title).strip(), normalise_address(req.address))

    def _on_rejected(self, event) -> None:
        req = event.assoc.requestor
        called = str(getattr(req.primitive, "called_ae_title", "") if req.primitive else "").strip()
        answer = event.assoc.acceptor.primitive
        source, diagnostic = getattr(answer, "result_source", None), getattr(answer, "diagnostic", None)
        if source == 0x03 and diagnostic == 0x02:
            why = f"pynetdicom's connection limit ({self.ae.maximum_associations} connections) reached"
        elif called != self.cfg.node.ae_title:
            why = f"called AE {called!r} is not {self.cfg.node.ae_title!r}"
        else:
            why = f"rejected by the association layer (source {source}, reason {diagnostic})"
        log.warning("association rejected: calling AE %r from %s: %s", req.ae_title, req.address, why)
        self._refused(str(req.ae_title).strip(), normalise_address(req.address), why)

    def _on_closed(self, event) -> None:
        self.budget.closed(id(event.assoc))
        with self._lock:
            st = self._stats.pop(id(event.assoc), None)
        if st is None:
            return
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        log.info("association %s: calling AE %s from %s, %d stored (%d re-sent), %d failed, %.1f MB in %.2f s",
                 how, st.calling_ae, st.address, st.stored, st.resent, st.failed, st.bytes / 1e6,
                 time.monotonic() - st.started)
        address = normalise_address(event.assoc.requestor.address)
        for study_uid, classes in st.studies.items():
            AUDIT.received(st.calling_ae.strip(), address, study_uid, sum(classes.values()), classes)
        AUDIT.association(False, st.calling_ae.strip(), address)

    def _on_echo(self, event) -> int:
        return 0x0000

    def _on_store(self, event) -> int | Dataset:
        st = self._stats.get(id(event.assoc))
        calling = event.assoc.requestor.ae_title
        comment = None
        try:
            status = self._store(event, calling)
        except EXPECTED_ERRORS as exc:
            status = dicom_status_for(exc)
            comment = str(exc)  # the node's own messages name keys, tags and sizes, never a value
            log.warning("C-STORE from %s refused with 0x%04X: %s", calling, status, exc)
        except Exception as exc:  # never let an error escape into pynetdicom's thread
            status = dicom_status_for(exc)
            # an unexpected error's text may quote a value: its type (and tag) only
            comment = describe_error(exc)
            log.error("C-STORE from %s failed with 0x%04X: %s", calling, status, comment)
        if st is not None:
            if status == 0x0000:
                st.stored += 1
            else:
                st.failed += 1
        METRICS.c_store.labels(f"0x{status:04X}", METRICS.ae(calling)).inc()
        if comment is None:
            return status
        return _status(status, comment)

    def _store(self, event, calling: str) -> int:
        request = event.request
        context = event.context
        sop_class = str(request.AffectedSOPClassUID)
        sop_instance = str(request.AffectedSOPInstanceUID)
        if not valid_uid(sop_instance):
            raise InvalidDataset("Affected SOP Instance UID is not a valid UID")
        self.store.check_space()
        try:
            ds = event.dataset
        except Exception as exc:
            raise InvalidDataset(f"dataset cannot be decoded: {describe_error(exc)}") from None
        meta = instance_meta(ds, sop_class, sop_instance, str(context.transfer_syntax),
                             self.cfg.limits.max_image_pixels)
        data = event.encoded_dataset()
        if self.index.patient_conflict(meta):
            raise PatientConflict("the study belongs to another patient than this instance names")
        rel = self.store.instance_relpath(meta.StudyInstanceUID, meta.SOPInstanceUID)
        stored = self.store.write(rel, data)
        try:
            outcome = self.index.record_instance(meta, rel, stored.size, calling, self.quiet)
        except PatientConflict:
            # refused: its file must not stay (unless it replaced an indexed copy of the same instance)
            if not self.index.has_instance_file(rel):
                self.store.delete(rel)
            raise
        if outcome.obsolete_file:
            self.store.delete(outcome.obsolete_file)
        st = self._stats.get(id(event.assoc))
        METRICS.received_bytes.inc(stored.size)
        if st is not None:
            st.bytes += stored.size
            st.resent += int(outcome.resent)
            per_class = st.studies.setdefault(meta.StudyInstanceUID, {})
            per_class[sop_class] = per_class.get(sop_class, 0) + 1
        if outcome.event != "instance":
            log.info("study %s: %s (calling AE %s)", outcome.StudyInstanceUID,
                     "new study, receiving" if outcome.event == "new_study" else "late instance, receiving again",
                     calling)
        if outcome.resent:
            log.debug("instance re-sent; the earlier copy was replaced (study %s)", outcome.StudyInstanceUID)
        if self.on_recorded is not None:
            self.on_recorded(outcome)
        return 0x0000

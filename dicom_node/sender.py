"""The C-STORE sender: delivers the result objects of the send queue, exactly once.

One association per batch (one study's due objects to one destination),
proposing for each SOP class each object's own transfer syntax (and explicit VR
little endian). Per instance: ``mark_sending`` is committed, the C-STORE goes
out, then ``mark_sent`` (success or warning status) or ``mark_failed``
(backoff, dead letter after ``sending.max_attempts``).

Exactly once: a delivery in state ``sending`` has an unknown outcome (the node
crashed, or the response was lost). Before anything is sent again, the
destination is asked with a Study Root C-FIND at IMAGE level whether it holds
the instance: found -> ``sent`` without resending; not found -> ``pending``;
C-FIND not supported -> ``pending`` too (a repeat is then possible, and
logged: it carries the same deterministic SOP Instance UID, so it replaces).

Log lines name the destination and the StudyInstanceUID, never a patient.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
from collections import defaultdict

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from dicom_node import tls
from dicom_node.audit import AUDIT
from dicom_node.config import Config, Peer
from dicom_node.metrics import METRICS
from dicom_node.rejections import queue_rejection_notes
from storage.deliveries import Batch, DeliveryQueue, Item
from storage.files import InstanceStore
from storage.models import utcnow

log = logging.getLogger("dicom_node.sender")

#: C-STORE statuses after which the destination holds the instance
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB007, 0xB006})
_MAX_CONTEXTS = 126  # 128 presentation contexts at most; keep two for Verification / FIND
JOB_ID = "sender"


def describe_association_failure(assoc, peer: Peer, dest: str) -> str:
    where = f"{dest} at {peer.host}:{peer.port}"
    if peer.tls is not None and peer.tls.enabled:
        where += " (TLS)"
    rsp = getattr(assoc.acceptor, "primitive", None)
    if assoc.is_rejected:
        if rsp is not None:
            return (f"association rejected by {where} ({getattr(rsp, 'result_str', '?')}, "
                    f"{getattr(rsp, 'source_str', '?')}: {getattr(rsp, 'reason_str', '?')})")
        return f"association rejected by {where}"
    if rsp is not None and getattr(rsp, "result", None) == 0x00:
        return f"{where} accepted none of the proposed presentation contexts"
    tls_failure = " or TLS handshake failed" if peer.tls is not None and peer.tls.enabled else ""
    return (f"no association with {where} (connection refused, unreachable, aborted{tls_failure} or no answer "
            f"within the timeout)")


class Sender:
    """Sends due batches of the queue; ``start(scheduler)`` polls every ``sending.poll_seconds``."""

    def __init__(self, cfg: Config, store: InstanceStore, queue: DeliveryQueue):
        self.cfg = cfg
        self.store = store
        self.queue = queue
        self.policy = cfg.sending
        self.calling_ae = cfg.sending.calling_ae_title or cfg.node.ae_title
        self._pass_lock = threading.Lock()  # one pass at a time
        self._stopping = threading.Event()
        self._again = threading.Event()  # woken during a pass: run another one
        self._rejections_swept = False  # the first pass looks at every study for rejection notes due
        self._recovered: set[int] = set()  # studies with in-flight deliveries looked at in this pass
        self._scheduler = None
        self._tls: dict[str, tuple[ssl.SSLContext, str] | None] = {}  # destination -> AE.associate tls_args
        # this node's claim on the deliveries it has on the wire, and for how long (more than one
        # C-STORE may take): another node on the same database settles them only after the lease
        self.owner = f"{cfg.node_identity()}:sender"
        self.lease_seconds = 2 * cfg.sending.timeout_seconds + 30

    # -- lifecycle -------------------------------------------------------------
    def start(self, scheduler) -> None:
        """Poll the queue from ``scheduler`` (an APScheduler scheduler, started or not).

        The first pass (due at once) starts with the start-up recovery of deliveries a crash left in
        ``sending``; nothing is resent before the destination was asked.
        """
        self._stopping.clear()
        self._scheduler = scheduler
        scheduler.add_job(self._tick, "interval", seconds=self.policy.poll_seconds, id=JOB_ID,
                          replace_existing=True, max_instances=4, coalesce=True,
                          next_run_time=dt.datetime.now(dt.UTC))
        log.info("sender started: calling AE %s, polling every %.1f s", self.calling_ae, self.policy.poll_seconds)

    def stop(self, timeout: float | None = None) -> None:
        """Stop polling and wait (up to ``timeout``, default the association timeout) for a pass in
        progress to finish its current instance; what it did not start stays pending."""
        self._stopping.set()
        if self._scheduler is not None:
            try:
                self._scheduler.remove_job(JOB_ID)
            except Exception:  # already removed, or the scheduler is shut down
                pass
            self._scheduler = None
        wait = self.policy.timeout_seconds + 5 if timeout is None else timeout
        if self._pass_lock.acquire(timeout=wait):
            self._pass_lock.release()
        else:
            log.warning("sender: a pass is still running after %.0f s", wait)

    def wake(self) -> None:
        """Run a pass now (e.g. the pipeline just queued results) instead of at the next poll."""
        self._again.set()
        sched = self._scheduler
        if sched is not None and not self._stopping.is_set():
            try:
                sched.modify_job(JOB_ID, next_run_time=dt.datetime.now(dt.UTC))
            except Exception:
                pass

    def _tick(self) -> None:
        """The scheduler's job: never raises (the node must not crash because of the queue)."""
        if not self._pass_lock.acquire(blocking=False):
            self._again.set()
            return
        try:
            while not self._stopping.is_set():
                self._again.clear()
                self._pass()
                if not self._again.is_set():
                    break
        except Exception as exc:  # noqa: BLE001 - logged, retried at the next poll
            log.error("send queue pass failed: %s: %s", type(exc).__name__, exc)
        finally:
            self._pass_lock.release()

    # -- passes ----------------------------------------------------------------
    def run_once(self) -> int:
        """Recover in-flight deliveries, then send every due batch; returns the number of instances sent
        (stored at a destination, including those a C-FIND showed it already held)."""
        with self._pass_lock:
            return self._pass()

    def _pass(self) -> int:
        self._recovered.clear()
        if not self._rejections_swept:  # the first pass of this run
            mine = self.queue.release_in_flight(self.owner)  # left by this node's previous run: settle at once
            if mine:
                log.info("%d delivery(ies) this node left in flight when it stopped: asking the destination "
                         "first", mine)
        sent = self.recover(now=utcnow())
        if not self._rejections_swept:
            self._queue_rejection_notes(None)  # at start-up: the whole index
        elif self._recovered:
            self._queue_rejection_notes(set(self._recovered))  # a settled delivery may have been waited for
        unreachable: set[str] = set()  # no association in this pass: its other batches wait for the next
        delivered: set[int] = set()  # studies with something sent in this pass
        for batch in self.queue.due():  # after the recovery: what it re-queued is due now
            if self._stopping.is_set():
                break
            if batch.destination in unreachable:
                continue
            try:
                n, reachable = self._send_batch(batch)
                sent += n
                if n:
                    delivered.add(batch.study_id)
                if not reachable:
                    unreachable.add(batch.destination)
            except Exception as exc:  # noqa: BLE001 - one batch must not stop the others
                log.error("sending study %s to %s failed: %s: %s", batch.StudyInstanceUID, batch.destination,
                          type(exc).__name__, exc)
        if delivered and self._queue_rejection_notes(delivered):
            self._again.set()  # send them in the next pass, at once
        return sent

    def _queue_rejection_notes(self, study_ids: set[int] | None) -> int:
        """Rejection notes for superseded results (:mod:`dicom_node.rejections`); never raises."""
        try:
            n = queue_rejection_notes(self.cfg, self.queue, self.store, study_ids)
        except Exception as exc:  # noqa: BLE001 - tried again after the next delivery or recovery
            log.error("rejection notes not queued: %s: %s", type(exc).__name__, exc)
            return 0
        if study_ids is None:
            self._rejections_swept = True
        return n

    # -- peers -------------------------------------------------------------------
    def _peer(self, dest: str) -> tuple[Peer | None, str | None]:
        peer = self.cfg.peer(dest)
        if peer is None:
            return None, f"destination {dest!r} is not a configured peer"
        if peer.host is None or peer.port is None:
            return None, f"peer {dest!r} has no host and port to send to"
        return peer, None

    def _ae(self) -> AE:
        ae = AE(self.calling_ae)
        t = self.policy.timeout_seconds
        ae.acse_timeout = t
        ae.dimse_timeout = t
        ae.network_timeout = t
        ae.connection_timeout = t
        ae.maximum_pdu_size = 0
        return ae

    def _associate(self, peer: Peer, dest: str, contexts: list) -> Association:
        """An association with ``peer``, over DICOM TLS when ``peers[].tls.enabled`` (the handshake is part
        of connecting, within ``sending.timeout_seconds``; a failed one is a failed association)."""
        assert peer.host is not None and peer.port is not None
        tls_args = None
        if peer.tls is not None and peer.tls.enabled:
            if dest not in self._tls:  # contexts are built once per destination (the CA files are read once)
                self._tls[dest] = tls.peer_tls_args(peer)
            tls_args = self._tls[dest]
        return self._ae().associate(peer.host, peer.port, ae_title=dest, contexts=contexts, tls_args=tls_args)

    # -- sending -----------------------------------------------------------------
    def _send_batch(self, batch: Batch) -> tuple[int, bool]:
        """(instances stored, whether an association could be made)."""
        dest = batch.destination
        peer, problem = self._peer(dest)
        if problem:
            self.queue.mark_failed(batch.ids, problem, None, self.policy, permanent=True)
            log.error("study %s to %s: 0 sent, %d failed: %s (dead letter)", batch.StudyInstanceUID, dest,
                      len(batch), problem)
            return 0, True
        assert peer is not None and peer.host is not None and peer.port is not None  # _peer checked them

        # files that cannot be read fail on their own; the rest go out
        datasets: dict[int, Dataset] = {}
        failed: dict[int, str] = {}
        for it in batch.items:
            try:
                datasets[it.delivery_id] = pydicom.dcmread(self.store.abspath(it.file_path))
            except Exception as exc:  # noqa: BLE001
                failed[it.delivery_id] = f"cannot read result file: {type(exc).__name__}: {exc}"
        for did, err in failed.items():
            self.queue.mark_failed([did], err, None, self.policy)
        items = [it for it in batch.items if it.delivery_id in datasets]
        if not items:
            self._log_batch(batch, 0, len(failed), next(iter(failed.values()), None))
            return 0, True

        contexts = []
        for it in items:
            ts = str(datasets[it.delivery_id].file_meta.get("TransferSyntaxUID", "") or it.TransferSyntaxUID)
            for t in dict.fromkeys([ts, ExplicitVRLittleEndian]):
                key = (it.SOPClassUID, t)
                if key not in contexts:
                    contexts.append(key)
        if len(contexts) > _MAX_CONTEXTS:
            contexts = contexts[:_MAX_CONTEXTS]  # the rest fails with 'no presentation context' and retries
        assoc = self._associate(peer, dest, [build_context(sop, [ts]) for sop, ts in contexts])
        if not assoc.is_established:
            err = describe_association_failure(assoc, peer, dest)
            self.queue.mark_failed([it.delivery_id for it in items], err, None, self.policy)
            self._log_batch(batch, 0, len(batch), err)
            return 0, assoc.is_rejected

        n_sent = 0
        last_error = next(iter(failed.values()), None)
        remaining = list(items)
        try:
            while remaining:
                if self._stopping.is_set():
                    break  # not started: stays pending, no attempt counted
                it = remaining.pop(0)
                try:
                    ds = self._fit(assoc, datasets.pop(it.delivery_id))
                except ValueError as exc:
                    err = f"{dest} cannot take {it.kind} object ({it.SOPClassUID}): {exc}"
                    self.queue.mark_failed([it.delivery_id], err, None, self.policy)
                    failed[it.delivery_id] = err
                    last_error = err
                    continue
                if not self.queue.mark_sending([it.delivery_id], self.owner, self.lease_seconds):
                    continue  # cancelled (superseded) or taken meanwhile
                try:
                    rsp = assoc.send_c_store(ds)
                except (ValueError, AttributeError) as exc:
                    # no accepted presentation context for this object: nothing went out
                    err = f"{dest} cannot take {it.kind} object ({it.SOPClassUID}): {exc}"
                    self.queue.mark_failed([it.delivery_id], err, None, self.policy)
                    failed[it.delivery_id] = err
                    last_error = err
                    continue
                except Exception as exc:  # noqa: BLE001 - the request may have gone out
                    err = f"C-STORE to {dest} interrupted: {type(exc).__name__}: {exc}"
                    self.queue.mark_failed([it.delivery_id], err, None, self.policy, in_doubt=True)
                    failed[it.delivery_id] = err
                    last_error = err
                    break
                status = rsp.get("Status") if rsp is not None else None
                if status is None:
                    # no response (DIMSE timeout, abort, association lost): the destination may hold it
                    err = f"no C-STORE response from {dest} (timeout or association lost)"
                    self.queue.mark_failed([it.delivery_id], err, None, self.policy, in_doubt=True)
                    failed[it.delivery_id] = err
                    last_error = err
                    break
                status = int(status)
                if status in STORED_STATUSES:
                    note = None
                    if status != 0x0000:
                        note = f"stored with warning 0x{status:04X}"
                        comment = rsp.get("ErrorComment")
                        if comment:
                            note += f": {comment}"
                    self.queue.mark_sent(it.delivery_id, status, note=note)
                    n_sent += 1
                else:
                    err = f"{dest} answered C-STORE with status 0x{status:04X}"
                    comment = rsp.get("ErrorComment")
                    if comment:
                        err += f" ({comment})"
                    self.queue.mark_failed([it.delivery_id], err, status, self.policy)
                    failed[it.delivery_id] = err
                    last_error = err
                if not assoc.is_established:
                    break
            if remaining and not self._stopping.is_set():
                # the association ended under us: the rest were not attempted in it
                err = last_error or f"association with {dest} ended"
                self.queue.mark_failed([it.delivery_id for it in remaining], err, None, self.policy)
                failed.update({it.delivery_id: err for it in remaining})
        finally:
            if assoc.is_established:
                assoc.release()
        self._log_batch(batch, n_sent, len(failed), last_error)
        return n_sent, True

    @staticmethod
    def _fit(assoc, ds: Dataset) -> Dataset:
        """The dataset in a transfer syntax the association accepted for its SOP class: as stored, or (a
        compressed object whose syntax was refused) decompressed to explicit VR little endian."""
        sop = str(ds.SOPClassUID)
        ts = ds.file_meta.TransferSyntaxUID
        accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts if cx.abstract_syntax == sop}
        if not accepted:
            raise ValueError("no presentation context accepted for its SOP class")
        if str(ts) in accepted or not ts.is_compressed:
            return ds  # as stored (pynetdicom converts between the uncompressed syntaxes)
        if ExplicitVRLittleEndian not in accepted:
            raise ValueError(f"neither {ts.name} nor Explicit VR Little Endian accepted")
        try:
            ds.decompress(generate_instance_uid=False)  # the same object: its UID must not change
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{ts.name} refused and decompression failed: {type(exc).__name__}: {exc}") from None
        return ds

    def _log_batch(self, batch: Batch, n_sent: int, n_failed: int, error: str | None) -> None:
        if n_failed:
            log.warning("study %s to %s: %d sent, %d failed: %s", batch.StudyInstanceUID, batch.destination,
                        n_sent, n_failed, error)
        else:
            log.info("study %s to %s: %d sent, 0 failed", batch.StudyInstanceUID, batch.destination, n_sent)
        try:
            self._observe_batch(batch, n_sent, n_failed, error)
        except Exception as exc:  # noqa: BLE001 - metrics and audit never stop the queue
            log.warning("study %s to %s: outcome not recorded in metrics/audit: %s", batch.StudyInstanceUID,
                        batch.destination, type(exc).__name__)

    def _observe_batch(self, batch: Batch, n_sent: int, n_failed: int, error: str | None) -> None:
        """Metrics, the audit record, and the one line that says a delivery went dead (the batch's items
        were pending when it began: those dead now went dead in this batch)."""
        dest = batch.destination
        states, study_state, stable_at = self.queue.outcome(batch.ids)
        dead = [v for v in states.values() if v[0] == "dead"]
        retried = sum(1 for v in states.values() if v[0] in ("pending", "sending") and v[1] > 0)
        if n_sent:
            METRICS.delivery_attempts.labels(dest, "sent").inc(n_sent)
        if retried:
            METRICS.delivery_attempts.labels(dest, "retry").inc(retried)
            METRICS.retries.labels(dest).inc(retried)
        if dead:
            METRICS.delivery_attempts.labels(dest, "dead").inc(len(dead))
            METRICS.dead_letters.labels(dest).inc(len(dead))
            last = next((v[2] for v in dead if v[2]), error) or "unknown error"
            where = f" --config {self.cfg.source}" if self.cfg.source else ""
            log.error("delivery DEAD: study %s to %s: %d object(s) gave up after %d attempt(s); last error: %s. "
                      "Retry with `dicom-node%s retry --study %s` or the Retry button of the status page",
                      batch.StudyInstanceUID, dest, len(dead), max(v[1] for v in dead), last, where,
                      batch.StudyInstanceUID)
        if study_state == "sent" and n_sent and stable_at is not None:
            METRICS.stable_to_sent.observe(max(0.0, (utcnow() - stable_at).total_seconds()))
        peer = self.cfg.peer(dest)
        AUDIT.sent(dest, peer.host if peer is not None else None, batch.StudyInstanceUID, n_sent, n_failed, error)

    # -- recovery ----------------------------------------------------------------
    def recover(self, now: dt.datetime | None = None) -> int:
        """Settle the deliveries left ``sending`` (a crash, a lost response) by asking each destination
        whether it holds the instance. Returns how many were found there (now ``sent``)."""
        items = self.queue.claim_in_flight(self.owner, self.lease_seconds, now=now or utcnow())
        if not items:
            return 0
        self._recovered.update(it.study_id for it in items)
        by_dest: dict[str, list[Item]] = defaultdict(list)
        for it in items:
            by_dest[it.destination].append(it)
        found = 0
        for dest, lst in by_dest.items():
            try:
                found += self._recover_destination(dest, lst)
            except Exception as exc:  # noqa: BLE001 - left in 'sending', asked again at the next pass
                log.error("recovery of %d in-flight delivery(ies) to %s failed: %s: %s", len(lst), dest,
                          type(exc).__name__, exc)
        return found

    def _recover_destination(self, dest: str, items: list[Item]) -> int:
        ids = [it.delivery_id for it in items]
        peer, problem = self._peer(dest)
        if problem:
            self.queue.mark_failed(ids, problem, None, self.policy, permanent=True)
            log.error("%d in-flight delivery(ies) to %s: %s (dead letter)", len(items), dest, problem)
            return 0
        assert peer is not None and peer.host is not None and peer.port is not None  # _peer checked them
        assoc = self._associate(peer, dest, [build_context(StudyRootQueryRetrieveInformationModelFind,
                                                           [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
                                             build_context(Verification)])
        rsp = getattr(assoc.acceptor, "primitive", None)
        if not assoc.is_established and rsp is not None and getattr(rsp, "result", None) == 0x00:
            return self._cannot_ask(dest, ids, "accepts neither C-FIND nor C-ECHO")
        if not assoc.is_established:
            err = describe_association_failure(assoc, peer, dest)
            # still unknown whether it holds them: stay 'sending', ask again after the backoff
            self.queue.mark_failed(ids, f"cannot ask whether it holds the instance: {err}", None, self.policy,
                                   in_doubt=True)
            log.warning("%d in-flight delivery(ies) to %s not settled yet: %s", len(items), dest, err)
            return 0
        found = requeued = 0
        try:
            find_ok = any(cx.abstract_syntax == StudyRootQueryRetrieveInformationModelFind
                          for cx in assoc.accepted_contexts)
            if not find_ok:
                return self._cannot_ask(dest, ids, "does not support Study Root C-FIND")
            asked: set[int] = set()
            for it in items:
                asked.add(it.delivery_id)
                held = self._holds(assoc, it)
                if held is True:
                    self.queue.mark_sent(it.delivery_id, None, note="held by the destination (C-FIND) after an "
                                                                     "interrupted send")
                    found += 1
                elif held is False:
                    requeued += self.queue.requeue([it.delivery_id])
                else:
                    requeued += self.queue.requeue([it.delivery_id], note=f"{dest}: {held}; resent (a repeat is "
                                                                          f"possible)")
                    log.warning("in-flight delivery to %s (study %s): %s; sent again, a repeat is possible",
                                dest, it.StudyInstanceUID, held)
                if not assoc.is_established:
                    break
            left = [i for i in ids if i not in asked]
            if left:  # the association ended: ask about these after the backoff
                self.queue.mark_failed(left, f"association with {dest} lost during C-FIND", None, self.policy,
                                       in_doubt=True)
        finally:
            if assoc.is_established:
                assoc.release()
        log.info("recovery at %s: %d in-flight instance(s) already held (marked sent), %d to send again",
                 dest, found, requeued)
        return found

    def _cannot_ask(self, dest: str, ids: list[int], why: str) -> int:
        note = f"{dest} {why}: sent again (a repeat is possible; same SOP Instance UID, so a replacement)"
        n = self.queue.requeue(ids, note=note)
        log.warning("%d in-flight delivery(ies) to %s: the destination %s; they are sent again, so it may "
                    "receive a repeat (same SOP Instance UID: a replacement)", n, dest, why)
        return 0

    @staticmethod
    def _holds(assoc, it: Item) -> bool | str:
        """True / False, or a string saying why it could not be determined."""
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = it.StudyInstanceUID
        q.SeriesInstanceUID = it.SeriesInstanceUID
        q.SOPInstanceUID = it.SOPInstanceUID
        held = False
        final = None
        for status, identifier in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
            if status is None or "Status" not in status:
                return "no C-FIND response (timeout or association lost)"
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                if identifier is not None and str(identifier.get("SOPInstanceUID", "")) == it.SOPInstanceUID:
                    held = True
            else:
                final = code
        if final == 0x0000 or held:
            return held
        return f"C-FIND failed with status 0x{final:04X}" if final is not None else "C-FIND gave no final status"


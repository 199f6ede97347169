"""The pipeline: a stable study in, its result objects stored, indexed and queued for sending.

Stages, each with declared inputs and outputs (as MONAI Deploy operators):

1. ``claim``   index → :class:`ClaimedStudy` (atomic; several workers may run)
2. ``load``    instance files → datasets, each with the reason it cannot be processed, if any
3. ``infer``   datasets → one :class:`ImageResult` per image (the encoder runs once per image)
4. ``route``   results + routing rules → results filtered to the rule's heads, destinations per output
5. ``encode``  datasets + results → SR, heatmap SCs, summary SC (validated at construction)
6. ``record``  objects → files in the store + result rows + deliveries, in one transaction
               (only if the study did not change while it was inferred)

The worker runs in its own process (:func:`worker_main`): receiving never waits
for inference, and the model is loaded once and stays on its device.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass

import pydicom
from pydicom.filebase import DicomBytesIO

from dicom_node.config import Config
from dicom_node.errors import EXPECTED_ERRORS, EncodingError, InvalidDataset
from dicom_node.routing import ImageFacts, apply_heads, destinations, route
from dicom_node.sop import STORAGE_SOP_CLASSES
from inference.results import ImageResult
from storage.files import InstanceStore
from storage.index import Index
from storage.jobs import ClaimedStudy, Jobs, NewResult

log = logging.getLogger("dicom_node.pipeline")

#: SOP classes the model reads (mammography is received but is not a musculoskeletal radiograph)
_MODEL_MODALITIES = {"CR", "DX", "OT", "RG", "XA", "DR", ""}


@dataclass
class LoadedImage:
    row: dict
    ds: pydicom.Dataset | None
    reason: str | None  # why it cannot be processed (None: it can)
    reason_kind: str | None = None  # "unsupported SOP class" | "routing rule" | "not processable"


def worker_id(n: int = 0) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{n}"


def claim_prefix() -> str:
    return f"{socket.gethostname()}:"


class Pipeline:
    def __init__(self, cfg: Config, model=None, worker: str | None = None):
        self.cfg = cfg
        self.index = Index(cfg.storage.database_url)
        self.jobs = Jobs(self.index)
        self.store = InstanceStore(cfg.storage.path)
        self.worker = worker or worker_id()
        if model is None:
            from inference import load_bundle

            device = None if cfg.pipeline.device == "auto" else cfg.pipeline.device
            model = load_bundle(cfg.pipeline.bundle, device=device)
        self.model = model
        info = model.info
        log.info("model %s %s loaded (weights %s…)", info.name, info.version, info.weights_sha256[:12])

    def close(self) -> None:
        self.index.close()

    # -- the loop ------------------------------------------------------------
    def run(self, control=None, done=None, poll: float = 0.5, parent_pid: int | None = None) -> None:
        """Process stable studies until told to stop.

        ``control`` is the read end of a pipe from the node: ``w`` wakes the worker (a study turned
        stable), ``q`` stops it, and end-of-file means the node is gone (even after ``kill -9``:
        a pipe cannot be left locked by a dead process, unlike a shared Event). ``done`` is the
        write end of a pipe to the node, signalled after each study, so that sending starts at once.
        Without them the worker polls, which is correct, only slower.
        """
        if done is not None:
            os.set_blocking(done.fileno(), False)
        while True:
            if parent_pid is not None and os.getppid() != parent_pid:
                log.error("the node (pid %d) is gone: this inference worker stops", parent_pid)
                return
            try:
                did = self.process_one()
            except Exception:
                log.exception("pipeline error")
                did = False
            if did and done is not None:
                _signal(done, b"d")
            if control is None:
                if not did:
                    time.sleep(poll)
                continue
            if control.poll(0 if did else poll):
                try:
                    data = os.read(control.fileno(), 4096)
                except BlockingIOError:
                    data = b"w"
                if not data:
                    log.error("the node is gone: this inference worker stops")
                    return
                if b"q" in data:
                    return

    def process_one(self) -> bool:
        claim = self.jobs.claim(self.worker, self.cfg.pipeline.lease_seconds)
        if claim is None:
            return False
        t0 = time.monotonic()
        try:
            outcome = self._process(claim)
        except Exception as exc:
            # an inconsistent study fails the same way every time; anything else may pass on another try
            permanent = isinstance(exc, (EncodingError, InvalidDataset))
            state = self.jobs.fail(claim, f"{type(exc).__name__}: {exc}", self.cfg.pipeline.max_attempts, permanent)
            log.error("study %s: inference failed (%s: %s); now %s", claim.StudyInstanceUID, type(exc).__name__,
                      exc, state, exc_info=not isinstance(exc, EXPECTED_ERRORS))
            return True
        log.info("study %s: %s in %.1f s", claim.StudyInstanceUID, outcome, time.monotonic() - t0)
        return True

    # -- stages --------------------------------------------------------------
    def _load(self, claim: ClaimedStudy) -> list[LoadedImage]:
        images = []
        for row in claim.instances:
            if row["SOPClassUID"] not in STORAGE_SOP_CLASSES or row["Modality"].upper() not in _MODEL_MODALITIES:
                images.append(LoadedImage(row, None, f"unsupported SOP class or modality "
                                                     f"({row['Modality'] or row['SOPClassUID']})",
                                          "unsupported SOP class"))
                continue
            try:
                ds = pydicom.dcmread(self.store.abspath(row["file_path"]))
            except Exception as exc:
                images.append(LoadedImage(row, None, f"stored file cannot be read: {exc}", "not processable"))
                continue
            images.append(LoadedImage(row, ds, None))
        return images

    def _process(self, claim: ClaimedStudy) -> str:
        if claim.updated and claim.result_version and not self.cfg.pipeline.rerun_on_late_images:
            self.jobs.skip(claim, "late images after results: re-run disabled (pipeline.rerun_on_late_images)")
            return "skipped (late images, re-run disabled)"
        images = self._load(claim)
        readable = [im for im in images if im.ds is not None]
        results: dict[str, ImageResult] = {}
        if readable:
            predicted = self.model.predict_datasets([im.ds for im in readable],
                                                    [im.row["SOPInstanceUID"] for im in readable])
            for im, r in zip(readable, predicted):
                results[im.row["SOPInstanceUID"]] = r
        self.jobs.heartbeat(claim)

        rules = []
        for im in readable:
            uid = im.row["SOPInstanceUID"]
            r = results[uid]
            facts = ImageFacts(claim.calling_ae, im.row["Modality"], im.row["BodyPartExamined"],
                               im.row["ViewPosition"], im.row["SOPClassUID"])
            rule = route(self.cfg.routing, facts, r.anatomy.label if r.processed and r.anatomy else None)
            if rule.skip:
                results[uid] = ImageResult.not_processed(uid, f"routing rule {rule.name!r}", r.rows, r.columns)
                im.reason, im.reason_kind = f"routing rule {rule.name!r}", "routing rule"
                continue
            results[uid] = apply_heads(rule, r)
            if results[uid].processed:
                rules.append(rule)
            else:
                im.reason, im.reason_kind = results[uid].reason, "not processable"

        processed = [im for im in readable if results[im.row["SOPInstanceUID"]].processed]
        if not processed:
            kinds = {im.reason_kind for im in images}
            reason = ("unsupported SOP class" if kinds == {"unsupported SOP class"} else
                      "routing rule" if kinds == {"routing rule"} else "no processable image")
            detail = "; ".join(sorted({im.reason for im in images if im.reason}))[:500]
            self.jobs.skip(claim, f"{reason}: {detail}" if detail else reason)
            return f"skipped ({reason})"

        from dicom_node.results_dicom import build_result_objects, card_concepts

        predecessor = None
        if claim.previous_sr is not None:
            try:
                predecessor = pydicom.dcmread(self.store.abspath(claim.previous_sr["file_path"]),
                                              stop_before_pixels=True)
            except Exception as exc:
                log.warning("study %s: the SR being superseded cannot be read (%s); no predecessor reference",
                            claim.StudyInstanceUID, exc)
        version = claim.result_version + 1
        objs = build_result_objects([im.ds for im in readable], [results[im.row["SOPInstanceUID"]] for im in readable],
                                    self.model.info, result_version=version,
                                    predecessor=predecessor if version > 1 else None,
                                    concept_overrides=card_concepts(self.model.card))
        dests = destinations(rules, claim.calling_ae)
        written: list[NewResult] = []
        outputs = [("summary", objs.summary, dests["summary"])] + \
            [("heatmap", h, dests["heatmaps"]) for h in objs.heatmaps] + [("sr", objs.sr, dests["sr"])]
        for kind, ds, to in outputs:
            buf = DicomBytesIO()
            ds.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
            rel = self.store.result_relpath(claim.StudyInstanceUID, f"{kind}:{ds.SOPInstanceUID}")
            self.store.write(rel, data)
            written.append(NewResult(kind, str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.SeriesInstanceUID),
                                     str(ds.file_meta.TransferSyntaxUID), rel, len(data), tuple(to)))
        if not self.jobs.finish(claim, version, written):
            for w in written:
                self.store.delete(w.file_path)
            return "discarded: new images arrived during inference; the study will be processed again"
        n_bad = len(images) - len(processed)
        return (f"results v{version} ready ({len(processed)} image(s) processed, {n_bad} not), "
                f"{len(written)} object(s) queued for {sorted({d for w in written for d in w.destinations})}")


def _signal(conn, byte: bytes) -> None:
    """Write one byte to a non-blocking pipe end; a full or closed pipe is fine (the reader is busy or gone)."""
    try:
        os.write(conn.fileno(), byte)
    except OSError:
        pass


def worker_main(cfg: Config, n: int, control, done, parent_pid: int | None = None) -> None:
    """Entry point of an inference worker process."""
    from dicom_node.logs import setup_logging

    setup_logging(cfg.logging.level)
    # receiving must not slow down while the model works: the worker runs at a lower priority and,
    # on the CPU, leaves a core to the listener
    if cfg.pipeline.nice:
        os.nice(cfg.pipeline.nice)
    import torch

    torch.set_num_threads(cfg.pipeline.threads or max(1, (os.cpu_count() or 2) - 1))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node stops its workers through the control pipe
    pipeline = Pipeline(cfg, worker=worker_id(n))
    try:
        pipeline.run(control, done, parent_pid=parent_pid)
    finally:
        pipeline.close()


class WorkerPool:
    """Inference worker processes, restarted if one dies (its claims are given back first).

    Each worker has two pipes: control (node → worker: wake, quit; EOF when the node dies) and
    done (worker → node: results queued). :meth:`done_readers` feeds the node's relay to the sender.
    """

    def __init__(self, cfg: Config, jobs: Jobs):
        self.cfg = cfg
        self.jobs = jobs
        self.ctx = multiprocessing.get_context("spawn")
        self.stopping = False
        self.procs: dict[int, multiprocessing.Process] = {}
        self._control: dict[int, object] = {}  # write ends, non-blocking
        self._done: dict[int, object] = {}  # read ends
        self._failures: dict[int, int] = {}  # consecutive early exits per worker
        self._not_before: dict[int, float] = {}
        self._started: dict[int, float] = {}

    def _spawn(self, n: int) -> None:
        control_r, control_w = self.ctx.Pipe(duplex=False)
        done_r, done_w = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(target=worker_main, args=(self.cfg, n, control_r, done_w, os.getpid()),
                             name=f"inference-{n}", daemon=True)
        p.start()
        control_r.close()  # the child holds its own copies: EOF reaches each side when the other dies
        done_w.close()
        os.set_blocking(control_w.fileno(), False)
        for old in (self._control.pop(n, None), self._done.pop(n, None)):
            if old is not None:
                old.close()
        self._control[n], self._done[n] = control_w, done_r
        self.procs[n] = p
        self._started[n] = time.monotonic()
        log.info("inference worker %d started (pid %d)", n, p.pid)

    def start(self) -> None:
        for n in range(self.cfg.pipeline.workers):
            self._spawn(n)

    def done_readers(self) -> list:
        return list(self._done.values())

    def check(self) -> None:
        """Restart dead workers (called periodically by the node)."""
        if self.stopping:
            return
        now = time.monotonic()
        for n, p in list(self.procs.items()):
            if p.is_alive() or now < self._not_before.get(n, 0.0):
                continue
            if n not in self._not_before:  # just found dead: give its claims back, decide when to restart
                released = self.jobs.release_claims(f"{socket.gethostname()}:{p.pid}:")
                early = now - self._started.get(n, now) < 60
                self._failures[n] = self._failures.get(n, 0) + 1 if early else 0
                delay = min(300.0, 5.0 * 2 ** self._failures[n]) if early else 0.0
                log.error("inference worker %d (pid %d) exited with %s; %d claim(s) given back; restart in %.0f s",
                          n, p.pid, p.exitcode, released, delay)
                self._not_before[n] = now + delay
                if delay:
                    continue
            self._not_before.pop(n, None)
            self._spawn(n)

    def wake(self, *_args) -> None:
        """A study turned stable: a waiting worker claims it now rather than at its next poll."""
        for w in list(self._control.values()):
            _signal(w, b"w")

    def stop(self, timeout: float = 20.0) -> None:
        self.stopping = True
        for w in list(self._control.values()):
            _signal(w, b"q")
        for p in self.procs.values():
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in list(self._control.values()) + list(self._done.values()):
            conn.close()

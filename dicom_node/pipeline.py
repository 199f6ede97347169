"""The pipeline: a stable study in, its result objects stored, indexed and queued for sending.

:meth:`Pipeline._process` composes the stages of :mod:`dicom_node.stages` (each with declared
inputs and outputs, as MONAI Deploy operators) with the index calls of :class:`storage.jobs.Jobs`:

1. ``claim``   index → :class:`ClaimedStudy` (atomic; several workers may run)
2. ``load``    instance rows → :class:`~dicom_node.stages.LoadedImage` (SOP class and modality filter)
3. ``infer``   loaded images → one :class:`ImageResult` per image, ``pipeline.batch_size`` at a time,
               the next batch decoded meanwhile by ``pipeline.decode_workers`` threads
4. ``route``   results + routing rules → results filtered to the rule's heads, destinations per output
5. ``encode``  datasets + results → SR, heatmap SCs, summary SC, presentation states (validated at
               construction)
6. ``record``  objects → files in the store + result rows + deliveries, in one transaction
               (only if the study did not change while it was inferred)

``dicom-node infer`` (:mod:`dicom_node.cli_infer`) runs the same load, infer, route and encode
stages on files. The worker runs in its own process (:func:`worker_main`): receiving never
waits for inference, and the model is loaded once and stays on its device.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import pydicom

from dicom_node import stages
from dicom_node.config import Config
from dicom_node.decoding import DecoderPool
from dicom_node.errors import EXPECTED_ERRORS, EncodingError, InvalidDataset
from dicom_node.metrics import METRICS
from storage.files import InstanceStore
from storage.index import Index
from storage.jobs import ClaimedStudy, Jobs, NewResult

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

log = logging.getLogger("dicom_node.pipeline")


def worker_id(cfg: Config, n: int = 0) -> str:
    return f"{cfg.node_identity()}:{os.getpid()}:{n}"


def claim_prefix(cfg: Config) -> str:
    return f"{cfg.node_identity()}:"


class Pipeline:
    def __init__(self, cfg: Config, model=None, worker: str | None = None):
        self.cfg = cfg
        self.index = Index(cfg.storage.database_url)
        self.jobs = Jobs(self.index)
        self.store = InstanceStore(cfg.storage.path)
        self.worker = worker or worker_id(cfg)
        if model is None:
            from inference import load_bundle

            device = None if cfg.pipeline.device == "auto" else cfg.pipeline.device
            model = load_bundle(cfg.pipeline.bundle, device=device)
            from inference.gpu_decode import use_gpu_decoder

            use_gpu_decoder(str(model.device))  # full-size JPEG 2000 on the GPU where nvImageCodec is installed
        self.model = model
        # decoder threads: the next batch of a study is decoded while the model reads one
        self.decoder = DecoderPool(cfg.pipeline.decode_workers)
        self.last_timing: tuple[float, int] | None = None  # (seconds, images) of the last study inferred
        info = model.info
        log.info("model %s %s loaded (weights %s…)", info.name, info.version, info.weights_sha256[:12])

    def close(self) -> None:
        self.decoder.close()
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
                timing, self.last_timing = self.last_timing, None
                _signal(done, b"d" if timing is None else b"d" + f"t{timing[0]:.4f} {timing[1]}\n".encode())
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

    # -- one study: the stages of dicom_node.stages, plus the index calls -----------------------------
    def _process(self, claim: ClaimedStudy) -> str:
        if claim.updated and claim.result_version and not self.cfg.pipeline.rerun_on_late_images:
            self.jobs.skip(claim, "late images after results: re-run disabled (pipeline.rerun_on_late_images)")
            return "skipped (late images, re-run disabled)"
        images = stages.load_instances(claim.instances, self.store.abspath, claim.calling_ae,
                                           self.cfg.limits.max_image_pixels)
        t0 = time.monotonic()
        results = stages.infer(self.model, images, self.cfg.pipeline.batch_size, decoder=self.decoder)
        self.last_timing = (time.monotonic() - t0, len(images))
        self.jobs.heartbeat(claim)
        routed = stages.route(images, results, self.cfg.routing, claim.calling_ae)
        processed = routed.processed
        dests = routed.destinations
        if not processed:
            # radiographs the model declined or could not decode still get a report saying so (the SR and
            # the summary capture); a study of other objects, or one that routing rules skip, gets nothing
            dests = routed.report_destinations
            if not (self.cfg.pipeline.report_not_processed and any(dests.values())):
                reason = stages.skip_reason(routed.images)
                self.jobs.skip(claim, reason)
                return f"skipped ({reason.split(':', 1)[0]})"

        version = claim.result_version + 1
        objs = stages.encode(routed.images, routed.results, self.model.info, card=self.model.card,
                             result_version=version, predecessor=self._predecessor(claim) if version > 1 else None)
        written = self._record(claim, stages.to_part10(objs), dests)
        if not self.jobs.finish(claim, version, written):
            for w in written:
                self.store.delete(w.file_path)
            return "discarded: new images arrived during inference; the study will be processed again"
        n_bad = len(images) - len(processed)
        return (f"results v{version} ready ({len(processed)} image(s) processed, {n_bad} not), "
                f"{len(written)} object(s) queued for {sorted({d for w in written for d in w.destinations})}")

    def _predecessor(self, claim: ClaimedStudy) -> pydicom.Dataset | None:
        """The SR a re-run supersedes (its header), None if there is none or it cannot be read."""
        if claim.previous_sr is None:
            return None
        try:
            return pydicom.dcmread(self.store.abspath(claim.previous_sr["file_path"]), stop_before_pixels=True)
        except Exception as exc:
            log.warning("study %s: the SR being superseded cannot be read (%s); no predecessor reference",
                        claim.StudyInstanceUID, exc)
            return None

    def _record(self, claim: ClaimedStudy, objects: list[stages.EncodedObject],
                dests: dict[str, tuple[str, ...]]) -> list[NewResult]:
        """The write stage of the node: each object into the store, as the result row to index."""
        written: list[NewResult] = []
        for obj in objects:
            ds = obj.dataset
            # the UIDs are the same whoever builds the version (dicom_node.identity); the file is this
            # claim's: a worker whose lease lapsed while another took the study over (another node, on
            # a shared store) then deletes its own files when its finish is refused, never the winner's
            rel = self.store.result_relpath(claim.StudyInstanceUID, f"{obj.kind}:{ds.SOPInstanceUID}:{claim.worker}")
            self.store.write(rel, obj.data)
            written.append(NewResult(obj.kind, str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                     str(ds.SeriesInstanceUID), str(ds.file_meta.TransferSyntaxUID), rel,
                                     len(obj.data), tuple(dests[stages.OUTPUT_OF[obj.kind]])))
        return written


def _signal(conn, byte: bytes) -> None:
    """Write one byte to a non-blocking pipe end; a full or closed pipe is fine (the reader is busy or gone)."""
    try:
        os.write(conn.fileno(), byte)
    except OSError:
        pass


def cap_memory(megabytes: int) -> None:
    """Cap this process's data segment (RLIMIT_DATA: heap and private anonymous mappings, where numpy and
    torch allocate on the CPU): an allocation past it fails with MemoryError in this worker, never takes
    the machine. CUDA reserves large private mappings, so ``pipeline.memory_limit_mb`` is for CPU workers."""
    import resource

    limit = megabytes * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    log.info("inference worker memory capped at %d MB (pipeline.memory_limit_mb)", megabytes)


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent (the node) dies, however it dies: a worker
    loading the model when the node is killed would otherwise run on (with its resource tracker).
    The worker's control pipe also reaches EOF when the node dies; this covers the time before the
    worker reads it. A no-op where prctl is not available."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:  # the node died before prctl: no signal will come
        os._exit(1)


def worker_main(cfg: Config, n: int, control, done, parent_pid: int | None = None, loaded=None) -> None:
    """Entry point of an inference worker process."""
    from dicom_node.logs import setup_logging

    setup_logging(cfg.logging.level)
    die_with_parent(parent_pid)
    if cfg.pipeline.memory_limit_mb:
        cap_memory(cfg.pipeline.memory_limit_mb)
    # receiving must not slow down while the model works: the worker runs at a lower priority and,
    # on the CPU, leaves a core to the listener
    if cfg.pipeline.nice:
        os.nice(cfg.pipeline.nice)
    import torch

    threads = cfg.pipeline.threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    from inference.reduced import set_decoder_threads

    set_decoder_threads(threads)  # one JPEG 2000 image decoded with as many threads as the model has
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node stops its workers through the control pipe
    pipeline = Pipeline(cfg, worker=worker_id(cfg, n))
    if loaded is not None:  # shared with the node: /readyz reports the model loaded
        loaded.value = 1
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
        self.procs: dict[int, BaseProcess] = {}
        self._control: dict[int, Connection[Any, Any]] = {}  # write ends, non-blocking
        self._done: dict[int, Connection[Any, Any]] = {}  # read ends
        self._failures: dict[int, int] = {}  # consecutive early exits per worker
        self._not_before: dict[int, float] = {}
        self._started: dict[int, float] = {}
        self._loaded: dict[int, Any] = {}  # worker -> shared byte, 1 once its model is loaded

    def _spawn(self, n: int) -> None:
        control_r, control_w = self.ctx.Pipe(duplex=False)
        done_r, done_w = self.ctx.Pipe(duplex=False)
        loaded = self.ctx.RawValue("b", 0)
        p = self.ctx.Process(target=worker_main, args=(self.cfg, n, control_r, done_w, os.getpid(), loaded),
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
        self._loaded[n] = loaded
        self._started[n] = time.monotonic()
        log.info("inference worker %d started (pid %d)", n, p.pid)

    def start(self) -> None:
        for n in range(self.cfg.pipeline.workers):
            self._spawn(n)

    def health(self) -> dict[int, str | None]:
        """Per worker: None when it is alive with its model loaded, else what is wrong."""
        out: dict[int, str | None] = {}
        for n in range(self.cfg.pipeline.workers):
            p = self.procs.get(n)
            if p is None or not p.is_alive():
                out[n] = f"inference worker {n} is not running" + (f" (exit code {p.exitcode})" if p else "")
            elif not self._loaded[n].value:
                out[n] = f"inference worker {n} (pid {p.pid}) is loading its model"
            else:
                out[n] = None
        return out

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
                released = self.jobs.release_claims(f"{claim_prefix(self.cfg)}{p.pid}:")
                early = now - self._started.get(n, now) < 60
                self._failures[n] = self._failures.get(n, 0) + 1 if early else 0
                delay = min(300.0, 5.0 * 2 ** self._failures[n]) if early else 0.0
                log.error("inference worker %d (pid %d) exited with %s; %d claim(s) given back; restart in %.0f s",
                          n, p.pid, p.exitcode, released, delay)
                self._not_before[n] = now + delay
                if delay:
                    continue
            self._not_before.pop(n, None)
            METRICS.worker_restarts.inc()
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

"""The node: wires configuration, storage, index, tracker, listener, pipeline and sender together."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, cast

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node import __version__
from dicom_node.audit import AUDIT
from dicom_node.config import Config
from dicom_node.errors import BundleError, ConfigError, StartupError
from dicom_node.listener import Listener
from dicom_node.metrics import METRICS
from dicom_node.sender import Sender
from dicom_node.tracker import StudyTracker
from storage.deliveries import DeliveryQueue
from storage.files import SHARED_MIN_AGE, InstanceStore
from storage.index import Index
from storage.jobs import Jobs
from storage.models import utcnow

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from dicom_node.ops_http import OpsServer
    from dicom_node.pipeline import WorkerPool

log = logging.getLogger("dicom_node")
_TIMING = re.compile(rb"t([0-9.]+) ([0-9]+)\n")


def _port_in_use(what: str, bind: str, port: int, exc: OSError) -> StartupError:
    why = "is in use (another node or program listens there)" if exc.errno == 98 else f"cannot be bound " \
        f"({exc.strerror})"
    return StartupError(f"cannot start: {what} {port} on {bind} {why}")


def check_port_free(what: str, bind: str, port: int) -> None:
    """Bind (and close) ``bind:port`` as the server will: a port in use is one clear StartupError."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind, port))
        except OSError as exc:
            raise _port_in_use(what, bind, port, exc) from None


def check_ports(cfg: Config) -> None:
    """Before anything starts (``serve``): the DICOM port (with the listener role) and the HTTP port are
    free, else one StartupError."""
    if cfg.runs("listener"):
        check_port_free("node.port", cfg.node.bind, cfg.node.port)
    if cfg.http.enabled:
        check_port_free("http.port", cfg.http.bind, cfg.http.port)


def shared_store(cfg: Config) -> bool:
    """Whether other nodes write to ``storage.path`` too: ``storage.shared``, by default whether the
    index is on PostgreSQL (the database several nodes share)."""
    if cfg.storage.shared is not None:
        return cfg.storage.shared
    return not cfg.storage.database_url.startswith("sqlite")


def open_store(cfg: Config) -> InstanceStore:
    """The instance store, its directories created and written once: unusable storage is one StartupError."""
    path = cfg.storage.path
    try:
        store = InstanceStore(path, min_free_mb=cfg.storage.min_free_mb,
                              min_age=SHARED_MIN_AGE if shared_store(cfg) else 0.0)
        probe = store.tmp / f"start-{os.getpid()}.probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"cannot start: storage.path {path} cannot be used: {exc.strerror or exc}"
                           f"{' (' + exc.filename + ')' if getattr(exc, 'filename', None) else ''}") from None
    return store


def check_bundle(cfg: Config) -> None:
    """The model bundle the pipeline will load exists, has a well-formed card and matching weights.

    Torch-free and quick: run at start-up (and by ``check-config``) so that a broken bundle stops
    the node with a message naming ``pipeline.bundle`` instead of failing in the worker later.
    """
    if not cfg.pipeline.enabled:
        return
    from inference import DEFAULT_BUNDLE
    from inference.card import read_card, verify_weights

    path = cfg.pipeline.bundle or DEFAULT_BUNDLE
    try:
        verify_weights(read_card(path))
    except BundleError as exc:
        raise ConfigError(str(exc), key="pipeline.bundle", path=str(cfg.source) if cfg.source else None) from None


class Node:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.store = open_store(cfg)
        self.index = Index(cfg.storage.database_url)
        self.jobs = Jobs(self.index)
        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults={"misfire_grace_time": None})
        self.tracker = StudyTracker(self.index, self.scheduler,
                                    sweep_seconds=max(5.0, min(60.0, cfg.study.quiet_seconds * 3)))
        self.listener: Listener | None = None
        if cfg.runs("listener"):
            self.listener = Listener(cfg, self.store, self.index, on_recorded=self.tracker.instance_recorded)
        self.pool: WorkerPool | None = None
        self.sender: Sender | None = None
        self.http: OpsServer | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        from dicom_node.pipeline import WorkerPool, claim_prefix

        cfg = self.cfg
        log.debug("starting: roles %s, %d peer(s), quiet period %.1f s, %s inference worker(s), batch size %d",
                  ", ".join(cfg.node.roles), len(cfg.peers), cfg.study.quiet_seconds,
                  cfg.pipeline.workers if self.runs_workers else "no", cfg.pipeline.batch_size)
        if cfg.runs("worker"):
            check_bundle(cfg)
        # the ports first: a second node on a busy port stops here with one line, having started nothing
        if self.listener is not None:
            check_port_free("node.port", cfg.node.bind, cfg.node.port)
        if cfg.http.enabled:
            from dicom_node.ops_http import OpsServer

            self.http = OpsServer(self)
            try:
                self.http.bind()
            except OSError as exc:
                self.http = None
                raise _port_in_use("http.port", cfg.http.bind, cfg.http.port, exc) from None
        try:
            AUDIT.configure(cfg)
        except OSError as exc:
            raise StartupError(f"cannot start: audit.path cannot be written: {exc.strerror} ({exc.filename})") \
                from None
        AUDIT.configuration(cfg)
        METRICS.set_peers(p.ae_title for p in cfg.peers)
        METRICS.watch_index(self.index)
        self._model_info()
        # files a crash left between their write and their index row: this node writes nothing to the
        # store yet; on a shared store only what is older than any write in progress (open_store)
        removed, freed = self.store.sweep(self.index.stored_paths())
        if removed:
            log.warning("start-up sweep: %d stored file(s) without an index row removed (%.1f MB), left by an "
                        "earlier run that stopped between writing and indexing them", removed, freed / 1e6)
        if cfg.runs("worker"):
            released = self.jobs.release_claims(claim_prefix(cfg))
            if released:
                log.info("%d stud%s left inferring by an earlier run: back to stable", released,
                         "y" if released == 1 else "ies")
        self.scheduler.start()
        # the quiet-period timers run where studies arrive and where they are processed: a deadline
        # fires on whichever node sees it first (the state change is a compare-and-set)
        if self.listener is not None or self.runs_workers:
            self.tracker.start()
        if self.listener is not None:
            try:
                self.listener.start()
            except OSError as exc:
                raise _port_in_use("node.port", cfg.node.bind, cfg.node.port, exc) from None
        if self.runs_workers:
            self.pool = WorkerPool(cfg, self.jobs)
            self.tracker.on_stable = self.pool.wake
            self.pool.start()
            self.scheduler.add_job(self.pool.check, "interval", seconds=5, id="workers", coalesce=True,
                                   max_instances=1)
        if cfg.runs("sender"):
            # the first pass runs at once: deliveries left in doubt by a crash are checked (C-FIND) before
            # any resend
            self.sender = Sender(cfg, self.store, DeliveryQueue(self.index))
            self.sender.start(self.scheduler)
        if self.pool is not None:  # results queued by a worker: send now rather than at the next poll
            threading.Thread(target=self._relay_done, name="results-ready", daemon=True).start()
        if cfg.retention.max_age_days:  # on every node; one at a time on a shared database (retention())
            self.scheduler.add_job(self.retention, "interval", minutes=cfg.retention.interval_minutes,
                                   id="retention", coalesce=True, max_instances=1,
                                   next_run_time=dt.datetime.now(dt.UTC))
        if self.http is not None:
            self.http.start()
        AUDIT.application(True)
        log.info("msk-dicom-node %s started (config %s; roles %s)", __version__, cfg.source or "<defaults>",
                 ", ".join(cfg.node.roles))

    @property
    def runs_workers(self) -> bool:
        """The inference workers run here: the worker role, and the pipeline enabled."""
        return self.cfg.runs("worker") and self.cfg.pipeline.enabled

    def _model_info(self) -> None:
        if not self.runs_workers:
            METRICS.model.info({"name": "", "version": "", "pipeline": "disabled"})
            return
        from inference import DEFAULT_BUNDLE
        from inference.card import read_card

        try:
            card = read_card(self.cfg.pipeline.bundle or DEFAULT_BUNDLE)
            METRICS.model.info({"name": card.name, "version": card.version, "pipeline": "enabled",
                                "weights_sha256": next(iter(card.weights.values()), "")[:16]})
        except Exception as exc:  # noqa: BLE001 - check_bundle has passed; the metric is a courtesy
            log.warning("model info metric not set: %s", type(exc).__name__)

    def _relay_done(self) -> None:
        from multiprocessing.connection import wait

        assert self.pool is not None  # set by start() before this thread starts
        while not self._stop.is_set() and not self.pool.stopping:
            readers = self.pool.done_readers()
            try:
                # the readers are the pool's Connections: wait() gives back some of them
                ready = cast("list[Connection[Any, Any]]", wait(readers, timeout=1.0)) if readers else []
            except (OSError, ValueError):  # a pipe closed under us: a worker was replaced
                continue
            woke = False
            for r in ready:
                try:
                    data = os.read(r.fileno(), 4096)
                except OSError:
                    continue
                woke |= bool(data)
                for seconds, images in _TIMING.findall(data):  # a study's inference time (pipeline.py)
                    METRICS.inference_study.observe(float(seconds))
                    if int(images):
                        for _ in range(int(images)):
                            METRICS.inference_image.observe(float(seconds) / int(images))
            if woke and self.sender is not None:  # without the sender role, another node's polls find them
                self.sender.wake()
            elif ready:
                time.sleep(0.2)  # end of file: a worker died; the pool restarts it

    def retention(self) -> int:
        """Remove studies older than retention.max_age_days whose results were all delivered."""
        max_age_days = self.cfg.retention.max_age_days
        if max_age_days is None:  # only scheduled when it is set; timedelta(days=None) raised TypeError too
            raise TypeError("retention.max_age_days is not set")
        cutoff = utcnow() - dt.timedelta(days=max_age_days)
        removed = 0
        with self.index.db.exclusive("retention") as mine:  # one node at a time on a shared database
            if not mine:
                log.debug("retention: another node is running it")
                return 0
            for study_id, uid in self.jobs.expired_studies(cutoff):
                if self.jobs.delete_study(study_id):  # rows first: a crash leaves files, never dangling rows
                    self.store.delete_study_dirs(uid)
                    removed += 1
        if removed:
            log.info("retention: removed %d stud%s older than %g days", removed, "y" if removed == 1 else "ies",
                     self.cfg.retention.max_age_days)
        return removed

    def stop(self, quiet: bool = False) -> None:
        """Stop everything started; ``quiet``: after a failed start (its one line says it all)."""
        self._stop.set()
        if self.http is not None:
            self.http.stop()
        if self.listener is not None:
            self.listener.stop()
        if self.sender is not None:
            self.sender.stop()
        if self.pool is not None:
            self.pool.stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        self.index.close()
        if AUDIT.enabled:
            AUDIT.application(False)
            AUDIT.close()
        if not quiet:
            log.info("stopped")

    def serve_forever(self) -> None:
        def _request_stop(signum, _frame):
            log.info("signal %d: stopping", signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, _request_stop)
        signal.signal(signal.SIGINT, _request_stop)
        try:
            self.start()
        except BaseException:
            self.stop(quiet=True)
            raise
        try:
            self._stop.wait()
        finally:
            self.stop()

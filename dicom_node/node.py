"""The node: wires configuration, storage, index, tracker and listener together."""

from __future__ import annotations

import logging
import signal
import threading

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node import __version__
from dicom_node.config import Config
from dicom_node.listener import Listener
from dicom_node.tracker import StudyTracker
from storage.files import InstanceStore
from storage.index import Index

log = logging.getLogger("dicom_node")


class Node:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.store = InstanceStore(cfg.storage.path, min_free_mb=cfg.storage.min_free_mb)
        self.index = Index(cfg.storage.database_url)
        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults={"misfire_grace_time": None})
        self.tracker = StudyTracker(self.index, self.scheduler,
                                    sweep_seconds=max(5.0, min(60.0, cfg.study.quiet_seconds * 3)))
        self.listener = Listener(cfg, self.store, self.index, on_recorded=self.tracker.instance_recorded)
        self._stop = threading.Event()

    def start(self) -> None:
        self.scheduler.start()
        self.tracker.start()
        self.listener.start()
        log.info("msk-dicom-node %s started (config %s)", __version__, self.cfg.source or "<defaults>")

    def stop(self) -> None:
        self.listener.stop()
        self.scheduler.shutdown(wait=False)
        self.index.close()
        log.info("stopped")

    def serve_forever(self) -> None:
        self.start()

        def _request_stop(signum, _frame):
            log.info("signal %d: stopping", signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, _request_stop)
        signal.signal(signal.SIGINT, _request_stop)
        try:
            self._stop.wait()
        finally:
            self.stop()

"""Prometheus metrics of the node (``/metrics`` of :mod:`dicom_node.ops_http`).

Counters and histograms are moved by the code where things happen (listener, sender, worker pool,
the relay of inference timings); gauges of the index (studies by state, deliveries by state and
destination, queue depths) are read from the database when Prometheus scrapes. One registry per
process (the node), never the global default one. Labels carry AE titles and states, never a data
element's value: a calling AE title that is not a configured peer is counted as ``other``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from storage.index import Index

log = logging.getLogger("dicom_node.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
disable_created_metrics()  # no *_created series: counters and histograms only
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.peers: frozenset[str] = frozenset()
        self.associations = Counter("msknode_associations", "Associations requested, by result and calling AE",
                                    ["result", "calling_ae"], registry=r)
        self.c_store = Counter("msknode_c_store", "C-STORE requests answered, by status and calling AE",
                               ["status", "calling_ae"], registry=r)
        self.received_bytes = Counter("msknode_received_bytes", "Bytes of instances stored", registry=r)
        self.inference_study = Histogram("msknode_inference_study_seconds", "Inference time of one study",
                                         buckets=_SECONDS, registry=r)
        self.inference_image = Histogram("msknode_inference_image_seconds", "Inference time per image",
                                         buckets=_SECONDS, registry=r)
        self.stable_to_sent = Histogram("msknode_stable_to_sent_seconds",
                                        "From a study turning stable to all its results delivered",
                                        buckets=_SECONDS, registry=r)
        self.delivery_attempts = Counter("msknode_delivery_attempts",
                                         "C-STORE attempts of result objects, by destination and outcome "
                                         "(sent, retry, dead)", ["destination", "outcome"], registry=r)
        self.retries = Counter("msknode_delivery_retries", "Failed deliveries scheduled for another attempt",
                               ["destination"], registry=r)
        self.dead_letters = Counter("msknode_dead_letters", "Deliveries that became dead letters",
                                    ["destination"], registry=r)
        self.worker_restarts = Counter("msknode_worker_restarts", "Inference workers restarted after they died",
                                       registry=r)
        self.model = Info("msknode_model", "The model bundle the inference workers load", registry=r)
        self._index_collector: Collector | None = None

    def set_peers(self, ae_titles) -> None:
        self.peers = frozenset(ae_titles)

    def ae(self, calling_ae: str) -> str:
        """The label of a calling AE title: a configured peer's, else ``other`` (bounded cardinality)."""
        calling_ae = (calling_ae or "").strip()
        return calling_ae if calling_ae in self.peers else "other"

    def watch_index(self, index: Index) -> None:
        if self._index_collector is not None:
            self.registry.unregister(self._index_collector)
        self._index_collector = IndexCollector(index)
        self.registry.register(self._index_collector)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class IndexCollector(Collector):
    """Gauges read from the index at scrape time."""

    def __init__(self, index: Index):
        self.index = index

    def describe(self):
        return []  # no description call against the database at registration

    def collect(self):
        from sqlalchemy import func, select

        from storage.models import Delivery, DeliveryState, StudyState

        studies = GaugeMetricFamily("msknode_studies", "Studies in the index by state", labels=["state"])
        deliveries = GaugeMetricFamily("msknode_deliveries", "Deliveries of result objects by state and destination",
                                       labels=["state", "destination"])
        dead = GaugeMetricFamily("msknode_dead_letters_waiting", "Dead-letter deliveries waiting for a retry")
        depth = GaugeMetricFamily("msknode_queue_depth", "Work waiting: studies stable for inference, deliveries "
                                                         "pending or sending", labels=["queue"])
        try:
            by_state = self.index.status()["studies_by_state"]
            with self.index.db.read() as s:
                rows = s.execute(select(Delivery.state, Delivery.destination, func.count(Delivery.id))
                                 .group_by(Delivery.state, Delivery.destination)).all()
        except Exception as exc:  # noqa: BLE001 - a scrape must answer; /readyz says what is wrong
            log.warning("metrics: the index cannot be read: %s", type(exc).__name__)
            return
        for state in StudyState:
            studies.add_metric([state.value], by_state.get(state.value, 0))
        n_dead = n_send = 0
        for d_state, dest, n in rows:
            deliveries.add_metric([d_state, dest], n)
            if d_state == DeliveryState.DEAD.value:
                n_dead += n
            if d_state in (DeliveryState.PENDING.value, DeliveryState.SENDING.value):
                n_send += n
        dead.add_metric([], n_dead)
        depth.add_metric(["inference"], by_state.get(StudyState.STABLE.value, 0))
        depth.add_metric(["send"], n_send)
        yield from (studies, deliveries, dead, depth)


#: the node process's metrics
METRICS = Metrics()

"""Two nodes and a worker-only process on one PostgreSQL and one store, behind HAProxy (issue 18).

Orthanc pushes 40 one-image studies, one association each, through HAProxy in TCP mode to the
listeners of nodes A and B; a third process runs inference workers only. Node A is SIGKILLed while
its worker holds a study (its workers die with it) and restarted later. Every study's results
arrive at Orthanc exactly once: one NewInstance event per result object, none missing, result
version 1; a counting destination beside Orthanc shows that no object was sent twice (Orthanc logs
no second NewInstance for an instance it already holds).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from storage.index import Index
from storage.models import Study
from tests import haproxy, postgres
from tests.counting_scp import CountingSCPProcess
from tests.dicomgen import fracatlas_images, write_dx_study
from tests.haproxy import HAProxy
from tests.nodeproc import NodeProcess, node_config
from tests.peers import Orthanc, free_port, wait_until
from tests.test_pipeline import FAST_SENDING, results_at

N_STUDIES = 40
KILL_AFTER = 14  # pushes before node A dies (once its worker holds a study)
OUTPUTS = ["origin", "COUNTER"]  # every result to Orthanc and to the counting destination


def multinode_config(workdir: Path, *, port: int, roles: list[str], database_url: str, store: Path,
                     pacs_port: int, counter_port: int, lease_seconds: float = 8.0) -> dict:
    """One node of the group: the shared database and store, short leases and quiet period."""
    return node_config(
        workdir, port=port, quiet_seconds=2,
        peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
               {"ae_title": "COUNTER", "host": "127.0.0.1", "port": counter_port}],
        node={"roles": roles},
        storage={"path": str(store), "database_url": database_url},
        pipeline={"enabled": True, "workers": 1, "threads": 1, "batch_size": 4, "lease_seconds": lease_seconds,
                  "decode_workers": 0},
        sending={**FAST_SENDING, "timeout_seconds": 5},
        routing={"default": {"name": "default", "outputs": {k: OUTPUTS for k in ("sr", "heatmaps", "summary",
                                                                                 "gsps")}}},
        audit={"path": str(workdir / "audit.jsonl")},  # one audit file per node, not on the shared store
    )


def all_changes(pacs: Orthanc) -> list[dict]:
    out, since = [], 0
    while True:
        page = pacs.get(f"/changes?since={since}&limit=1000")
        out += page["Changes"]
        if page["Done"]:
            return out
        since = page["Last"]


def studies(index: Index) -> dict[str, Study]:
    with index.db.read() as s:
        return {st.StudyInstanceUID: st for st in s.scalars(select(Study))}


@pytest.mark.slow
@pytest.mark.skipif(not (postgres.available() and haproxy.available()), reason="needs PostgreSQL and HAProxy")
def test_two_nodes_behind_haproxy_one_killed_every_result_exactly_once(tmp_path):
    url = postgres.server().new_database()
    store = tmp_path / "store"
    port_a, port_b = free_port(), free_port()
    lb = HAProxy([("127.0.0.1", port_a), ("127.0.0.1", port_b)], workdir=tmp_path / "haproxy")
    pacs = Orthanc(tmp_path / "orthanc", aet="PACS", modalities={"lb": ("MSKNODE", "127.0.0.1", lb.port)})
    counter = CountingSCPProcess(tmp_path / "counter.json", aet="COUNTER")
    processes: list[NodeProcess] = []
    index = Index(url)
    try:
        pacs.start()
        counter.start()

        def node(name: str, port: int, roles: list[str]) -> NodeProcess:
            n = NodeProcess(tmp_path / name, multinode_config(
                tmp_path / name, port=port, roles=roles, database_url=url, store=store,
                pacs_port=pacs.dicom_port, counter_port=counter.port))
            processes.append(n)
            return n

        a = node("a", port_a, ["listener", "worker", "sender"]).start()
        b = node("b", port_b, ["listener", "worker", "sender"]).start()
        w = node("w", free_port(), ["worker"]).start()
        lb.start()

        # 40 studies of one small DX image each, in Orthanc
        ids = []
        for i in range(N_STUDIES):
            [f] = write_dx_study(tmp_path / "src" / f"s{i:02d}", fracatlas_images(1, offset=i, readable=True),
                                 patient_id=f"MN{i:02d}")
            ids.append(pacs.upload(f)["ID"])
        uids = {pacs.get(f"/instances/{i}/simplified-tags")["StudyInstanceUID"] for i in ids}
        assert len(uids) == N_STUDIES

        for n in processes:  # every worker has its model loaded
            wait_until(n.ready, timeout=300, what=f"{n.workdir.name} ready", interval=0.5)
        a_prefix = f"/{port_a}:"  # claimed_by names the node's host and DICOM port (Config.node_identity)
        killed_at = None
        held: list[str] = []
        for n, instance in enumerate(ids):
            pacs.store_to("lb", [instance])  # one association per study: HAProxy alternates A and B
            if n + 1 == KILL_AFTER:
                # A dies while its worker holds a study
                held = wait_until(lambda: [u for u, st in studies(index).items()
                                           if st.state == "inferring" and a_prefix in (st.claimed_by or "")],
                                  timeout=180, what="a study claimed by node A's worker", interval=0.05)
                a.kill()
                killed_at = time.monotonic()
        assert killed_at is not None
        # A's claim is taken over by B's or W's worker once its lease lapsed
        wait_until(lambda: all(a_prefix not in (studies(index)[u].claimed_by or "") or
                               studies(index)[u].state != "inferring" for u in held),
                   timeout=120, what="A's claims taken over", interval=0.2)
        taken_over = time.monotonic() - killed_at
        time.sleep(3)
        a.start()  # restarted later, same configuration

        wait_until(lambda: sum(st.state == "sent" for st in studies(index).values()) == N_STUDIES, timeout=600,
                   what="every study sent", interval=1,
                   context=lambda: str(Counter(st.state for st in studies(index).values())))
        final = studies(index)
        assert set(final) == uids
        assert {st.result_version for st in final.values()} == {1}

        # at Orthanc: each study's results once, in one NewInstance event per object
        per_study = {u: results_at(pacs, u) for u in uids}
        for u, got in per_study.items():
            assert (len(got["sr"]), len(got["sc"]), len(got["pr"])) == (1, 2, 1), u
        result_ids = {i["_id"] for got in per_study.values() for kind in got.values() for i in kind}
        new = Counter(c["ID"] for c in all_changes(pacs) if c["ChangeType"] == "NewInstance")
        assert len(result_ids) == 4 * N_STUDIES
        assert {new[i] for i in result_ids} == {1}
        assert sum(new.values()) == N_STUDIES + 4 * N_STUDIES  # the sources and the results, nothing else
        # and at the counting destination: every object stored exactly once
        counts = counter.counts()
        assert len(counts) == 4 * N_STUDIES and set(counts.values()) == {1}, Counter(counts.values())
        # both listeners received; A's death and restart are in its log; the worker-only process worked
        assert "re-armed quiet-period timers" in a.log() or "roles listener, worker, sender" in a.log()
        assert "results v1 ready" in w.log() + b.log()
        print(f"\nA's claims taken over {taken_over:.1f} s after SIGKILL (lease 8 s)")
    finally:
        for p in processes:
            p.stop()
        lb.stop()
        counter.stop()
        pacs.stop()
        index.close()

#!/usr/bin/env python3
"""Several nodes on one PostgreSQL and one store (issue 18): three figures side by side, one run.

    .venv/bin/python bench/bench_multinode.py [--studies 20] [--lease 10] [--images 100] [--json OUT]

1. Studies per minute with one and with two inference worker processes: one node (all roles),
   then the same node plus a worker-only process on the same database and store. ``--studies``
   one-image DX studies are pushed by ``storescu`` (one association each); the clock runs from
   the first push to the last study ``sent`` (results stored by dcmtk's ``storescp``). On a
   2-core machine the model takes both cores: a second worker process adds little.
2. Takeover: a worker holding a study is SIGKILLed (its node with it); the time until another
   node's worker has claimed the study (``pipeline.lease_seconds`` = ``--lease``, then the next
   poll of a free worker).
3. Receive rate through HAProxy (TCP mode, two listener-only nodes behind it) against one node
   direct: ``storescu`` sends ``--images`` uncompressed DX files in one association; MB/s and ratio.

Needs PostgreSQL (tests/postgres.py starts a private server), HAProxy, dcmtk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import select  # noqa: E402

from storage.index import Index  # noqa: E402
from storage.models import Study  # noqa: E402
from tests import postgres  # noqa: E402
from tests.dicomgen import fracatlas_images, write_dx_study  # noqa: E402
from tests.haproxy import HAProxy  # noqa: E402
from tests.nodeproc import NodeProcess, node_config  # noqa: E402
from tests.peers import Storescp, free_port, require, wait_until  # noqa: E402


def states(index: Index) -> dict[str, tuple[str, str | None]]:
    with index.db.read() as s:
        return {r.StudyInstanceUID: (r.state, r.claimed_by) for r in s.scalars(select(Study))}


def group_node(work: Path, name: str, *, url: str, store: Path, roles: list[str], dest_port: int,
               lease: float, pipeline: bool = True, quiet: float = 1.0) -> NodeProcess:
    cfg = node_config(work / name, port=free_port(), quiet_seconds=quiet,
                      peers=[{"ae_title": "STORESCU", "host": "127.0.0.1", "port": dest_port}],
                      node={"roles": roles}, storage={"path": str(store), "database_url": url},
                      pipeline={"enabled": pipeline, "workers": 1, "threads": 1, "lease_seconds": lease},
                      routing={"default": {"name": "default", "outputs": {"sr": ["origin"], "heatmaps": [],
                                                                          "summary": [], "gsps": []}}},
                      sending={"poll_seconds": 0.3, "base_delay_seconds": 0.5, "timeout_seconds": 10},
                      audit={"path": str(work / name / "audit.jsonl")})
    return NodeProcess(work / name, cfg)


def storescu(port: int, files: list[Path]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([require("storescu"), "-aec", "MSKNODE", "127.0.0.1", str(port), *map(str, files)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"storescu failed: {r.stderr[-2000:]}")
    return time.perf_counter() - t0


def throughput(work: Path, pg: postgres.Postgres, studies: list[list[Path]], extra_worker: bool,
               lease: float) -> float:
    """Studies per minute: one node, with or without a worker-only process beside it."""
    tag = "two" if extra_worker else "one"
    url, store = pg.new_database(f"bench_{tag}"), work / f"store-{tag}"
    with Storescp(work / f"received-{tag}") as scp:
        nodes = [group_node(work, f"{tag}-a", url=url, store=store, roles=["listener", "worker", "sender"],
                            dest_port=scp.port, lease=lease)]
        if extra_worker:
            nodes.append(group_node(work, f"{tag}-w", url=url, store=store, roles=["worker"], dest_port=scp.port,
                                    lease=lease))
        index = Index(url)
        try:
            for n in nodes:
                n.start()
            for n in nodes:
                wait_until(n.ready, timeout=300, what="workers ready", interval=0.5)
            t0 = time.perf_counter()
            for files in studies:
                storescu(nodes[0].port, files)
            wait_until(lambda: sum(s == "sent" for s, _ in states(index).values()) == len(studies), timeout=900,
                       what="all studies sent", interval=0.2)
            return len(studies) / (time.perf_counter() - t0) * 60
        finally:
            index.close()
            for n in nodes:
                n.stop()


def takeover(work: Path, pg: postgres.Postgres, lease: float) -> float:
    """Seconds from SIGKILL of the node whose worker holds a study to another node's claim on it."""
    url, store = pg.new_database("bench_takeover"), work / "store-takeover"
    big = write_dx_study(work / "takeover-study", fracatlas_images(12), scale=2, patient_id="TAKEOVER")
    with Storescp(work / "received-takeover") as scp:
        a = group_node(work, "to-a", url=url, store=store, roles=["listener", "worker", "sender"],
                       dest_port=scp.port, lease=lease)
        w = group_node(work, "to-w", url=url, store=store, roles=["worker"], dest_port=scp.port, lease=lease)
        index = Index(url)
        try:
            for n in (a, w):
                n.start()
                wait_until(n.ready, timeout=300, what="workers ready", interval=0.5)
            storescu(a.port, big)
            uid, (_, holder) = wait_until(lambda: next(((u, v) for u, v in states(index).items()
                                                        if v[0] == "inferring"), None),
                                          timeout=120, what="a claim", interval=0.05)
            victim = a if f"/{a.port}:" in (holder or "") else w
            victim.kill()
            t0 = time.perf_counter()
            wait_until(lambda: states(index)[uid][1] not in (holder, None), timeout=lease * 10,
                       what="the claim taken over", interval=0.05)
            return time.perf_counter() - t0
        finally:
            index.close()
            for n in (a, w):
                n.stop()


def receive(work: Path, pg: postgres.Postgres, files: list[Path], repeat: int) -> tuple[float, float]:
    """Seconds to receive ``files``: one node direct, and through HAProxy over two nodes (medians)."""
    url, store = pg.new_database("bench_receive"), work / "store-receive"
    nodes = [group_node(work, f"rx-{i}", url=url, store=store, roles=["listener"], dest_port=1, lease=60,
                        pipeline=False, quiet=3600) for i in (1, 2)]
    lb = HAProxy([("127.0.0.1", n.port) for n in nodes], workdir=work / "haproxy")
    direct, proxied = [], []
    try:
        for n in nodes:
            n.start()
        lb.start()
        for _ in range(repeat):
            direct.append(storescu(nodes[0].port, files))
            proxied.append(storescu(lb.port, files))
    finally:
        lb.stop()
        for n in nodes:
            n.stop()
    return statistics.median(direct), statistics.median(proxied)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--lease", type=float, default=10.0)
    ap.add_argument("--images", type=int, default=100, help="files for the receive figure")
    ap.add_argument("--scale", type=int, default=4, help="their size: the 512-px sources enlarged this much")
    ap.add_argument("--repeat", type=int, default=2, help="alternate direct and HAProxy this many times")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-multinode-"))
    studies = [write_dx_study(work / "studies" / f"s{i:03d}", fracatlas_images(1, offset=i, readable=True),
                              patient_id=f"B{i:03d}") for i in range(args.studies)]
    rx_files = write_dx_study(work / "rx", fracatlas_images(args.images), scale=args.scale)
    rx_mb = sum(f.stat().st_size for f in rx_files) / 1e6
    with postgres.Postgres() as pg:
        one = throughput(work, pg, studies, extra_worker=False, lease=args.lease)
        two = throughput(work, pg, studies, extra_worker=True, lease=args.lease)
        taken = takeover(work, pg, args.lease)
        direct, proxied = receive(work, pg, rx_files, args.repeat)
    result = {
        "studies": args.studies, "studies_per_min_one_worker": round(one, 1),
        "studies_per_min_two_workers": round(two, 1), "ratio_two_over_one": round(two / one, 2),
        "lease_seconds": args.lease, "takeover_seconds": round(taken, 1),
        "receive_files": len(rx_files), "receive_MB": round(rx_mb, 1),
        "direct_MB_per_s": round(rx_mb / direct, 1), "haproxy_MB_per_s": round(rx_mb / proxied, 1),
        "ratio_haproxy_over_direct": round(direct / proxied, 3),
    }
    print(f"several nodes on one PostgreSQL and one store ({args.studies} one-image studies)")
    print(f"  studies/min, one worker process: {one:7.1f}   two (a worker-only process beside the node): "
          f"{two:7.1f}   ratio {two / one:.2f}")
    print(f"  claims of a SIGKILLed node taken over after {taken:.1f} s (pipeline.lease_seconds {args.lease:g})")
    print(f"  receive, {len(rx_files)} files ({rx_mb:.0f} MB) in one association: one node direct "
          f"{rx_mb / direct:.1f} MB/s, through HAProxy {rx_mb / proxied:.1f} MB/s, ratio {direct / proxied:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

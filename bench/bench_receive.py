#!/usr/bin/env python3
"""Receive throughput: the node (fsync + index on) against dcmtk's storescp, same images, one run.

    .venv/bin/python bench/bench_receive.py [--images 200] [--scale 4] [--repeat 1] [--json OUT]

The images are uncompressed DX radiographs built from the shared FracAtlas set
(``--scale 4``: about 2000 x 1700 pixels, 6-7 MB each, as a detector delivers);
without the shared data, copies of the pydicom-data CR radiographs. dcmtk's
``storescu`` sends all of them in one association over loopback, first to
``storescp -od DIR`` (the reference: it writes every file to disk, without
fsync), then to the node (every instance fsynced, directory fsynced, indexed
in SQLite with synchronous=FULL before the answer). The ratio is the node's
throughput divided by storescp's: above 1.0 the node is faster.
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

from tests.dicomgen import (  # noqa: E402
    copy_with_new_uids,
    fracatlas_available,
    fracatlas_images,
    pydicom_radiographs,
    write_dx_study,
)
from tests.nodeproc import NodeProcess, node_config  # noqa: E402
from tests.peers import Storescp, free_port, require  # noqa: E402


def make_images(out: Path, n: int, scale: int) -> list[Path]:
    if fracatlas_available():
        return write_dx_study(out, fracatlas_images(n), scale=scale)
    out.mkdir(parents=True, exist_ok=True)
    src = [p for p in pydicom_radiographs() if "UNC" in p.name]
    return [copy_with_new_uids(src[i % len(src)], out / f"cr_{i:04d}.dcm") for i in range(n)]


def send(port: int, called: str, files: list[Path]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([require("storescu"), "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                       capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"storescu failed: {r.stderr[-2000:]}")
    return dt


def run_reference(work: Path, files: list[Path]) -> float:
    out = work / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    with Storescp(out) as scp:
        dt = send(scp.port, "STORESCP", files)
        stored = len(scp.files())
    if stored != len(files):
        raise SystemExit(f"storescp stored {stored} of {len(files)}")
    return dt


def run_node(work: Path, files: list[Path]) -> float:
    nd = work / "node"
    shutil.rmtree(nd, ignore_errors=True)
    node = NodeProcess(nd, node_config(nd, port=free_port(), quiet_seconds=3600,
                                       peers=[{"ae_title": "STORESCU", "host": "127.0.0.1"}]))
    with node:
        dt = send(node.port, "MSKNODE", files)
        n = node.status()["instances"]
    if n != len(files):
        raise SystemExit(f"node indexed {n} of {len(files)}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--scale", type=int, default=4, help="enlarge the 512-px source images by this factor")
    ap.add_argument("--repeat", type=int, default=1, help="alternate reference and node this many times")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-receive-"))
    files = make_images(work / "images", args.images, args.scale)
    total_mb = sum(f.stat().st_size for f in files) / 1e6
    ref_t, node_t = [], []
    for _ in range(args.repeat):
        ref_t.append(run_reference(work, files))
        node_t.append(run_node(work, files))
    ref, nod = statistics.median(ref_t), statistics.median(node_t)
    result = {
        "images": len(files), "megabytes": round(total_mb, 1), "repeat": args.repeat,
        "storescp_seconds": round(ref, 3), "node_seconds": round(nod, 3),
        "storescp_images_per_s": round(len(files) / ref, 1), "node_images_per_s": round(len(files) / nod, 1),
        "storescp_MB_per_s": round(total_mb / ref, 1), "node_MB_per_s": round(total_mb / nod, 1),
        "ratio_node_over_storescp": round(ref / nod, 3),
    }
    print(f"receive throughput, {len(files)} uncompressed radiographs ({total_mb:.0f} MB), storescu over loopback")
    print(f"  storescp (reference, no fsync): {ref:7.2f} s  {result['storescp_images_per_s']:7.1f} img/s  "
          f"{result['storescp_MB_per_s']:7.1f} MB/s")
    print(f"  node (fsync + index):           {nod:7.2f} s  {result['node_images_per_s']:7.1f} img/s  "
          f"{result['node_MB_per_s']:7.1f} MB/s")
    print(f"  ratio node/storescp: {result['ratio_node_over_storescp']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

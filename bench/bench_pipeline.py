#!/usr/bin/env python3
"""End-to-end figures of the whole loop, on this machine's CPU, with Orthanc as the PACS.

    .venv/bin/python bench/bench_pipeline.py [--studies 50] [--quiet 2] [--json OUT]

1. Latency: Orthanc pushes a 1-image and a 4-image study; the time from the
   moment the last image was acknowledged to the moment the last result object
   (SR, heatmaps, presentation states, summary) is stored in Orthanc, minus the configured quiet
   period. Reference, in the same run: the bare model on the same images
   (``Model.predict_datasets`` in-process, decode + encoder + heads + maps).
2. Sustained: Orthanc pushes ``--studies`` one-image studies back to back;
   studies per minute from the first push to the last result stored.
3. Listener under load: storescu sends uncompressed radiographs to the node
   while it is idle, and again while the model works through the sustained
   batch; the ratio busy/idle shows whether receiving slows while inferring.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from tests.dicomgen import copy_with_new_uids, fracatlas_images, write_dx_study  # noqa: E402
from tests.nodeproc import NodeProcess, node_config  # noqa: E402
from tests.peers import Orthanc, free_port, require  # noqa: E402


def push_study(pacs: Orthanc, files: list[Path]) -> tuple[str, float]:
    ids = [pacs.upload(f)["ID"] for f in files]
    pacs.store_to("msknode", ids, synchronous=True)
    return pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID, time.perf_counter()


def wait_results(pacs: Orthanc, study_uid: str, expected: int, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = pacs.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})
        if len(ids) >= expected:
            return time.perf_counter()
        time.sleep(0.05)
    raise SystemExit(f"results of {study_uid} did not arrive within {timeout}s")


def make_study(out: Path, n: int, offset: int) -> list[Path]:
    # the fixtures the model reads: a study of one it declines as outside its domain gets no results
    return write_dx_study(out, fracatlas_images(n, offset=offset, readable=True), patient_id=f"BENCH{offset}")


def listener_mb_per_s(port: int, files: list[Path]) -> float:
    mb = sum(f.stat().st_size for f in files) / 1e6
    t0 = time.perf_counter()
    r = subprocess.run([require("storescu"), "-aec", "MSKNODE", "127.0.0.1", str(port), *map(str, files)],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    return mb / (time.perf_counter() - t0)


def bare_model_seconds(files: list[Path], model) -> float:
    """The model alone on the same images, files already read: decode, preprocess, encoder, heads, maps."""
    ds = [pydicom.dcmread(f) for f in files]
    for _ in range(3):  # warm-up: the first calls pay for allocator and kernel set-up
        model.predict_datasets(ds)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        model.predict_datasets(ds)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=50)
    ap.add_argument("--quiet", type=float, default=2.0)
    ap.add_argument("--listener-images", type=int, default=40)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    node_port = free_port()
    result: dict = {"quiet_seconds": args.quiet}
    # the reference first, alone on the machine: the bare model on the images of the latency studies
    from inference import load_bundle

    model = load_bundle(device="cpu")
    latency_studies = {n: [make_study(work / f"lat{n}_{rep}", n, offset + 5 * rep) for rep in range(2)]
                       for n, offset in ((1, 0), (4, 10))}
    bare = {n: bare_model_seconds(studies[0], model) for n, studies in latency_studies.items()}
    del model
    with Orthanc(work / "orthanc", aet="PACS", modalities={"msknode": ("MSKNODE", "127.0.0.1", node_port)}) as pacs:
        cfg = node_config(work / "node", port=node_port, quiet_seconds=args.quiet,
                          peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port},
                                 {"ae_title": "STORESCU", "host": "127.0.0.1"}],
                          pipeline={"enabled": True, "batch_size": 8},
                          routing={"rules": [{"name": "listener-benchmark", "match": {"calling_ae": ["STORESCU"]},
                                              "skip": True}]},
                          sending={"base_delay_seconds": 0.5, "max_delay_seconds": 2, "poll_seconds": 0.1})
        node = NodeProcess(work / "node", cfg)
        with node:
            time.sleep(5)  # let the inference worker load the model
            # 1. latency
            for n, studies in latency_studies.items():
                lat = []
                for files in studies:
                    uid, t_last = push_study(pacs, files)
                    # sources + heatmaps + presentation states + summary + SR
                    t_done = wait_results(pacs, uid, expected=3 * n + 2)
                    lat.append(t_done - t_last - args.quiet)
                result[f"latency_{n}_image_s"] = round(statistics.median(lat), 2)
                result[f"bare_model_{n}_image_s"] = round(bare[n], 3)
                result[f"latency_over_bare_{n}_image"] = round(statistics.median(lat) / bare[n], 1)
            # 3a. listener while idle
            big = write_dx_study(work / "listener", fracatlas_images(args.listener_images, offset=200), scale=4,
                                 patient_id="LISTENER")
            idle = listener_mb_per_s(node.port, big)
            # 2. sustained, with 3b. the listener measured while the model works
            studies = [make_study(work / f"s{i}", 1, 300 + i) for i in range(args.studies)]
            t0 = time.perf_counter()
            pushed = []
            pusher = threading.Thread(target=lambda: [pushed.append(push_study(pacs, s)[0]) for s in studies])
            pusher.start()
            time.sleep(args.quiet + 3)  # the model is at work
            busy_files = [copy_with_new_uids(f, f.with_suffix(".busy.dcm")) for f in big]
            busy = listener_mb_per_s(node.port, busy_files)
            pusher.join()
            for uid in pushed:
                wait_results(pacs, uid, expected=5)  # source, heatmap, presentation state, summary, SR
            elapsed = time.perf_counter() - t0
            result.update({
                "sustained_studies": args.studies, "sustained_seconds": round(elapsed, 1),
                "studies_per_minute": round(60 * args.studies / elapsed, 1),
                "listener_idle_MB_per_s": round(idle, 1), "listener_busy_MB_per_s": round(busy, 1),
                "listener_busy_over_idle": round(busy / idle, 2),
            })
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Crash safety: SIGKILL mid-stream loses nothing that was acknowledged; timers come back after restart."""

from __future__ import annotations

import json
import subprocess

import pydicom
import pytest

from tests.dicomgen import dataset_part, fracatlas_images, write_dx_study
from tests.peers import require


@pytest.mark.slow
def test_sigkill_mid_stream_loses_no_acknowledged_instance(make_node, tmp_path):
    # quiet period long enough that the studies are still receiving when the node dies
    # the only writer of its store (storage.shared false, also on PostgreSQL): the restart sweeps at once
    node = make_node(quiet_seconds=4, storage={"shared": False})
    files = []
    for i in range(3):  # three studies, 20 images each, ~1.7 MB per image
        files += write_dx_study(tmp_path / f"study{i}", fracatlas_images(20, offset=20 * i), scale=2,
                                patient_id=f"CRASH{i}")
    # a stable study before the crash must stay stable after it
    stable_first = write_dx_study(tmp_path / "before", fracatlas_images(2, offset=100))
    storescu = [require("storescu"), "-aec", "MSKNODE", "127.0.0.1", str(node.port)]
    assert subprocess.run([*storescu, *map(str, stable_first)], capture_output=True).returncode == 0
    node.wait_for(lambda: any(s["state"] == "stable" for s in node.studies()), timeout=30, what="first study stable")

    proc = subprocess.Popen([require("storescu"), "-v", "-nh", "-aec", "MSKNODE", "127.0.0.1", str(node.port),
                             *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    acknowledged: list[str] = []
    current = None
    killed = False
    for line in proc.stdout:
        if line.startswith("I: Sending file: "):
            current = line.split("I: Sending file: ", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            acknowledged.append(current)
            if len(acknowledged) == 25 and not killed:
                node.kill()  # SIGKILL in the middle of the stream
                killed = True
    proc.wait(timeout=60)
    assert killed, "the stream ended before the node could be killed"
    assert 25 <= len(acknowledged) < len(files)

    node.start()  # same configuration, same storage
    by_sop = {}
    for study in node.studies():
        for row in json.loads(node.cli("instances", study["StudyInstanceUID"], "--json").stdout):
            by_sop[row["SOPInstanceUID"]] = row
    for f in acknowledged:
        sop = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert sop in by_sop, f"{f} was acknowledged but is not indexed"
        stored = node.storage / by_sop[sop]["file_path"]
        assert dataset_part(stored) == dataset_part(f), f"{f} is damaged on disk"
    assert not list((node.storage / "tmp").iterdir())
    # and no stored file without its index row (a write the kill interrupted before indexing is swept)
    indexed = {row["file_path"] for row in by_sop.values()}
    on_disk = {p.relative_to(node.storage).as_posix() for p in (node.storage / "instances").rglob("*.dcm")}
    assert on_disk == indexed, on_disk ^ indexed

    # interrupted studies get their timers back and turn stable; the stable one stays stable
    node.wait_for(lambda: all(s["state"] == "stable" for s in node.studies()), timeout=60,
                  what="all studies stable after restart")
    assert "re-armed quiet-period timers" in node.log()
    st = node.status()
    assert st["studies_by_state"]["stable"] == st["studies"] >= 2

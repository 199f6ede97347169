"""The audit trail for one study end to end: the node (with its inference worker) receives a study from
storescu and sends its results to dcmtk's storescp; the audit file, and a syslog receiver (a UDP socket),
hold the expected DICOM audit messages; a refused association is a security alert; a changed
configuration at the next start is one, naming the key and not its value."""

from __future__ import annotations

import json
import re
import socket

import pydicom
import yaml

from tests.dicomgen import fracatlas_images, write_dx_study
from tests.peers import Storescp, echoscu, free_port, storescu

PATIENT_NAME = "AUDIT^PATIENT"
PATIENT_ID = "PID-AUDIT-0815"


def _records(node) -> list[dict]:
    path = node.storage / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _events(node, uid: str | None = None) -> list[str]:
    out = []
    for r in _records(node):
        objects = r.get("ParticipantObjectIdentification", [])
        if uid is None or any(o.get("ParticipantObjectID") == uid for o in objects):
            out.append(r["msknode_event"])
    return out


def test_audit_trail_of_one_study_end_to_end_and_syslog(make_node, tmp_path):
    syslog = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    syslog.bind(("127.0.0.1", 0))
    syslog.settimeout(0.2)
    with Storescp(tmp_path / "received", aet="STORESCU") as scp:
        node = make_node(quiet_seconds=1,
                         peers=[{"ae_title": "STORESCU", "host": "127.0.0.1", "port": scp.port}],
                         pipeline={"enabled": True, "batch_size": 4},
                         sending={"poll_seconds": 0.3, "timeout_seconds": 5},
                         audit={"syslog_host": "127.0.0.1", "syslog_port": syslog.getsockname()[1]})
        files = write_dx_study(tmp_path / "study", fracatlas_images(2), patient_id=PATIENT_ID,
                               patient_name=PATIENT_NAME)
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert storescu("127.0.0.1", node.port, files).returncode == 0
        assert echoscu("127.0.0.1", node.port, calling="MALLORY").returncode != 0
        node.wait_for(lambda: "results-sent" in _events(node, uid), timeout=120, interval=0.5,
                      what="the results sent, in the audit trail")
        n_results = len(scp.files())
    node.stop()

    records = _records(node)
    events = [r["msknode_event"] for r in records]
    assert events[0] == "application-start" and events[-1] == "application-stop"
    assert "configuration-change" not in events  # the first start has nothing to compare with
    # the association that brought the study: start, the study's instances, stop
    i = events.index("association-start")
    assert events[i:i + 3] == ["association-start", "instances-received", "association-stop"]
    start, received, stop = records[i:i + 3]
    for rec in (start, received, stop):
        assert rec["ActiveParticipant"][0]["UserID"] == "STORESCU"
        assert rec["ActiveParticipant"][0]["NetworkAccessPointID"] == "127.0.0.1"
        assert rec["ActiveParticipant"][1]["UserID"] == "MSKNODE"
    assert start["EventIdentification"]["EventTypeCode"][0]["csd-code"] == "110122"  # Login
    ident = received["EventIdentification"]
    assert ident["EventID"]["csd-code"] == "110104" and ident["EventActionCode"] == "C"
    assert ident["EventOutcomeIndicator"] == "0"
    study = received["ParticipantObjectIdentification"][0]
    assert study["ParticipantObjectID"] == uid and study["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"
    assert study["ParticipantObjectDescription"]["SOPClass"] == [
        {"UID": "1.2.840.10008.5.1.4.1.1.1.1", "NumberOfInstances": 2}]
    # the refused caller: a security alert
    refused = [r for r in records if r["msknode_event"] == "association-refused"]
    assert len(refused) == 1
    assert refused[0]["EventIdentification"]["EventID"]["csd-code"] == "110113"
    assert refused[0]["EventIdentification"]["EventTypeCode"][0]["csd-code"] == "110126"
    assert refused[0]["ActiveParticipant"][0]["UserID"] == "MALLORY"
    assert refused[0]["EventIdentification"]["EventOutcomeIndicator"] == "4"
    # the results, to their destination
    sent = [r for r in records if r["msknode_event"] == "results-sent"]
    assert sum(r["ParticipantObjectIdentification"][0]["ParticipantObjectDescription"]["SOPClass"][0]
               ["NumberOfInstances"] for r in sent) == n_results >= 4
    assert all(r["EventIdentification"]["EventActionCode"] == "R" and r["ActiveParticipant"][1]["UserID"] ==
               "STORESCU" and r["ActiveParticipant"][0]["UserIsRequestor"] is True for r in sent)
    assert events.index("results-sent") > i
    # never a patient's name or ID
    text = (node.storage / "audit" / "audit.jsonl").read_text()
    assert PATIENT_NAME not in text and "AUDIT^" not in text and PATIENT_ID not in text

    # the same records went to syslog as RFC 5424 messages
    datagrams = []
    while True:
        try:
            datagrams.append(syslog.recv(65535).decode())
        except TimeoutError:
            break
    syslog.close()
    assert len(datagrams) == len(records)
    first = re.match(r"^<85>1 (\S+) (\S+) msk-dicom-node (\d+) DICOM\+RFC3881 - (\{.*\})$", datagrams[0])
    assert first is not None, datagrams[0]
    assert json.loads(first.group(4)) == records[0]

    # a changed configuration at the next start: a security alert naming the key, not the value
    cfg = yaml.safe_load(node.config_path.read_text())
    cfg["study"]["quiet_seconds"] = 7.25
    cfg["audit"] = {}
    cfg["node"]["port"] = free_port()
    node.config_path.write_text(yaml.safe_dump(cfg))
    node.port = cfg["node"]["port"]
    node.start()
    node.stop()
    change = [r for r in _records(node) if r["msknode_event"] == "configuration-change"]
    assert len(change) == 1
    changed = change[0]["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"][0]["value"].split(",")
    assert {"study.quiet_seconds", "node.port", "audit.syslog_host", "audit.syslog_port"} <= set(changed)
    assert change[0]["EventIdentification"]["EventTypeCode"][0]["csd-code"] == "110131"
    assert "7.25" not in json.dumps(change[0])

"""The audit trail: DICOM audit messages (PS3.15 Annex A.5) as one JSON record per line.

Each record has the structure of the DICOM Audit Message schema (``EventIdentification``,
``ActiveParticipant``, ``AuditSourceIdentification``, ``ParticipantObjectIdentification``), coded
with the DCM codes of PS3.16, plus ``msknode_event``, a short name to search for. Written to a
rotating file (``audit.path``) and, when ``audit.syslog_host`` is set, sent to a syslog receiver
as RFC 5424 messages over UDP (facility authpriv, severity notice, MSGID ``DICOM+RFC3881``), as
IHE ATNA expects of a secure node.

Events:

========================  ==============================================  ====================
``msknode_event``         EventID / EventTypeCode                          when
========================  ==============================================  ====================
application-start/stop    110100 Application Activity / 110120, 110121     node start, stop
configuration-change      110113 Security Alert / 110131 Software Conf.    start with a changed
                                                                           configuration
association-start/stop    110114 User Authentication / 110122, 110123      a peer's association
association-refused       110113 Security Alert / 110126 Node Auth.        refused caller
instances-received        110104 DICOM Instances Transferred (action C)    per study, at the
                                                                           association's end
results-sent              110104 DICOM Instances Transferred (action R)    per study and
                                                                           destination
========================  ==============================================  ====================

No patient name or ID is written: studies are named by their Study Instance UID.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import logging.handlers
import os
import socket
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("dicom_node.audit")

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"


def _code(code: str, meaning: str) -> dict:
    return {"csd-code": code, "codeSystemName": "DCM", "originalText": meaning}


APPLICATION_ACTIVITY = _code("110100", "Application Activity")
APPLICATION_START = _code("110120", "Application Start")
APPLICATION_STOP = _code("110121", "Application Stop")
SECURITY_ALERT = _code("110113", "Security Alert")
SOFTWARE_CONFIGURATION = _code("110131", "Software Configuration")
NODE_AUTHENTICATION = _code("110126", "Node Authentication")
USER_AUTHENTICATION = _code("110114", "User Authentication")
LOGIN = _code("110122", "Login")
LOGOUT = _code("110123", "Logout")
INSTANCES_TRANSFERRED = _code("110104", "DICOM Instances Transferred")
APPLICATION = _code("110150", "Application")
SOURCE_ROLE = _code("110153", "Source Role ID")
DESTINATION_ROLE = _code("110152", "Destination Role ID")
STUDY_UID = _code("110180", "Study Instance UID")


class _Rfc5424:
    """One UDP datagram per record: ``<85>1 TIMESTAMP HOST APP PROCID DICOM+RFC3881 - MSG``."""

    PRI = 10 * 8 + 5  # authpriv.notice

    def __init__(self, host: str, port: int):
        self.address = (host, port)
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.hostname = socket.gethostname() or "-"

    def send(self, when: str, message: str) -> None:
        line = f"<{self.PRI}>1 {when} {self.hostname} msk-dicom-node {os.getpid()} DICOM+RFC3881 - {message}"
        try:
            self.sock.sendto(line.encode("utf-8")[:65000], self.address)
        except OSError as exc:
            log.warning("audit record not sent to syslog %s:%d: %s", *self.address, exc.strerror)

    def close(self) -> None:
        self.sock.close()


class AuditTrail:
    """Writes audit records; does nothing until :meth:`configure` (tools, tests of other parts)."""

    def __init__(self) -> None:
        self.enabled = False
        self.node_ae = "MSKNODE"
        self.source_id = "MSKNODE"
        self._file: logging.Logger | None = None
        self._handler: logging.Handler | None = None
        self._syslog: _Rfc5424 | None = None
        self._lock = threading.Lock()
        self.path: Path | None = None

    def configure(self, cfg) -> None:
        """Open the file (and the syslog socket) of ``cfg.audit``; a second call replaces them."""
        self.close()
        a = cfg.audit
        self.node_ae = cfg.node.ae_title
        self.source_id = f"{cfg.node.ae_title}@{socket.gethostname()}"
        if not a.enabled:
            return
        self.path = Path(a.path) if a.path is not None else Path(cfg.storage.path) / "audit" / "audit.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(self.path, maxBytes=a.max_bytes, backupCount=a.backup_count,
                                                       encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.getLogger("msknode.audit.trail")
        logger.propagate = False
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        self._file, self._handler = logger, handler
        if a.syslog_host:
            self._syslog = _Rfc5424(a.syslog_host, a.syslog_port)
        self.enabled = True

    def close(self) -> None:
        with self._lock:
            if self._handler is not None:
                self._handler.close()
            if self._syslog is not None:
                self._syslog.close()
            self._file = self._handler = self._syslog = None
            self.enabled = False

    # -- records -----------------------------------------------------------------------
    def _node(self, requestor: bool, role: dict | None = None, address: str | None = None) -> dict:
        p: dict[str, Any] = {"UserID": self.node_ae, "AlternativeUserID": str(os.getpid()),
                             "UserIsRequestor": requestor, "UserTypeCode": APPLICATION}
        if role is not None:
            p["RoleIDCode"] = role
        if address:
            p["NetworkAccessPointID"], p["NetworkAccessPointTypeCode"] = address, "2"
        return p

    @staticmethod
    def _peer(ae: str, address: str | None, requestor: bool, role: dict | None = None) -> dict:
        p: dict[str, Any] = {"UserID": ae, "UserIsRequestor": requestor, "UserTypeCode": APPLICATION}
        if role is not None:
            p["RoleIDCode"] = role
        if address:
            host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
            p["NetworkAccessPointID"], p["NetworkAccessPointTypeCode"] = host, "2"
        return p

    @staticmethod
    def _study(uid: str, instances: int | None = None, sop_classes: dict[str, int] | None = None) -> dict:
        o: dict[str, Any] = {"ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3",
                             "ParticipantObjectIDTypeCode": STUDY_UID, "ParticipantObjectID": uid}
        if instances is not None:
            o["ParticipantObjectDescription"] = {"SOPClass": [{"UID": c, "NumberOfInstances": n}
                                                              for c, n in sorted((sop_classes or {}).items())]
                                                 or [{"NumberOfInstances": instances}]}
        return o

    def record(self, event: str, event_id: dict, *, action: str = "E", outcome: str = SUCCESS,
               type_code: dict | None = None, participants: list[dict], objects: list[dict] | None = None,
               detail: str | None = None) -> None:
        if not self.enabled:
            return
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        ident: dict[str, Any] = {"EventID": event_id, "EventActionCode": action, "EventDateTime": now,
                                 "EventOutcomeIndicator": outcome}
        if type_code is not None:
            ident["EventTypeCode"] = [type_code]
        if detail:
            ident["EventOutcomeDescription"] = detail
        rec: dict[str, Any] = {"msknode_event": event, "EventIdentification": ident, "ActiveParticipant": participants,
                               "AuditSourceIdentification": {"AuditSourceID": self.source_id,
                                                             "AuditSourceTypeCode": "4"}}
        if objects:
            rec["ParticipantObjectIdentification"] = objects
        line = json.dumps(rec, sort_keys=True, separators=(",", ":"))
        with self._lock:
            if self._file is not None:
                self._file.info(line)
            if self._syslog is not None:
                self._syslog.send(now, line)

    # -- the events ----------------------------------------------------------------------
    def application(self, started: bool) -> None:
        self.record("application-start" if started else "application-stop", APPLICATION_ACTIVITY,
                    type_code=APPLICATION_START if started else APPLICATION_STOP,
                    participants=[self._node(False, _code("110151", "Application Launcher"))])

    def configuration(self, cfg) -> list[str]:
        """At start-up: compare the configuration in effect with the one of the previous start (kept
        beside the audit file as digests per key, never values); a change is a Security Alert naming
        the keys. Returns the keys that changed."""
        if not self.enabled or self.path is None:
            return []
        state = self.path.parent / "last-config.json"
        now = config_digests(cfg)
        try:
            before = json.loads(state.read_text())
        except (OSError, ValueError):
            before = None
        changed = sorted(k for k in set(now) | set(before or {}) if (before or {}).get(k) != now.get(k))
        if before is not None and changed:
            self.record("configuration-change", SECURITY_ALERT, type_code=SOFTWARE_CONFIGURATION,
                        participants=[self._node(False)],
                        objects=[{"ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "13",
                                  "ParticipantObjectIDTypeCode": _code("110100", "Application Activity"),
                                  "ParticipantObjectID": str(getattr(cfg, "source", None) or "<defaults>"),
                                  "ParticipantObjectDetail": [{"type": "changed-keys",
                                                               "value": ",".join(changed)}]}],
                        detail=f"configuration changed since the last start: {', '.join(changed)}")
        try:
            tmp = state.with_suffix(".tmp")
            tmp.write_text(json.dumps(now, sort_keys=True))
            os.replace(tmp, state)
        except OSError as exc:
            log.warning("audit: cannot keep the configuration digests in %s: %s", state, exc.strerror)
        return changed if before is not None else []

    def association(self, started: bool, calling_ae: str, address: str | None) -> None:
        self.record("association-start" if started else "association-stop", USER_AUTHENTICATION,
                    type_code=LOGIN if started else LOGOUT,
                    participants=[self._peer(calling_ae, address, True), self._node(False)])

    def refused(self, calling_ae: str, address: str | None, why: str) -> None:
        self.record("association-refused", SECURITY_ALERT, outcome=MINOR_FAILURE, type_code=NODE_AUTHENTICATION,
                    participants=[self._peer(calling_ae, address, True), self._node(False)],
                    detail=f"association refused: {why}")

    def received(self, calling_ae: str, address: str | None, study_uid: str, instances: int,
                 sop_classes: dict[str, int] | None = None, failed: int = 0) -> None:
        self.record("instances-received", INSTANCES_TRANSFERRED, action="C",
                    outcome=SUCCESS if not failed else MINOR_FAILURE,
                    participants=[self._peer(calling_ae, address, True, SOURCE_ROLE),
                                  self._node(False, DESTINATION_ROLE)],
                    objects=[self._study(study_uid, instances, sop_classes)],
                    detail=f"{failed} instance(s) refused" if failed else None)

    def sent(self, destination: str, address: str | None, study_uid: str, instances: int, failed: int,
             error: str | None = None) -> None:
        self.record("results-sent", INSTANCES_TRANSFERRED, action="R",
                    outcome=SUCCESS if not failed else (MINOR_FAILURE if instances else SERIOUS_FAILURE),
                    participants=[self._node(True, SOURCE_ROLE), self._peer(destination, address, False,
                                                                          DESTINATION_ROLE)],
                    objects=[self._study(study_uid, instances)],
                    detail=(f"{instances} sent, {failed} failed: {error}" if failed else None))


def config_digests(cfg) -> dict[str, str]:
    """Every leaf key of the configuration -> a short digest of its value (secrets never in clear)."""
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        else:
            out[key] = hashlib.sha256(json.dumps(value, default=str).encode()).hexdigest()[:16]

    walk(cfg.model_dump(mode="json"), "")
    return out


#: the node process's audit trail
AUDIT = AuditTrail()

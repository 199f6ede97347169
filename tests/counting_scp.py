"""A counting destination for the tests: a small pynetdicom SCP that records every C-STORE it receives.

It answers C-ECHO, C-STORE (every storage SOP class, every transfer syntax)
and Study Root C-FIND (STUDY, SERIES and IMAGE level) over what it received.
Each C-STORE is recorded (SOP Instance UID -> count, SOP class, study, series,
transfer syntax, association number, arrival order) and the record is written
to a JSON file (atomically) *before* the response goes out, as a PACS that
stores first and answers second. A restart on the same file keeps what it
received. Run it as its own process, independent of the node::

    python -m tests.counting_scp --port 11119 --aet COUNTER --out received.json [--delay 0.5] [--no-find]

Options for failure tests: ``--delay`` (seconds before each C-STORE response),
``--status`` (answer every C-STORE with this status and record nothing),
``--no-find`` (no C-FIND: a destination that cannot be asked), ``--syntaxes`` (accept only these
transfer syntaxes for storage).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

REPO = Path(__file__).resolve().parent.parent


class CountingSCP:
    """In-process counting destination; :meth:`counts` and :meth:`received` read what it recorded."""

    def __init__(self, port: int, aet: str = "COUNTER", out: Path | str | None = None, *, delay: float = 0.0,
                 status: int = 0x0000, find: bool = True, bind: str = "127.0.0.1",
                 syntaxes: list[str] | None = None):
        self.port = port
        self.syntaxes = list(syntaxes) if syntaxes else list(ALL_TRANSFER_SYNTAXES)
        self.aet = aet
        self.out = Path(out) if out else None
        self.delay = delay
        self.status = status
        self.find = find
        self.bind = bind
        self._lock = threading.Lock()
        self._assoc_ids: dict[int, int] = {}
        self.state: dict = {"instances": {}, "order": [], "associations": 0, "stores": 0, "finds": 0}
        if self.out and self.out.exists():
            self.state = json.loads(self.out.read_text())
        self.server = None

    # -- results -------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self._lock:
            return {uid: rec["count"] for uid, rec in self.state["instances"].items()}

    def received(self) -> dict[str, dict]:
        with self._lock:
            return json.loads(json.dumps(self.state["instances"]))

    def _save(self) -> None:
        if self.out is None:
            return
        tmp = self.out.with_suffix(self.out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.out)

    # -- server --------------------------------------------------------------
    def start(self) -> CountingSCP:
        ae = AE(self.aet)
        ae.require_called_aet = True
        ae.maximum_pdu_size = 0
        ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 60
        ae.add_supported_context(Verification)
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, self.syntaxes)
        if self.find:
            ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        handlers = [(evt.EVT_C_ECHO, lambda e: 0x0000), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_ESTABLISHED, self._on_established)]
        if self.find:
            handlers.append((evt.EVT_C_FIND, self._on_find))
        self.server = ae.start_server((self.bind, self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def __enter__(self) -> CountingSCP:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _on_established(self, event) -> None:
        with self._lock:
            self.state["associations"] += 1
            self._assoc_ids[id(event.assoc)] = self.state["associations"]
            self._save()

    def _on_store(self, event) -> int:
        if self.status != 0x0000:
            return self.status
        ds = event.dataset
        uid = str(ds.SOPInstanceUID)
        with self._lock:
            self.state["stores"] += 1
            rec = self.state["instances"].setdefault(uid, {"count": 0})
            rec["count"] += 1
            rec.update(SOPClassUID=str(ds.SOPClassUID), AffectedSOPClassUID=str(event.request.AffectedSOPClassUID),
                       StudyInstanceUID=str(ds.get("StudyInstanceUID", "")),
                       SeriesInstanceUID=str(ds.get("SeriesInstanceUID", "")),
                       TransferSyntaxUID=str(event.context.transfer_syntax),
                       calling_ae=str(event.assoc.requestor.ae_title))
            rec.setdefault("associations", []).append(self._assoc_ids.get(id(event.assoc), 0))
            self.state["order"].append(uid)
            self._save()
        if self.delay:
            time.sleep(self.delay)
        return 0x0000

    def _on_find(self, event):
        q = event.identifier
        with self._lock:
            self.state["finds"] += 1
            self._save()
            records = list(self.state["instances"].items())
        level = str(q.get("QueryRetrieveLevel", "")).upper()
        if level not in ("STUDY", "SERIES", "IMAGE"):
            yield 0xC000, None
            return

        def match(key: str, value: str) -> bool:
            want = q.get(key)
            if want in (None, ""):
                return True
            wanted = list(want) if isinstance(want, (list, tuple)) or type(want).__name__ == "MultiValue" \
                else str(want).split("\\")
            return value in [str(w) for w in wanted]

        seen = set()
        for uid, rec in records:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            if not (match("StudyInstanceUID", rec["StudyInstanceUID"])
                    and (level == "STUDY" or match("SeriesInstanceUID", rec["SeriesInstanceUID"]))
                    and (level != "IMAGE" or match("SOPInstanceUID", uid))):
                continue
            key = {"STUDY": rec["StudyInstanceUID"], "SERIES": rec["SeriesInstanceUID"]}.get(level, uid)
            if key in seen:
                continue
            seen.add(key)
            ident = Dataset()
            ident.QueryRetrieveLevel = level
            ident.StudyInstanceUID = rec["StudyInstanceUID"]
            if level in ("SERIES", "IMAGE"):
                ident.SeriesInstanceUID = rec["SeriesInstanceUID"]
            if level == "IMAGE":
                ident.SOPInstanceUID = uid
                ident.SOPClassUID = rec["SOPClassUID"]
            yield 0xFF00, ident
        yield 0x0000, None


class CountingSCPProcess:
    """``python -m tests.counting_scp`` as a subprocess; reads its JSON record."""

    def __init__(self, out: Path | str, *, port: int | None = None, aet: str = "COUNTER", delay: float = 0.0,
                 status: int = 0x0000, find: bool = True, syntaxes: list[str] | None = None):
        from tests.peers import free_port

        self.out = Path(out)
        self.port = port or free_port()
        self.aet = aet
        self.args = [sys.executable, "-m", "tests.counting_scp", "--port", str(self.port), "--aet", aet,
                     "--out", str(self.out), "--delay", str(delay), "--status", str(status)] + \
                    ([] if find else ["--no-find"]) + (["--syntaxes", ",".join(syntaxes)] if syntaxes else [])
        self.proc: subprocess.Popen | None = None

    def start(self) -> CountingSCPProcess:
        from tests.peers import wait_for_port

        log = open(self.out.with_suffix(".log"), "ab")
        self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        from tests.peers import stop_process

        stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> CountingSCPProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def state(self) -> dict:
        try:
            return json.loads(self.out.read_text())
        except FileNotFoundError:
            return {"instances": {}, "order": [], "associations": 0, "stores": 0, "finds": 0}

    def counts(self) -> dict[str, int]:
        return {uid: rec["count"] for uid, rec in self.state()["instances"].items()}

    def received(self) -> dict[str, dict]:
        return self.state()["instances"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--aet", default="COUNTER")
    p.add_argument("--out", required=True, help="JSON file with what was received (kept across restarts)")
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--delay", type=float, default=0.0, help="seconds to wait before each C-STORE response")
    p.add_argument("--status", type=lambda v: int(v, 0), default=0,
                   help="answer every C-STORE with this status (0: store and count)")
    p.add_argument("--no-find", action="store_true", help="do not offer C-FIND")
    p.add_argument("--syntaxes", default="", help="comma-separated transfer syntaxes accepted for storage "
                                                  "(default: all)")
    args = p.parse_args(argv)
    scp = CountingSCP(args.port, args.aet, args.out, delay=args.delay, status=args.status, find=not args.no_find,
                      bind=args.bind, syntaxes=[t for t in args.syntaxes.split(",") if t])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    scp.start()
    print(f"counting SCP {args.aet} on {args.bind}:{args.port}, recording to {args.out}", flush=True)
    stop.wait()
    scp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

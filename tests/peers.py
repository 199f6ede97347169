"""Real DICOM peers for the tests: Orthanc as the PACS, dcmtk's command-line tools.

Everything here starts real programs on loopback, on free ports, in a
temporary directory, and stops them again. Nothing is simulated.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def wait_until(predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.1,
               context=lambda: ""):
    """Poll ``predicate`` until it returns something true (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last={last!r}{context()}")


def stop_process(proc: subprocess.Popen | None, timeout: float = 20.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit status (None if there was no process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def require(program: str) -> str:
    """Path of ``program``; fails (never skips) when a required real peer is missing."""
    path = shutil.which(program)
    if path is None:
        raise RuntimeError(f"{program} is not installed: .ci/run installs dcmtk, orthanc and dicom3tools")
    return path


#: where Debian's orthanc-dicomweb package puts the plugin (the first that exists is used)
DICOMWEB_PLUGIN_PATHS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")


def dicomweb_plugin() -> Path | None:
    """Orthanc's DICOMweb plugin, or None when it is not installed (Debian: orthanc-dicomweb)."""
    candidates = [Path(p) for p in DICOMWEB_PLUGIN_PATHS]
    candidates += sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))
    return next((p for p in candidates if p.is_file()), None)


@dataclass
class Orthanc:
    """An Orthanc server in ``workdir`` with DICOM on ``dicom_port`` and REST on ``http_port``.

    ``modalities`` maps Orthanc's modality id to (AE title, host, port). ``dicomweb`` loads the
    DICOMweb plugin: QIDO-RS/WADO-RS/STOW-RS under ``/dicom-web/`` and WADO-URI at ``/wado``.
    """

    workdir: Path
    aet: str = "PACS"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    dicom_port: int = 0
    http_port: int = 0
    proc: subprocess.Popen | None = None
    dicomweb: bool = False

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(self._dicomweb_plugin())] if self.dicomweb else [],
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "StableAge": 2,
            "HttpTimeout": 60,
            "DicomScuTimeout": 30,
            "SaveJobs": False,
            "StorageCompression": False,
        }
        if self.dicomweb:
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                               "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"}
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(cfg, indent=2))
        return path

    @staticmethod
    def _dicomweb_plugin() -> Path:
        plugin = dicomweb_plugin()
        if plugin is None:
            raise RuntimeError("Orthanc's DICOMweb plugin is not installed: .ci/run installs orthanc-dicomweb")
        return plugin

    def start(self) -> Orthanc:
        exe = require("Orthanc")
        cfg = self.write_config()
        log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([exe, str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        wait_for_port(self.http_port, proc=self.proc)
        wait_for_port(self.dicom_port, proc=self.proc)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- REST --------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                 timeout: float = 120.0) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def get(self, path: str):
        return json.loads(self._request("GET", path))

    def get_bytes(self, path: str) -> bytes:
        return self._request("GET", path)

    def post(self, path: str, payload) -> object:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        out = self._request("POST", path, body, "application/dicom" if isinstance(payload, bytes)
                            else "application/json")
        return json.loads(out) if out else None

    def put(self, path: str, payload) -> object:
        out = self._request("PUT", path, json.dumps(payload).encode(), "application/json")
        return json.loads(out) if out else None

    def delete(self, path: str) -> None:
        self._request("DELETE", path)

    def upload(self, file: Path) -> dict:
        """Store a DICOM file in Orthanc over REST (the way a PACS gets its images)."""
        return self.post("/instances", Path(file).read_bytes())

    def store_to(self, modality: str, resources: list[str], synchronous: bool = True) -> object:
        """Orthanc pushes ``resources`` to ``modality`` over C-STORE (REST /modalities/{id}/store)."""
        return self.post(f"/modalities/{modality}/store",
                         {"Resources": resources, "Synchronous": synchronous})

    def instances(self) -> list[str]:
        return self.get("/instances")


#: storescu's option that proposes a file's own (compressed) transfer syntax
STORESCU_TS_OPTION = {
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.1.99": "-xd",
}


def _file_transfer_syntax(path) -> str:
    import pydicom

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta.TransferSyntaxUID)
    except Exception:
        return ""


def storescu(host: str, port: int, files: list[Path | str], *, calling: str = "STORESCU",
             called: str = "MSKNODE", extra: list[str] | None = None, timeout: float = 300.0
             ) -> subprocess.CompletedProcess:
    """Send ``files`` with dcmtk's storescu, each in its own transfer syntax (no conversion).

    storescu proposes one family of transfer syntaxes per run, so files are sent
    in one association per transfer syntax, in order of first appearance. ``-nh``
    goes on after a failed store, as a modality sending a batch does. Returns the
    last run's result, with the outputs of all runs joined.
    """
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(_file_transfer_syntax(f), []).append(str(f))
    out, err, rc, args = [], [], 0, []
    for ts, group in groups.items():
        opt = STORESCU_TS_OPTION.get(ts)
        args = [require("storescu"), "-aet", calling, "-aec", called, "-nh", *([opt, "-R"] if opt else []),
                *(extra or []), host, str(port), *group]
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        out.append(r.stdout)
        err.append(r.stderr)
        rc = rc or r.returncode
    return subprocess.CompletedProcess(args, rc, "".join(out), "".join(err))


def echoscu(host: str, port: int, *, calling: str = "STORESCU", called: str = "MSKNODE",
            timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([require("echoscu"), "-aet", calling, "-aec", called, host, str(port)],
                          capture_output=True, text=True, timeout=timeout)


def dciodvfy(path: Path | str) -> subprocess.CompletedProcess:
    """dicom3tools' validator; the caller checks returncode and the Error lines."""
    return subprocess.run([require("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)


class Storescp:
    """dcmtk's storescp writing what it receives to ``out_dir``.

    ``bit_preserving`` (``+B``) writes the data set exactly as it came over the
    network: the reference for "what arrived" in byte-identity checks.
    """

    def __init__(self, out_dir: Path, *, port: int | None = None, aet: str = "STORESCP",
                 bit_preserving: bool = False, extra: list[str] | None = None):
        self.out_dir = Path(out_dir)
        self.port = port or free_port()
        self.aet = aet
        self.args = [require("storescp"), "-aet", aet, "-od", str(self.out_dir), *(["+B"] if bit_preserving else []),
                     "+xa", *(extra or []), str(self.port)]
        self.proc: subprocess.Popen | None = None

    def start(self) -> Storescp:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def __enter__(self) -> Storescp:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

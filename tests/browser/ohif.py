"""OHIF Viewer against Orthanc's DICOMweb, driven by headless chromium: does a viewer show the node's SR?

One origin serves everything, so there is no CORS: a small threaded HTTP server
serves OHIF's prebuilt single-page app (``tests/browser/fetch_ohif.py`` fetches it)
with our own ``app-config.js``, and passes ``/dicom-web/*`` and ``/wado`` through to
an Orthanc started with its DICOMweb plugin. Playwright drives Debian's chromium
(``/usr/bin/chromium``); requests to any other origin are aborted, so the viewer
cannot reach the internet.

Reusable pieces:

* ``OhifStack``: context manager, Orthanc + DICOMweb + the server; ``upload(files)``, ``viewer_url(uid)``.
* ``browser_page()``: context manager, a chromium page confined to one origin.
* ``open_sr(page, url, out_dir)``: opens the study, loads its SR, returns an ``SrView``
  (console lines, measurement panel text, screenshots).

And a CLI for manual checks::

    python -m tests.browser.ohif --files DIR_OR_FILES... --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from tests.browser.fetch_ohif import OHIF_VERSION, have_ohif, ohif_dist
from tests.peers import Orthanc, dicomweb_plugin, free_port

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33",
              "1.2.840.10008.5.1.4.1.1.88.34"}

#: console lines that mean the viewer did not take the SR (case-sensitive substrings)
BAD_CONSOLE_PATTERNS = ("TypeError", "is not rehydratable", "no SCOORD", "Cannot read properties", "ReferenceError",
                        "Uncaught", "Something went wrong", "Unable to generate tool state",
                        "No spatial coordinates group found", "not currently supported",
                        "No measurements found which were rehydratable")

#: our app-config.js: one DICOMweb data source on this origin; nothing that reaches out to the internet
APP_CONFIG = """/** written by tests/browser/ohif.py */
window.config = {
  name: 'msk-dicom-node test',
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (test)',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
"""


# -- what is needed, and what is missing ---------------------------------------------------------------------
def chromium_path() -> str | None:
    return next((p for p in CHROMIUM_PATHS if Path(p).is_file()), None) or shutil.which("chromium")


def missing() -> list[str]:
    """What this harness needs and does not find, each with what to install (empty: all there)."""
    out = []
    if not have_ohif():
        out.append(f"OHIF Viewer {OHIF_VERSION} (run `make ohif`, which needs npm)")
    if chromium_path() is None:
        out.append("chromium (apt-get install chromium; .ci/run installs it)")
    if dicomweb_plugin() is None:
        out.append("Orthanc's DICOMweb plugin (apt-get install orthanc-dicomweb; .ci/run installs it)")
    if shutil.which("Orthanc") is None:
        out.append("Orthanc (apt-get install orthanc; .ci/run installs it)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        out.append("Playwright for Python (pip install -e '.[test]'; never `playwright install`)")
    return out


# -- one origin: OHIF's files, our app-config.js, Orthanc's DICOMweb -------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    server: _OhifHttpServer
    protocol_version = "HTTP/1.1"
    PROXIED = ("/dicom-web/", "/wado")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if self.server.log is not None:
            self.server.log.append(f"{self.address_string()} {format % args}")

    def _common_headers(self) -> None:
        # cross-origin isolation lets OHIF use SharedArrayBuffer; everything is same-origin, so nothing breaks
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path.startswith(self.PROXIED) or path == "/wado":
            self._proxy()
        elif path == "/app-config.js":
            self._send(200, APP_CONFIG.encode(), "application/javascript")
        else:
            self._file(path)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self._common_headers()
        self.end_headers()
        self.wfile.write(body)

    def _file(self, path: str) -> None:
        root = self.server.dist
        rel = urllib.request.url2pathname(path).lstrip("/")
        target = (root / rel).resolve() if rel else root / "index.html"
        if not target.is_relative_to(root.resolve()):
            self._send(403, b"forbidden", "text/plain")
            return
        if not target.is_file():
            if "." in Path(rel).name:  # a missing asset stays missing
                self._send(404, b"not found", "text/plain")
                return
            target = root / "index.html"  # the single-page app's routes: /viewer, /viewer/..., /
        ctype = _CONTENT_TYPES.get(target.suffix, "application/octet-stream")
        self._send(200, target.read_bytes(), ctype)

    def _proxy(self) -> None:
        req = urllib.request.Request(self.server.upstream + self.path, method="GET")
        for h in ("Accept", "Range"):
            if self.headers.get(h):
                req.add_header(h, self.headers[h])
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                status, body, headers = resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as e:
            status, body, headers = e.code, e.read(), e.headers
        except OSError as e:
            self._send(502, f"proxy: {e}".encode(), "text/plain")
            return
        self._send(status, body, headers.get("Content-Type", "application/octet-stream"))


_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "application/javascript", ".mjs": "application/javascript",
    ".css": "text/css", ".json": "application/json", ".wasm": "application/wasm", ".svg": "image/svg+xml",
    ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2", ".woff": "font/woff", ".txt": "text/plain",
    ".xml": "application/xml",
}


class _OhifHttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, dist: Path, upstream: str, log: list[str] | None = None):
        super().__init__(("127.0.0.1", port), _Handler)
        self.dist = dist
        self.upstream = upstream.rstrip("/")
        self.log = log


class OhifServer:
    """OHIF's ``dist`` on ``http://127.0.0.1:port``, with ``/dicom-web`` and ``/wado`` proxied to ``upstream``."""

    def __init__(self, upstream: str, *, dist: Path | None = None, port: int | None = None):
        self.dist = dist or ohif_dist()
        self.port = port or free_port()
        self.requests: list[str] = []
        self._server = _OhifHttpServer(self.port, self.dist, upstream, self.requests)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OhifServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=10)

    def __enter__(self) -> OhifServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class OhifStack:
    """Orthanc with DICOMweb in ``workdir`` and OHIF in front of it, on one origin."""

    def __init__(self, workdir: Path, *, modalities: dict[str, tuple[str, str, int]] | None = None):
        self.orthanc = Orthanc(Path(workdir) / "orthanc", aet="PACS", modalities=modalities or {}, dicomweb=True)
        self.server: OhifServer | None = None

    def __enter__(self) -> OhifStack:
        self.orthanc.start()
        try:
            self.server = OhifServer(self.orthanc.url).start()
        except BaseException:
            self.orthanc.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server:
            self.server.stop()
        self.orthanc.stop()

    @property
    def url(self) -> str:
        assert self.server is not None, "the stack is not started"
        return self.server.url

    def upload(self, files: list[Path]) -> None:
        for f in files:
            self.orthanc.upload(f)

    def viewer_url(self, study_uid: str) -> str:
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"


# -- the browser ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def browser_page(origin: str, *, width: int = 1600, height: int = 1000) -> Iterator[Any]:
    """A headless chromium page that may talk to ``origin`` only (everything else is aborted)."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": width, "height": height}, service_workers="block")
            context.route(re.compile(r"^(?!" + re.escape(origin) + r"/)(https?|wss?)://"),
                          lambda route: route.abort())
            yield context.new_page()
        finally:
            browser.close()


@dataclass
class SrView:
    """What the viewer did with the SR."""

    console: list[str] = field(default_factory=list)  # "[type] text (url:line)", pageerrors as "[pageerror] ..."
    panel_text: str = ""  # the measurement panel's text after the SR was loaded
    screenshots: list[Path] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)  # what was clicked, for the failure message

    def page_errors(self) -> list[str]:
        return [line for line in self.console if line.startswith("[pageerror]")]

    def bad_lines(self, patterns: tuple[str, ...] = BAD_CONSOLE_PATTERNS) -> list[str]:
        """Page errors, every console error, and console lines of any level that match one of ``patterns``.

        Any level: OHIF's error boundary reports the TypeError that breaks the viewer at debug level.
        """
        return self.page_errors() + [line for line in self.console if not line.startswith("[pageerror]")
                                     and (line.startswith("[error]") or any(p in line for p in patterns))]

    def bad_summary(self, patterns: tuple[str, ...] = BAD_CONSOLE_PATTERNS, width: int = 300) -> str:
        """The bad lines, each once with its count, first lines only, without the script locations."""
        counts: dict[str, int] = {}
        for line in self.bad_lines(patterns):
            key = _URL_SUFFIX.sub("", line.splitlines()[0])[:width]
            counts[key] = counts.get(key, 0) + 1
        return "\n".join(f"{n:4d} x {line}" for line, n in counts.items())

    def report(self, *, full: bool = False) -> str:
        """Steps, panel text, screenshots and the console (without OHIF's chatter unless ``full``)."""
        lines = self.console if full else [line for line in self.console if not line.startswith(_CHATTER)]
        return "\n".join(["steps: " + " -> ".join(self.steps), "measurement panel: " + repr(self.panel_text[:600]),
                          "screenshots: " + ", ".join(map(str, self.screenshots)), "console:", *lines])


_URL_SUFFIX = re.compile(r" \(https?://[^ ]*:\d*\)$")
_CHATTER = ("[log]", "[timeEnd]", "[time]", "[info]")


def _collect_console(page: Any, view: SrView) -> None:
    def on_console(msg: Any) -> None:
        loc = msg.location or {}
        where = f" ({loc.get('url', '')}:{loc.get('lineNumber', '')})" if loc.get("url") else ""
        view.console.append(f"[{msg.type}] {msg.text}{where}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: view.console.append(f"[pageerror] {exc}"))


def _shot(page: Any, view: SrView, out_dir: Path, name: str) -> None:
    path = out_dir / f"{len(view.screenshots):02d}-{name}.png"
    page.screenshot(path=str(path))
    view.screenshots.append(path)


def _panel_text(page: Any) -> str:
    """The measurement panel's text ("" when it is not open)."""
    panel = page.locator('[data-cy="trackedMeasurements-panel"]')
    return str(panel.first.inner_text(timeout=5000)) if panel.count() else ""


def open_sr(page: Any, url: str, out_dir: Path, *, timeout_s: float = 60.0, settle_s: float = 3.0) -> SrView:
    """Open the viewer at ``url`` (one study), load the study's SR, return what the viewer did.

    The SR is loaded the way a reader does it: the measurement panel is opened, the SR's entry in the
    study browser is double-clicked (OHIF puts it in the viewport and draws its annotations), and the
    tracking prompt ("Do you want to continue tracking measurements for this study?") is answered Yes,
    which hydrates the SR's measurements into the measurement panel. Screenshots go to ``out_dir``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    view = SrView()
    _collect_console(page, view)
    ms = int(timeout_s * 1000)
    try:
        page.goto(url, wait_until="domcontentloaded", timeout=ms)
        view.steps.append("opened the study")
        page.wait_for_selector('[data-cy="study-browser-thumbnail"]', timeout=ms)
        page.wait_for_selector('[data-cy="viewport-pane"]', timeout=ms)
        time.sleep(settle_s)
        skip = page.get_by_text("Skip all", exact=True)  # the first-visit tour covers the toolbar
        if skip.count():
            skip.first.click()
            view.steps.append("skipped the tour")
        page.locator('[data-cy="trackedMeasurements-btn"]').first.click()
        view.steps.append("opened the measurement panel")
        _shot(page, view, out_dir, "study")
        sr_entry = page.locator('[data-cy="study-browser-thumbnail-no-image"]').filter(
            has=page.locator('[data-cy="series-modality-label"]', has_text=re.compile(r"^SR$")))
        if not sr_entry.count():
            view.steps.append("no SR in the study browser")
            return view
        sr_entry.first.dblclick()
        view.steps.append("double-clicked the SR")
        yes = page.get_by_role("button", name="Yes", exact=True)
        try:
            yes.first.wait_for(state="visible", timeout=int(settle_s * 3000))
        except Exception:  # noqa: BLE001 - Playwright's TimeoutError: no tracking prompt came
            view.steps.append("no tracking prompt")
            _shot(page, view, out_dir, "sr-no-prompt")
        else:
            _shot(page, view, out_dir, "sr-in-viewport")
            yes.first.click()
            view.steps.append("answered Yes to tracking")
        time.sleep(settle_s)
        _shot(page, view, out_dir, "sr-loaded")
        view.panel_text = _panel_text(page)
    finally:
        view.steps.append("done")
    return view


# -- the command line ----------------------------------------------------------------------------------------
def _dicom_files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        out.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return out


def _study_of(files: list[Path]) -> tuple[str, bool]:
    """The one study's Instance UID, and whether the files hold an SR."""
    uids, has_sr = set(), False
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        uids.add(str(ds.StudyInstanceUID))
        has_sr = has_sr or str(ds.SOPClassUID) in SR_CLASSES
    if len(uids) != 1:
        raise SystemExit(f"the files hold {len(uids)} studies; give the files of one study")
    return uids.pop(), has_sr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Upload DICOM files to a fresh Orthanc, open the study in OHIF, "
                                            "load its SR, save screenshots and the console log")
    p.add_argument("--files", nargs="+", type=Path, required=True, help="DICOM files or folders of one study")
    p.add_argument("--out", type=Path, required=True, help="folder for screenshots and console.txt")
    p.add_argument("--keep-open", type=float, default=0, metavar="S",
                   help="keep the stack up S seconds after (to browse it by hand at the printed address)")
    args = p.parse_args(argv)
    if gaps := missing():
        print("missing: " + "; ".join(gaps), file=sys.stderr)
        return 2
    files = _dicom_files(args.files)
    study_uid, has_sr = _study_of(files)
    if not has_sr:
        print("note: no SR among the files", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    with OhifStack(args.out / "stack") as stack:
        stack.upload(files)
        url = stack.viewer_url(study_uid)
        print(url)
        with browser_page(stack.url) as page:
            view = open_sr(page, url, args.out)
        (args.out / "console.txt").write_text("\n".join(view.console) + "\n")
        print(view.report())
        bad = view.bad_lines()
        if bad:
            print("\nbad console lines:\n" + view.bad_summary())
        print(f"\n{len(bad)} bad console line(s); 'fracture' in the measurement panel: "
              f"{'fracture' in view.panel_text.lower()}")
        if args.keep_open:
            time.sleep(args.keep_open)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

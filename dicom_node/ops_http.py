"""The operations endpoint: an HTTP server in the node process, off the DICOM port (``http:``).

- ``GET /healthz``: the process is alive (never needs the token).
- ``GET /readyz``: database reachable, storage writable with free space above ``storage.min_free_mb``,
  listener accepting, each inference worker alive with its model loaded, sender running; 200 or 503,
  with a JSON body that says which check failed. A node checks only the roles it runs (``node.roles``):
  a worker-only node has no listener check.
- ``GET /metrics``: Prometheus text format (:mod:`dicom_node.metrics`).
- ``GET /``: the status page for a person (recent studies, deliveries, dead letters with a retry
  button, the configuration in effect with its secrets hidden, the model card);
  ``GET /thumbnails/{id}.png`` the heatmap thumbnails it shows; ``POST /retry`` re-queues dead letters.

With ``http.token`` set, everything but ``/healthz`` needs it: ``Authorization: Bearer TOKEN``, or
HTTP basic auth with the token as password (any user name: what a browser can send). ``POST /retry``
always needs it, and is refused when no token is configured. Starlette on uvicorn, in a daemon
thread: the node's shutdown never waits for it more than a few seconds.

No page or metric shows a patient's name or ID unless ``http.show_patient_data`` is true.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import html
import io
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from dicom_node import __version__
from dicom_node.metrics import CONTENT_TYPE, METRICS

if TYPE_CHECKING:
    from dicom_node.node import Node

log = logging.getLogger("dicom_node.http")

THUMBNAIL_PX = 160
RECENT_STUDIES = 50


# -- readiness ---------------------------------------------------------------------------------
def readiness(node: Node) -> dict[str, dict[str, Any]]:
    """Each check: {"ok": bool, "detail": str}."""
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, fn) -> None:
        try:
            problem = fn()
        except Exception as exc:  # noqa: BLE001 - a failing check is the answer, not an error
            problem = f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"
        checks[name] = {"ok": problem is None, "detail": problem or "ok"}

    def database() -> str | None:
        from sqlalchemy import text

        with node.index.db.read() as s:
            s.execute(text("SELECT 1"))
        return None

    def storage() -> str | None:
        store = node.store
        probe = store.tmp / f"readyz-{uuid.uuid4().hex}.probe"
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
        free = store.free_bytes()
        if free < store.min_free_bytes:
            return (f"free space {free // (1 << 20)} MB on the storage volume is below storage.min_free_mb "
                    f"({store.min_free_bytes // (1 << 20)} MB)")
        return None

    def listener() -> str | None:
        server = node.listener.server if node.listener is not None else None
        if server is None or server.socket is None or server.socket.fileno() < 0:
            return "the DICOM listener is not accepting"
        return None

    def workers() -> str | None:
        if node.pool is None:
            return None if not node.cfg.pipeline.enabled else "the inference workers are not started"
        problems = [p for p in node.pool.health().values() if p]
        return "; ".join(problems) or None

    def sender() -> str | None:
        if node.sender is None or node.sender._stopping.is_set() or not node.scheduler.running:
            return "the sender is not running"
        if node.scheduler.get_job("sender") is None:
            return "the sender's job is not scheduled"
        return None

    roles = {"listener": "listener", "workers": "worker", "sender": "sender"}
    for name, fn in (("database", database), ("storage", storage), ("listener", listener),
                     ("workers", workers), ("sender", sender)):
        if name in roles and not node.cfg.runs(roles[name]):
            continue  # another node's role
        check(name, fn)
    if "workers" in checks and not node.cfg.pipeline.enabled:
        checks["workers"]["detail"] = "pipeline disabled (pipeline.enabled: false)"
    return checks


# -- authorisation -------------------------------------------------------------------------------
def _presented_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip()).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return None
    return None


class OpsApp:
    def __init__(self, node: Node):
        self.node = node
        self.cfg = node.cfg
        self.token = node.cfg.http.token
        self.started = time.time()
        self.app = Starlette(routes=[
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Route("/metrics", self.metrics),
            Route("/", self.page),
            Route("/thumbnails/{result_id:int}.png", self.thumbnail),
            Route("/retry", self.retry, methods=["POST"]),
            Route("/api/studies", self.api_studies),
        ])

    def _authorised(self, request: Request) -> bool:
        if self.token is None:
            return True
        given = _presented_token(request)
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    @staticmethod
    def _unauthorised() -> Response:
        return PlainTextResponse("401: this endpoint needs the access token (http.token): "
                                 "Authorization: Bearer TOKEN, or basic auth with the token as password\n",
                                 status_code=401, headers={"WWW-Authenticate": 'Basic realm="msk-dicom-node"'})

    def _csrf(self) -> str:
        assert self.token is not None
        return hmac.new(self.token.encode(), b"retry", hashlib.sha256).hexdigest()

    # -- endpoints ---------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "alive", "version": __version__, "pid": os.getpid(),
                             "ae_title": self.cfg.node.ae_title, "dicom_port": self.cfg.node.port,
                             "roles": list(self.cfg.node.roles),
                             "uptime_seconds": round(time.time() - self.started, 1)})

    async def readyz(self, request: Request) -> Response:
        if not self._authorised(request):
            return self._unauthorised()
        from starlette.concurrency import run_in_threadpool

        checks = await run_in_threadpool(readiness, self.node)
        failed = [k for k, v in checks.items() if not v["ok"]]
        return JSONResponse({"ready": not failed, "failed": failed, "checks": checks},
                            status_code=503 if failed else 200)

    async def metrics(self, request: Request) -> Response:
        if not self._authorised(request):
            return self._unauthorised()
        from starlette.concurrency import run_in_threadpool

        return Response(await run_in_threadpool(METRICS.exposition), media_type=CONTENT_TYPE)

    async def api_studies(self, request: Request) -> Response:
        if not self._authorised(request):
            return self._unauthorised()
        from starlette.concurrency import run_in_threadpool

        return JSONResponse(await run_in_threadpool(self._studies))

    async def page(self, request: Request) -> Response:
        if not self._authorised(request):
            return self._unauthorised()
        from starlette.concurrency import run_in_threadpool

        body = await run_in_threadpool(self._render, request.query_params.get("retried"))
        return HTMLResponse(body, headers={"Cache-Control": "no-store"})

    async def thumbnail(self, request: Request) -> Response:
        if not self._authorised(request):
            return self._unauthorised()
        from starlette.concurrency import run_in_threadpool

        png = await run_in_threadpool(self._thumbnail, int(request.path_params["result_id"]))
        if png is None:
            return PlainTextResponse("404: no such heatmap\n", status_code=404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    async def retry(self, request: Request) -> Response:
        if self.token is None:
            return PlainTextResponse("403: retrying needs an access token; set http.token in the configuration "
                                     "(or use `dicom-node retry`)\n", status_code=403)
        if not self._authorised(request):
            return self._unauthorised()
        from urllib.parse import parse_qs

        body = (await request.body()).decode("utf-8", "replace")
        form = {k: v[-1] for k, v in parse_qs(body).items()} \
            if "x-www-form-urlencoded" in request.headers.get("content-type", "") else {}
        # a browser sends basic-auth credentials by itself, also with another site's form (CSRF): such a
        # post must carry the token-derived field of this node's page. A Bearer header no form can add.
        basic = request.headers.get("authorization", "").lower().startswith("basic ")
        if basic and not hmac.compare_digest(str(form.get("csrf", "")), self._csrf()):
            return PlainTextResponse("403: the form is not from this node's status page\n", status_code=403)
        study = str(form.get("study") or request.query_params.get("study") or "") or None
        from starlette.concurrency import run_in_threadpool

        n_deliveries, n_studies = await run_in_threadpool(self._retry, study)
        if "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(f"/?retried={n_deliveries}", status_code=303)
        return JSONResponse({"deliveries_requeued": n_deliveries, "studies_requeued": n_studies})

    # -- work (in a thread) ---------------------------------------------------------------------
    def _retry(self, study: str | None) -> tuple[int, int]:
        from storage.deliveries import DeliveryQueue
        from storage.jobs import Jobs

        n = DeliveryQueue(self.node.index).retry_dead(study)
        m = Jobs(self.node.index).retry_failed_inference(study)
        log.info("status page: re-queued %d dead deliver%s and %d stud%s whose inference failed%s", n,
                 "y" if n == 1 else "ies", m, "y" if m == 1 else "ies", f" (study {study})" if study else "")
        if n and self.node.sender is not None:
            self.node.sender.wake()
        return n, m

    def _studies(self) -> list[dict]:
        from sqlalchemy import select

        from storage.deliveries import DeliveryQueue
        from storage.models import Patient, ResultObject, Study

        index = self.node.index
        rows = index.list_studies(limit=RECENT_STUDIES)
        uids = [r["StudyInstanceUID"] for r in rows]
        summaries = DeliveryQueue(index).summaries_for_uids(uids)
        with index.db.read() as s:
            extra = {u: (sid, v, rv) for u, sid, v, rv in s.execute(
                select(Study.StudyInstanceUID, Study.id, Study.result_version, Study.last_error)
                .where(Study.StudyInstanceUID.in_(uids))).all()} if uids else {}
            objects = s.execute(select(ResultObject.id, ResultObject.study_id, ResultObject.kind,
                                       ResultObject.file_path)
                                .where(ResultObject.study_id.in_([e[0] for e in extra.values()]),
                                       ResultObject.superseded.is_(False))
                                .order_by(ResultObject.id)).all() if extra else []
            patients = {}
            if self.cfg.http.show_patient_data and uids:
                patients = {u: (n, i) for u, n, i in s.execute(
                    select(Study.StudyInstanceUID, Patient.PatientName, Patient.PatientID)
                    .join(Patient, Patient.id == Study.patient_id).where(Study.StudyInstanceUID.in_(uids))).all()}
        by_study: dict[int, list] = {}
        for oid, sid, kind, path in objects:
            by_study.setdefault(sid, []).append((oid, kind, path))
        out = []
        for r in rows:
            found = extra.get(r["StudyInstanceUID"])
            sid, version, last_error = found if found is not None else (-1, 0, None)
            objs = by_study.get(sid, [])
            r = dict(r, result_version=version, last_error=last_error,
                     deliveries=summaries.get(r["StudyInstanceUID"], []),
                     heatmaps=[oid for oid, kind, _ in objs if kind == "heatmap"],
                     findings=self._findings(next((p for _, k, p in objs if k == "sr"), None)))
            if r["StudyInstanceUID"] in patients:
                r["PatientName"], r["PatientID"] = patients[r["StudyInstanceUID"]]
            out.append(r)
        return out

    def _findings(self, sr_path: str | None) -> list[str]:
        """The SR's one-line summary per image ("Image 1: Fracture of bone, definite, p = 0.72; ...")."""
        if sr_path is None:
            return []
        import pydicom

        try:
            ds = pydicom.dcmread(self.node.store.abspath(sr_path))
        except Exception:  # noqa: BLE001 - the page shows what it can
            return ["(the report cannot be read)"]
        found: list[str] = []

        def walk(items) -> None:
            for it in items or []:
                value = str(it.get("TextValue", "") or "")
                if value.startswith("Image ") and ":" in value and value not in found:
                    found.append(value)
                walk(it.get("ContentSequence"))

        walk(ds.get("ContentSequence"))
        return found

    def _thumbnail(self, result_id: int) -> bytes | None:
        import numpy as np
        import pydicom
        from PIL import Image
        from sqlalchemy import select

        from storage.models import ResultObject

        with self.node.index.db.read() as s:
            path = s.scalar(select(ResultObject.file_path).where(ResultObject.id == result_id,
                                                                 ResultObject.kind == "heatmap"))
        if path is None:
            return None
        try:
            ds = pydicom.dcmread(self.node.store.abspath(path))
            arr = ds.pixel_array
        except Exception as exc:  # noqa: BLE001
            log.warning("thumbnail of result object %d: %s", result_id, type(exc).__name__)
            return None
        if arr.ndim == 2:
            arr = arr.astype(np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            arr = ((arr - lo) / (hi - lo or 1.0) * 255).astype(np.uint8)
            if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
                arr = 255 - arr
        img = Image.fromarray(arr.astype(np.uint8))
        img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    def _config_in_effect(self) -> dict:
        from sqlalchemy.engine import make_url

        data = self.cfg.model_dump(mode="json")
        if data["http"].get("token"):
            data["http"]["token"] = "(hidden)"
        try:
            data["storage"]["database_url"] = make_url(data["storage"]["database_url"]).render_as_string(
                hide_password=True)
        except Exception:  # noqa: BLE001
            data["storage"]["database_url"] = "(hidden)"
        return data

    def _card(self) -> dict:
        if not self.cfg.pipeline.enabled:
            return {}
        from inference import DEFAULT_BUNDLE
        from inference.card import read_card

        try:
            card = read_card(self.cfg.pipeline.bundle or DEFAULT_BUNDLE)
        except Exception as exc:  # noqa: BLE001
            return {"error": f"{type(exc).__name__}"}
        meta = card.meta
        return {"name": card.name, "version": card.version, "description": meta.get("description", ""),
                "intended use": meta.get("intended_use") or meta.get("msk_node", {}).get("intended_use", ""),
                "heads": ", ".join(card.heads),
                "manufacturer": card.manufacturer,
                "weights": ", ".join(f"{f} sha256 {d[:12]}…" for f, d in card.weights.items())}

    def _render(self, retried: str | None) -> str:
        e = html.escape
        checks = readiness(self.node)
        studies = self._studies()
        show_patients = self.cfg.http.show_patient_data
        ready = all(c["ok"] for c in checks.values())
        parts = [f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>{e(self.cfg.node.ae_title)}: msk-dicom-node status</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}} h1{{font-size:1.4em}}
h2{{font-size:1.15em;margin-top:1.6em}} table{{border-collapse:collapse;font-size:.9em}}
td,th{{border:1px solid #ccc;padding:.3em .5em;vertical-align:top;text-align:left}}
th{{background:#f3f3f3}} .ok{{color:#0a7d2c}} .bad{{color:#b00020;font-weight:600}} .state{{font-weight:600}}
.uid{{font-family:monospace;font-size:.85em}} img.thumb{{border:1px solid #999;margin:2px}}
pre{{background:#f7f7f7;padding:.6em;font-size:.8em;max-height:28em;overflow:auto}}
button{{padding:.2em .8em}}
</style></head><body>
<h1>{e(self.cfg.node.ae_title)} &mdash; msk-dicom-node {e(__version__)}</h1>
<p>DICOM on {e(self.cfg.node.bind)}:{self.cfg.node.port}; up {e(_duration(time.time() - self.started))};
<span id="readiness" class="{'ok' if ready else 'bad'}">{'ready' if ready else 'NOT READY'}</span>
&middot; <a href="/readyz">/readyz</a> &middot; <a href="/metrics">/metrics</a>
&middot; <a href="/healthz">/healthz</a></p>
<table id="checks"><tr>{''.join(f'<th>{e(k)}</th>' for k in checks)}</tr>
<tr>{''.join(f'<td class="{"ok" if v["ok"] else "bad"}">{e(v["detail"])}</td>' for v in checks.values())}</tr></table>
"""]
        if retried is not None:
            parts.append(f'<p id="retried" class="ok">Re-queued {e(retried)} dead deliver'
                         f'{"y" if retried == "1" else "ies"}.</p>')
        parts.append(f"<h2>Recent studies ({len(studies)})</h2>")
        parts.append('<table id="studies"><tr><th>Study Instance UID</th>'
                     + ("<th>Patient</th>" if show_patients else "")
                     + "<th>state</th><th>images</th><th>from</th><th>received</th><th>stable</th>"
                       "<th>results</th><th>findings</th><th>heatmaps</th></tr>")
        for s in studies:
            reason = s.get("state_reason") or (s["last_error"] if s["state"] == "failed" else None)
            parts.append(
                f'<tr class="study"><td class="uid">{e(s["StudyInstanceUID"])}</td>'
                + (f'<td>{e(str(s.get("PatientName", "")))} ({e(str(s.get("PatientID", "")))})</td>'
                   if show_patients else "")
                + f'<td><span class="state">{e(s["state"])}</span>'
                + (f'<br><small>{e(reason)}</small>' if reason else "")
                + f'</td><td>{s["instances"]}</td><td>{e(s["calling_ae"] or "")}</td>'
                  f'<td>{e(_short(s["last_received"]))}</td><td>{e(_short(s["stable_at"]))}</td>'
                  f'<td>{"v" + str(s["result_version"]) if s["result_version"] else ""}</td>'
                  f'<td>{"<br>".join(e(f) for f in s["findings"])}</td>'
                  f'<td>{"".join(_thumb(oid) for oid in s["heatmaps"][:4])}</td></tr>')
        parts.append("</table>")

        parts.append("<h2>Deliveries</h2>")
        dead_rows = []
        rows = []
        for s in studies:
            for d in s["deliveries"]:
                st = " ".join(f"{k} {v}" for k, v in d["states"].items() if v)
                row = (f'<td class="uid">{e(s["StudyInstanceUID"])}</td><td>{e(d["destination"])}</td>'
                       f'<td>v{d["result_version"]}</td><td>{e(st)}</td><td>{d["attempts"]}</td>'
                       f'<td>{e(d["last_error"] or "")}</td><td>{e(_short(d["next_attempt_at"]))}</td>'
                       f'<td>{e(_short(d["last_sent_at"]))}</td>')
                rows.append(f"<tr>{row}</tr>")
                if d["states"].get("dead"):
                    dead_rows.append((s["StudyInstanceUID"], row))
        head = ("<tr><th>Study Instance UID</th><th>destination</th><th>version</th><th>objects</th>"
                "<th>attempts</th><th>last error</th><th>next attempt</th><th>last sent</th>")
        parts.append(f'<table id="deliveries">{head}</tr>{"".join(rows)}</table>' if rows
                     else "<p>No deliveries yet.</p>")
        parts.append(f"<h2>Dead letters ({len(dead_rows)})</h2>")
        if dead_rows:
            parts.append(f'<table id="dead-letters">{head}<th></th></tr>')
            for uid, row in dead_rows:
                if self.token is not None:
                    button = (f'<form method="post" action="/retry"><input type="hidden" name="study" '
                              f'value="{e(uid)}"><input type="hidden" name="csrf" value="{self._csrf()}">'
                              f'<button type="submit" class="retry">Retry</button></form>')
                else:
                    button = "<small>set http.token to retry here, or run <code>dicom-node retry</code></small>"
                parts.append(f'<tr class="dead">{row}<td>{button}</td></tr>')
            parts.append("</table>")
        else:
            parts.append("<p>None.</p>")

        card = self._card()
        parts.append("<h2>Model card</h2>")
        if card:
            parts.append('<table id="model-card">' + "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>"
                                                             for k, v in card.items() if v) + "</table>")
        else:
            parts.append("<p>The pipeline is disabled (pipeline.enabled: false): no model is loaded.</p>")
        parts.append('<h2>Configuration in effect</h2><pre id="config">'
                     + e(json.dumps(self._config_in_effect(), indent=2)) + "</pre>")
        parts.append(f"<p><small>Rendered {e(dt.datetime.now(dt.UTC).isoformat(timespec='seconds'))}. "
                     "Patient names and IDs are not shown (http.show_patient_data).</small></p>"
                     if not show_patients else "")
        parts.append("</body></html>")
        return "".join(parts)


def _thumb(result_id: int) -> str:
    return f'<a href="/thumbnails/{result_id}.png"><img class="thumb" src="/thumbnails/{result_id}.png" ' \
           f'alt="heatmap {result_id}" width="{THUMBNAIL_PX}"></a>'


def _short(iso: str | None) -> str:
    return iso.replace("T", " ").replace("+00:00", "Z") if iso else ""


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 86400}d {s % 86400 // 3600}h" if s >= 86400 else f"{s // 3600}h {s % 3600 // 60}m {s % 60}s"


# -- the server ------------------------------------------------------------------------------
class OpsServer:
    """uvicorn serving :class:`OpsApp` from a daemon thread; the socket is bound in :meth:`bind` (so a
    busy port is reported at start-up, before anything else starts)."""

    def __init__(self, node: Node):
        self.node = node
        self.cfg = node.cfg.http
        self.sock: socket.socket | None = None
        self.server: Any = None
        self.thread: threading.Thread | None = None

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.cfg.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.cfg.bind, self.cfg.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def start(self) -> None:
        import uvicorn

        if self.sock is None:
            self.bind()
        app = OpsApp(self.node).app
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        sock = self.sock
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="ops-http",
                                       daemon=True)
        self.thread.start()
        log.info("operations endpoint on http://%s:%d/ (/healthz, /readyz, /metrics; access token %s)",
                 self.cfg.bind, self.cfg.port, "required" if self.cfg.token else "not set")

    def stop(self, timeout: float = 3.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
        if self.sock is not None:
            self.sock.close()
            self.sock = None

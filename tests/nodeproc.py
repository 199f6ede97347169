"""The node as a real subprocess, configured from a dict, on a free port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from tests.peers import free_port, stop_process, wait_for_port, wait_until
from tests.postgres import database_url

REPO = Path(__file__).resolve().parent.parent


def node_config(workdir: Path, *, port: int | None = None, quiet_seconds: float = 1.0,
                peers: list[dict] | None = None, min_free_mb: int = 0, **sections) -> dict:
    cfg = {
        "node": {"ae_title": "MSKNODE", "bind": "127.0.0.1", "port": port or free_port(), "max_associations": 16},
        "peers": peers if peers is not None else [{"ae_title": "STORESCU", "host": "127.0.0.1"},
                                                  {"ae_title": "PYNETDICOM"}],
        "storage": {"path": str(workdir / "var"), "database_url": database_url(workdir),
                    "min_free_mb": min_free_mb},
        "study": {"quiet_seconds": quiet_seconds},
        # receive-side tests run without the model; pipeline tests pass pipeline={"enabled": True, ...}
        "pipeline": {"enabled": False},
        # the operations endpoint on a port of its own (two nodes of one test never share one)
        "http": {"bind": "127.0.0.1", "port": free_port()},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    return cfg


class NodeProcess:
    """``dicom-node --config FILE serve`` in a subprocess; the CLI as a subprocess too."""

    def __init__(self, workdir: Path, cfg: dict):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.config_path = self.workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.port = cfg["node"]["port"]
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "node.log"

    @property
    def http_url(self) -> str:
        http = self.cfg.get("http", {})
        return f"http://{http.get('bind', '127.0.0.1')}:{http.get('port', 8080)}"

    @property
    def storage(self) -> Path:
        return Path(self.cfg["storage"]["path"])

    @property
    def listens(self) -> bool:
        return "listener" in self.cfg["node"].get("roles", ["listener"])

    def start(self, timeout: float = 60.0, args: tuple[str, ...] = ()) -> NodeProcess:
        """Start ``serve`` (with ``args``, e.g. ``("--role", "worker")``); wait for the DICOM port, or for
        the operations endpoint's port when the node does not listen."""
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "--config", str(self.config_path),
                                      "serve", *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        listens = self.listens and not any(a.startswith("--role") for a in args)
        wait_for_port(self.port if listens else self.cfg["http"]["port"], timeout=timeout, proc=self.proc)
        return self

    def stop(self) -> int | None:
        rc = stop_process(self.proc)
        self.proc = None
        return rc

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        """Whether the node's /readyz answers 200 (every check of the roles it runs passes)."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.http_url + "/readyz", timeout=5) as rsp:
                return rsp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "--config", str(self.config_path), *args],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
        if check and r.returncode != 0:
            raise AssertionError(f"dicom-node {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def studies(self) -> list[dict]:
        return json.loads(self.cli("studies", "--json").stdout)

    def wait_for(self, predicate, timeout: float = 60.0, interval: float = 0.25, what: str = "condition"):
        return wait_until(predicate, timeout, what, interval, context=lambda: "\n" + self.log()[-3000:])

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

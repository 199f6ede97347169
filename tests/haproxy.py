"""HAProxy (Debian's ``haproxy``, installed by ``.ci/run``) in TCP mode in front of DICOM listeners.

The tests start their own, as they start their own Orthanc and PostgreSQL: a configuration in a
temporary folder, one frontend on a free loopback port, ``balance roundrobin`` over the given
backends (one association is one TCP connection: the unit HAProxy spreads), a TCP health check
every half second, and ``option redispatch`` with retries so that a connection to a listener that
died goes to the other one. ``haproxy -f CFG -db`` runs in the foreground as a subprocess
(an argument list, no shell); the same configuration is the example in docs/deployment.md.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.peers import free_port, stop_process, wait_for_port

HAPROXY = "/usr/sbin/haproxy"


def program() -> str | None:
    found = shutil.which("haproxy")
    return found or (HAPROXY if Path(HAPROXY).exists() else None)


def available() -> bool:
    return program() is not None


def config_text(port: int, backends: list[tuple[str, int]], *, bind: str = "127.0.0.1",
                check_ms: int = 500, timeout_s: int = 120) -> str:
    """A TCP-mode configuration: ``bind:port`` spread round robin over ``backends`` ((host, port), ...)."""
    servers = "\n".join(f"    server node{i} {host}:{p} check inter {check_ms}ms fall 1 rise 2"
                        for i, (host, p) in enumerate(backends, 1))
    return f"""global
    maxconn 1000

defaults
    mode tcp
    timeout connect 2s
    timeout client {timeout_s}s
    timeout server {timeout_s}s
    retries 3
    option redispatch

frontend dicom
    bind {bind}:{port}
    default_backend listeners

backend listeners
    balance roundrobin
{servers}
"""


class HAProxy:
    """``with HAProxy([(host, port), ...]) as lb: lb.port``: a TCP load balancer on a free loopback port."""

    def __init__(self, backends: list[tuple[str, int]], *, port: int | None = None, workdir: Path | None = None):
        exe = program()
        if exe is None:
            raise RuntimeError("HAProxy is not installed (Debian package haproxy; .ci/run installs it)")
        self.exe = exe
        self.backends = backends
        self.port = port or free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="msknode-haproxy-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "haproxy.cfg"
        self.log_path = self.workdir / "haproxy.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> HAProxy:
        self.config.write_text(config_text(self.port, self.backends))
        check = subprocess.run([self.exe, "-c", "-f", str(self.config)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejects its configuration: {check.stderr.strip()[-2000:]}")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.exe, "-f", str(self.config), "-db"], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""The receivers alerts go to, run for real: the Alertmanager binary, a webhook endpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gpuledger.broker import free_port

AM_CONFIG = """\
route:
  receiver: "null"
receivers:
  - name: "null"
"""


class Alertmanager:
    """Prometheus Alertmanager (Debian's `prometheus-alertmanager`) on a free port.

    `start()` raises when it cannot start: a test that needs it fails, never skips.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> Alertmanager:
        binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        if binary is None:
            raise AssertionError(
                "Alertmanager is not installed: `apt-get update && apt-get install -y "
                "prometheus-alertmanager` (make test does it when it is missing)"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "alertmanager.yml"
        config.write_text(AM_CONFIG)
        log = (self.folder / "alertmanager.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        tail = (self.folder / "alertmanager.log").read_text(errors="replace")[-2000:]
        raise AssertionError(f"Alertmanager did not start on port {self.port}:\n{tail}")

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts Alertmanager holds as active now (resolved ones drop out)."""
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as reply:
            found: list[dict[str, Any]] = json.load(reply)
        return found

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class WebhookReceiver:
    """An HTTP endpoint that keeps the JSON bodies POSTed to it (Slack or our own format)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.bodies: list[dict[str, Any]] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/gpu-alerts"

    def start(self) -> WebhookReceiver:
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

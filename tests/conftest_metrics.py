"""Test machinery for the metrics side: emulated vLLM pods scraped by a real Prometheus, and fake
Prometheus endpoints that are slow or answer garbage.

Imported by test modules (`from conftest_metrics import ...`): only the top-level conftest may
use `pytest_plugins`. Fixture bodies here are plain functions that a module registers with
`pytest.fixture(...)`, so the fixture belongs to that module (and linters see no shadowed import).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from variant_autoscaler_testbed.load import LoadSpec, generate_load
from variant_autoscaler_testbed.model_server import EmulatedModelServer, ModelServerConfig
from variant_autoscaler_testbed.prometheus import PrometheusNotInstalled, PrometheusServer, ScrapeTarget


class BackgroundLoop:
    """An asyncio loop in a daemon thread, so synchronous tests (and the synchronous collector)
    can run next to emulated servers the way the operator runs next to real ones."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="emulation-loop", daemon=True)
        self._thread.start()

    def run(self, coro, timeout_s: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@dataclass(frozen=True)
class PodPlan:
    """One emulated pod: its server and the load sent to it (LoadSpec fields except targets/model)."""

    pod: str
    namespace: str
    config: ModelServerConfig
    load: dict | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class MetricsStack:
    loop: BackgroundLoop
    prometheus: PrometheusServer
    servers: dict[str, EmulatedModelServer]
    plans: dict[str, PodPlan]
    loads: dict[str, object]
    stop_loads: asyncio.Event
    started: float

    def stop_pod(self, pod: str) -> None:
        self.loop.run(self.servers[pod].stop())

    def age_s(self) -> float:
        return time.monotonic() - self.started


@contextmanager
def metrics_stack(plans: list[PodPlan]) -> Iterator[MetricsStack]:
    """Start the pods, their loads and one Prometheus scraping them every second."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus binary not installed: run `make system-deps` (Debian package prometheus)")
    loop = BackgroundLoop()
    servers: dict[str, EmulatedModelServer] = {}
    stop = loop.run(_new_event())
    prometheus = None
    loads = {}
    try:
        for plan in plans:
            servers[plan.pod] = loop.run(EmulatedModelServer(plan.config).start())
        targets = [ScrapeTarget(address=f"127.0.0.1:{servers[p.pod].port}",
                                labels={"namespace": p.namespace, "pod": p.pod, **p.labels}) for p in plans]
        try:
            prometheus = PrometheusServer(targets).start()
        except PrometheusNotInstalled as exc:
            pytest.skip(str(exc))
        for plan in plans:
            if plan.load:
                spec = LoadSpec(targets=[servers[plan.pod].url], model=plan.config.model, **plan.load)
                loads[plan.pod] = loop.submit(generate_load(spec, stop))
        yield MetricsStack(loop, prometheus, servers, {p.pod: p for p in plans}, loads, stop, time.monotonic())
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        try:
            loop.run(_stop_all(list(servers.values())), timeout_s=15)
        except Exception:  # noqa: BLE001 - teardown goes on whatever the servers do
            pass
        for fut in loads.values():
            try:
                fut.result(timeout=15)
            except Exception:  # noqa: BLE001
                pass
        if prometheus is not None:
            prometheus.stop()
        loop.close()


async def _stop_all(servers: list[EmulatedModelServer]) -> None:
    await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)


async def _new_event() -> asyncio.Event:
    return asyncio.Event()


def wait_until(predicate: Callable[[], object], *, timeout_s: float, what: str, interval_s: float = 0.5):
    """Poll `predicate` until it returns something truthy; fail the test naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r})")


class FakePrometheus:
    """A 127.0.0.1 HTTP(S) server standing in for a misbehaving Prometheus.

    mode: "slow" (holds each request up to `delay_s`), "html" (200 with a web page),
    "bad-shape" (200, a vector whose sample value is not a pair), "no-data" (200, JSON without
    `data`), "http-500" (Prometheus-style error body), "empty" (a valid, empty vector), "samples"
    (a vector of `samples(query)` -> [(labels, value)]: wrong numbers in a well-formed answer).
    Records each request's headers in `.requests`.
    """

    def __init__(self, mode: str, delay_s: float = 3.0, tls: tuple[Path, Path] | None = None,
                 samples: Callable[[str], list[tuple[dict, float]]] | None = None):
        self.mode, self.delay_s, self.samples = mode, delay_s, samples
        self.requests: list[dict[str, str]] = []
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.requests.append(dict(self.headers))
                form = urllib.parse.urlsplit(self.path).query
                if self.command == "POST":
                    form = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                status, body, ctype = fake.answer(urllib.parse.parse_qs(form).get("query", [""])[0])
                if fake.mode == "slow":
                    fake.release.wait(fake.delay_s)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def answer(self, query: str = "") -> tuple[int, bytes, str]:
        vector = {"status": "success", "data": {"resultType": "vector", "result": []}}
        if self.mode == "samples":
            vector["data"]["result"] = [{"metric": labels, "value": [time.time(), str(value)]}
                                        for labels, value in self.samples(query)]
        if self.mode == "html":
            return 200, b"<html><body>Grafana login</body></html>", "text/html"
        if self.mode == "bad-shape":
            vector["data"]["result"] = [{"metric": {"pod": "p"}, "value": "oops"}]
        elif self.mode == "no-data":
            vector = {"status": "success"}
        elif self.mode == "http-500":
            return 500, json.dumps({"status": "error", "errorType": "internal",
                                    "error": "storage is on fire"}).encode(), "application/json"
        return 200, json.dumps(vector).encode(), "application/json"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def fake_prometheus_factory():
    """Fixture body (register with `fake_prometheus = pytest.fixture(fake_prometheus_factory)`):
    yields make(mode, ...) -> FakePrometheus; all are closed after the test."""
    made: list[FakePrometheus] = []

    def make(mode: str, **kw) -> FakePrometheus:
        made.append(FakePrometheus(mode, **kw))
        return made[-1]

    yield make
    for f in made:
        f.close()


def self_signed_certificate(directory: Path) -> tuple[Path, Path] | None:
    """A certificate for 127.0.0.1 made with the openssl CLI, or None when openssl is absent."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key

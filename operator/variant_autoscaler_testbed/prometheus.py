"""Start the real `prometheus` binary on 127.0.0.1 for tests and the local live demo.

The collector must be tested against the real query engine (rate extrapolation, staleness
markers, histogram_quantile, the colon in vLLM names), not a fake, so this starts Debian's
Prometheus (`scripts/install-system-deps.sh` installs it) with a temporary config and TSDB,
scraping every second. The query log is on, so tests can count the queries a client really made.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field


class PrometheusNotInstalled(RuntimeError):
    """The `prometheus` binary is not on PATH."""


class ScrapeTarget(BaseModel):
    """One scraped endpoint and the labels Prometheus attaches to its series (like a Kubernetes SD would)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(min_length=3, description="host:port of the /metrics endpoint.")
    labels: dict[str, str] = Field(default_factory=dict, description="e.g. {'namespace': 'ns', 'pod': 'p-1'}.")


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the caller retries if it is taken meanwhile)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    """A throwaway Prometheus: `with PrometheusServer(targets) as prom: prom.url ...`."""

    def __init__(self, targets: list[ScrapeTarget] = (), *, scrape_interval_s: float = 1.0, job: str = "vllm",
                 binary: str = "prometheus", startup_timeout_s: float = 20.0):
        self.binary = shutil.which(binary)
        if self.binary is None:
            raise PrometheusNotInstalled(
                f"{binary!r} not found on PATH; install it with `make system-deps` (Debian package `prometheus`)")
        self.targets = list(targets)
        self.scrape_interval_s = scrape_interval_s
        self.job = job
        self.startup_timeout_s = startup_timeout_s
        self._dir: tempfile.TemporaryDirectory | None = None
        self._proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("Prometheus not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def workdir(self) -> Path:
        if self._dir is None:
            raise RuntimeError("Prometheus not started")
        return Path(self._dir.name)

    @property
    def query_log(self) -> Path:
        return self.workdir / "queries.log"

    def _config(self) -> dict:
        interval = f"{self.scrape_interval_s:g}s"
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval,
                       "query_log_file": str(self.query_log)},
            "scrape_configs": [{
                "job_name": self.job,
                "static_configs": [{"targets": [t.address], "labels": dict(t.labels)} for t in self.targets],
            }],
        }

    def _write_config(self) -> Path:
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(self._config(), sort_keys=False))
        return path

    def start(self) -> PrometheusServer:
        self._dir = tempfile.TemporaryDirectory(prefix="va-prometheus-")
        config = self._write_config()
        last_error = ""
        for _attempt in range(3):
            self.port = free_port()
            log = open(self.workdir / "prometheus.log", "ab")
            self._proc = subprocess.Popen(
                [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
                 "--log.level=warn", "--web.enable-lifecycle"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )
            log.close()
            if self._wait_ready():
                return self
            last_error = self.log_tail()
            self._terminate()
        self._cleanup_dir()
        raise RuntimeError(f"Prometheus did not become ready: {last_error}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.workdir / "prometheus.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def set_targets(self, targets: list[ScrapeTarget]) -> None:
        """Replace the scrape targets and reload (returns once Prometheus has applied the config)."""
        self.targets = list(targets)
        self._write_config()
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            if resp.status != 200:
                raise RuntimeError(f"Prometheus reload failed: HTTP {resp.status}")

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        """One instant query straight to the HTTP API (for tests that check Prometheus itself)."""
        params = {"query": promql} | ({"time": f"{at:.3f}"} if at is not None else {})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10) as r:
            return json.loads(r.read())["data"]["result"]

    def wait_for(self, promql: str, *, min_results: int = 1, timeout_s: float = 30.0) -> list[dict]:
        """Poll `promql` until it returns at least `min_results` series; bounded by `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if len(result) >= min_results:
                return result
            time.sleep(0.25)
        raise TimeoutError(f"{promql!r} returned {len(result)} series after {timeout_s:g} s, wanted {min_results}")

    def logged_queries(self) -> list[str]:
        """The PromQL of every query Prometheus has executed so far, in order (from its query log)."""
        try:
            lines = self.query_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line)["params"]["query"] for line in lines if line.strip()]

    def _terminate(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None

    def _cleanup_dir(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def stop(self) -> None:
        self._terminate()
        self._cleanup_dir()
        self.port = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""etcd and the real Kubernetes CRD API server (k8s.io/apiextensions-apiserver) as child processes.

Custom resources must be served by the real thing: OpenAPI validation with the real error texts,
defaulting, pruning, CEL rules and the status subresource are exactly what users of the CRD meet,
and an imitation would let schema mistakes through. No full kube-apiserver can be installed on the
machines this project is built on, but the CRD server alone can: it is the code every
kube-apiserver runs for custom resources, built as its own binary (`../shared/k8s/`), storing in
Debian's `etcd`. It delegates authentication, authorization and namespace lookups to a "core"
server, which `core_api` emulates.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import aiohttp

SHARED_DIR_ENV = "VARIANT_AUTOSCALER_SHARED_DIR"
CRD_SERVER_BINARY_ENV = "VARIANT_AUTOSCALER_CRD_SERVER"
CACHE_DIR_ENV = "VARIANT_AUTOSCALER_CACHE_DIR"
PACKED_CRD_SERVER = Path("k8s") / "apiextensions-apiserver.gz"

HOW_TO_GET_THE_CRD_SERVER = (
    "The emulated cluster needs the real Kubernetes CRD API server, k8s.io/apiextensions-apiserver "
    "(0.36.x). This repository expects it gzipped at ../shared/k8s/apiextensions-apiserver.gz, next to "
    f"the checkout (or at ${SHARED_DIR_ENV}/k8s/apiextensions-apiserver.gz); an unpacked binary can "
    f"also be named with ${CRD_SERVER_BINARY_ENV}=/path/to/apiextensions-apiserver. To build one "
    "without network access beyond Debian (sid): `apt-get install golang-k8s-apiextensions-apiserver-dev "
    "golang-1.26-go`, then `cd /usr/share/gocode/src/k8s.io/apiextensions-apiserver && GO111MODULE=off "
    "GOPATH=/usr/share/gocode GOPROXY=off CGO_ENABLED=0 /usr/lib/go-1.26/bin/go build -o "
    "/tmp/apiextensions-apiserver .`; where the Go module proxy is reachable: `GOBIN=$PWD go install "
    "k8s.io/apiextensions-apiserver@v0.36.4`."
)
HOW_TO_GET_ETCD = (
    "The emulated cluster needs etcd (3.4 or newer) on PATH: `apt-get install etcd-server` on "
    "Debian/Ubuntu, or `make system-deps` in this repository."
)


class SubstrateUnavailable(RuntimeError):
    """A program the emulated cluster needs is missing; the message says how to get it."""


class SubstrateStartError(RuntimeError):
    """A child process of the emulated cluster did not become ready; the message has its log tail."""


def repository_root() -> Path:
    """The checkout this package lives in (operator/variant_autoscaler_testbed/ is two below it)."""
    return Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """Where the shared data lives: $VARIANT_AUTOSCALER_SHARED_DIR, else ../shared next to the repository."""
    configured = os.environ.get(SHARED_DIR_ENV)
    return Path(configured) if configured else repository_root().parent / "shared"


def cache_dir() -> Path:
    """Where unpacked binaries are kept between runs, so each test session does not gunzip 60 MB."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "variant-autoscaler"


def crd_server_binary() -> Path:
    """Path of an executable CRD server, unpacking the shared gzip into the cache on first use.

    The unpacked file is named after the gzip's content hash, so a new build in ../shared is picked
    up, and it is written under a temporary name and renamed, so parallel test sessions never run a
    half-written binary.
    """
    explicit = os.environ.get(CRD_SERVER_BINARY_ENV)
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise SubstrateUnavailable(f"{CRD_SERVER_BINARY_ENV}={explicit} is not an executable file. "
                                       + HOW_TO_GET_THE_CRD_SERVER)
        return path
    packed = shared_dir() / PACKED_CRD_SERVER
    if not packed.is_file():
        raise SubstrateUnavailable(f"{packed} not found. " + HOW_TO_GET_THE_CRD_SERVER)
    digest = hashlib.sha256(packed.read_bytes()).hexdigest()[:16]
    target = cache_dir() / f"apiextensions-apiserver-{digest}"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    with gzip.open(packed, "rb") as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    partial.chmod(0o755)
    os.replace(partial, target)
    return target


def etcd_binary() -> Path:
    found = shutil.which("etcd")
    if not found:
        raise SubstrateUnavailable(HOW_TO_GET_ETCD)
    return Path(found)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (callers retry if another process wins it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: let the kernel stop the child if the Python process dies without cleaning up, so a
    killed test run leaves no etcd or CRD server behind. Elsewhere: a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class ChildProcess:
    """One server process with its output in a log file, stopped gently and then firmly."""

    def __init__(self, name: str, argv: list[str], log_path: Path):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_die_with_parent)

    def exited(self) -> bool:
        return self.process.poll() is not None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, grace_s: float = 3.0) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await asyncio.to_thread(self.process.wait, 10)
        self._log.close()


async def wait_until_ready(child: ChildProcess, url: str, timeout_s: float, *, expect: str) -> None:
    """Poll `url` until it answers 200 with `expect` in the body; fail early if the process dies."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = "no answer yet"
    connector = aiohttp.TCPConnector(ssl=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=2)) as http:
        while loop.time() < deadline:
            if child.exited():
                raise SubstrateStartError(
                    f"{child.name} exited with code {child.process.returncode} before it was ready; "
                    f"log {child.log_path}:\n{child.log_tail()}")
            try:
                async with http.get(url) as resp:
                    body = await resp.text()
                    if resp.status == 200 and expect in body:
                        return
                    last = f"HTTP {resp.status}: {body[:300]}"
            except (TimeoutError, aiohttp.ClientError, OSError) as err:
                last = repr(err)
            await asyncio.sleep(0.05)
    raise SubstrateStartError(f"{child.name} not ready at {url} after {timeout_s:.0f} s (last: {last}); "
                              f"log {child.log_path}:\n{child.log_tail()}")


def _address_in_use(child: ChildProcess) -> bool:
    return child.exited() and "address already in use" in child.log_tail(60).lower()


async def start_on_free_ports(launch, *, attempts: int, timeout_s: float, expect: str) -> ChildProcess:
    """Start `launch(attempt) -> (child, ready_url)` until it is ready; retry only on a port clash.

    Free ports are picked before the child binds them, so another process can take one in between:
    that (and only that) is worth another try with new ports.
    """
    for attempt in range(attempts):
        child, ready_url = launch(attempt)
        try:
            await wait_until_ready(child, ready_url, timeout_s, expect=expect)
            return child
        except SubstrateStartError:
            await child.stop()
            if attempt + 1 < attempts and _address_in_use(child):
                continue
            raise
    raise AssertionError("unreachable")


class Etcd:
    """A single-member etcd on free 127.0.0.1 ports with its data in `work_dir` (tmpfs when possible)."""

    def __init__(self, work_dir: Path, *, binary: Path | None = None):
        self.work_dir = work_dir
        self.binary = binary or etcd_binary()
        self.url = ""
        self.child: ChildProcess | None = None

    async def start(self, timeout_s: float = 20.0, attempts: int = 3) -> None:
        def launch(attempt: int):
            client_port, peer_port = free_port(), free_port()
            self.url = f"http://127.0.0.1:{client_port}"
            peer = f"http://127.0.0.1:{peer_port}"
            data_dir = self.work_dir / f"etcd-data-{attempt}"
            self.child = ChildProcess("etcd", [
                str(self.binary), "--name", "default", "--data-dir", str(data_dir),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"default={peer}", "--log-level", "warn", "--logger", "zap",
                "--snapshot-count", "100000", "--quota-backend-bytes", str(2 << 30),
            ], self.work_dir / "etcd.log")
            return self.child, f"{self.url}/health"

        await start_on_free_ports(launch, attempts=attempts, timeout_s=timeout_s, expect="true")

    async def stop(self) -> None:
        if self.child:
            await self.child.stop(grace_s=2.0)


class CrdServer:
    """The real CRD API server on a free 127.0.0.1 port, TLS with a self-signed certificate.

    `core_kubeconfig` points at the core server that answers TokenReview, SubjectAccessReview and
    namespace (and service) list/watch. Only the NamespaceLifecycle admission plugin stays on: it
    gives real "namespace not found" behaviour, while the webhook and policy plugins would need
    admissionregistration.k8s.io from the core server for nothing the tests use.
    """

    def __init__(self, work_dir: Path, etcd_url: str, core_kubeconfig: Path, *, binary: Path | None = None):
        self.work_dir = work_dir
        self.etcd_url = etcd_url
        self.core_kubeconfig = core_kubeconfig
        self.binary = binary or crd_server_binary()
        self.url = ""
        self.child: ChildProcess | None = None

    def argv(self, port: int) -> list[str]:
        kubeconfig = str(self.core_kubeconfig)
        return [
            str(self.binary),
            f"--etcd-servers={self.etcd_url}",
            f"--secure-port={port}",
            "--bind-address=127.0.0.1",
            f"--cert-dir={self.work_dir / 'crd-server-certs'}",
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--authentication-skip-lookup",
            "--authorization-always-allow-paths=/*",
            "--enable-priority-and-fairness=false",
            "--disable-admission-plugins=MutatingAdmissionPolicy,MutatingAdmissionWebhook,"
            "ValidatingAdmissionPolicy,ValidatingAdmissionWebhook",
            "--etcd-count-metric-poll-period=0",
            "--etcd-db-metric-poll-interval=0",
            "-v=1",
        ]

    async def start(self, timeout_s: float = 30.0, attempts: int = 3) -> None:
        def launch(_attempt: int):
            port = free_port()
            self.url = f"https://127.0.0.1:{port}"
            self.child = ChildProcess("apiextensions-apiserver", self.argv(port),
                                      self.work_dir / "crd-server.log")
            return self.child, f"{self.url}/readyz"

        await start_on_free_ports(launch, attempts=attempts, timeout_s=timeout_s, expect="ok")

    async def stop(self) -> None:
        if self.child:
            await self.child.stop(grace_s=2.0)

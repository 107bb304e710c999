"""`EmulatedCluster`: etcd + the real CRD server + the emulated core API + kubelet, behind one URL.

Tests and `make live` need a Kubernetes API that the real `kubernetes` client, kopf and kubectl
can talk to over HTTP. This starts one in about a second, writes a kubeconfig for it and installs
the CRDs from `crds/`. Use it from async code (`async with EmulatedCluster() as c`) or from sync
code (`with EmulatedCluster() as c`), in which case it runs in an event loop on its own thread and
`call()` runs coroutines there (the kubelet hooks run in that loop too).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml

from variant_autoscaler_testbed.core_api import CoreApi, ObjectStore
from variant_autoscaler_testbed.crd_server import (
    CrdServer,
    Etcd,
    SubstrateStartError,
    crd_server_binary,
    etcd_binary,
    repository_root,
)
from variant_autoscaler_testbed.kubelet import Kubelet, PodHook

T = TypeVar("T")

DEFAULT_TOKEN = "emulated-cluster-admin-token"
KUBECTL = "kubectl"


def default_crd_files() -> list[Path]:
    """Every CRD manifest in the repository's crds/ folder."""
    return sorted((repository_root() / "crds").glob("*.yaml"))


def kubeconfig_text(server: str, token: str, *, name: str = "emulated") -> str:
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": name, "cluster": {"server": server}}],
        "users": [{"name": f"{name}-admin", "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": f"{name}-admin",
                                                "namespace": "default"}}],
        "current-context": name,
    }, sort_keys=False)


def crd_documents(paths: Iterable[Path]) -> list[dict[str, Any]]:
    docs = []
    for path in paths:
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                docs.append(doc)
    return docs


def _tmp_root() -> str | None:
    """tmpfs when there is one: etcd fsyncs every write, and a disk shared with other jobs is slow."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


class EmulatedCluster:
    """A Kubernetes API on 127.0.0.1 for tests and local runs; see the module docstring.

    Parameters: `crd_files` (default: all of crds/), `namespaces` to create, the kubelet's default
    `start_delay_s` (cold start before a pod is Ready) and its `on_pod_start`/`on_pod_stop` hooks,
    the bearer `token` written into the kubeconfig, and `keep_work_dir` to keep logs after stop.
    """

    def __init__(self, *, crd_files: Iterable[Path] | None = None, namespaces: Iterable[str] = (),
                 start_delay_s: float = 0.5, on_pod_start: PodHook | None = None,
                 on_pod_stop: PodHook | None = None, token: str = DEFAULT_TOKEN, keep_work_dir: bool = False):
        self.crd_files = list(crd_files) if crd_files is not None else default_crd_files()
        self.namespaces = list(namespaces)
        self.token = token
        self.keep_work_dir = keep_work_dir
        self.store = ObjectStore()
        self.core = CoreApi(store=self.store, users_by_token={token: "admin"})
        self.kubelet = Kubelet(self.store, start_delay_s=start_delay_s, on_pod_start=on_pod_start,
                               on_pod_stop=on_pod_stop)
        self.work_dir: Path | None = None
        self.etcd: Etcd | None = None
        self.crd_server: CrdServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = False

    # -- addresses

    @property
    def url(self) -> str:
        """The one URL clients use (core API, proxying the CRD server)."""
        return self.core.url

    @property
    def kubeconfig_path(self) -> Path:
        assert self.work_dir is not None, "the cluster is not started"
        return self.work_dir / "kubeconfig"

    # -- async lifecycle

    async def start(self) -> None:
        crd_binary = crd_server_binary()
        etcd = etcd_binary()
        self.work_dir = Path(tempfile.mkdtemp(prefix="va-cluster-", dir=_tmp_root()))
        try:
            await self.core.start()
            core_kubeconfig = self.work_dir / "core.kubeconfig"
            core_kubeconfig.write_text(kubeconfig_text(self.core.url, self.token, name="core"))
            self.etcd = Etcd(self.work_dir, binary=etcd)
            await self.etcd.start()
            self.crd_server = CrdServer(self.work_dir, self.etcd.url, core_kubeconfig, binary=crd_binary)
            await self.crd_server.start()
            self.core.set_upstream(self.crd_server.url)
            for name in self.namespaces:
                if self.store.find(self.store.type("", "namespaces"), "", name) is None:
                    self.store.create(self.store.type("", "namespaces"), "", {"metadata": {"name": name}})
            await self.install_crds(crd_documents(self.crd_files))
            await self.kubelet.start()
            self.kubeconfig_path.write_text(kubeconfig_text(self.core.url, self.token))
            self.core.clear_requests()  # the log then starts with the clients' own calls
            self._started = True
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await self.kubelet.stop()
        await self.core.stop()
        if self.crd_server:
            await self.crd_server.stop()
        if self.etcd:
            await self.etcd.stop()
        if self.work_dir and not self.keep_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        self._started = False

    async def __aenter__(self) -> EmulatedCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- sync lifecycle: the cluster's loop runs on its own thread

    def __enter__(self) -> EmulatedCluster:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="emulated-cluster", daemon=True)
        self._thread.start()
        try:
            self.call(self.start)
        except BaseException:
            self._close_loop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.stop)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=30)
            self._loop.close()
            self._loop = None

    def call(self, fn: Callable[..., Awaitable[T] | T], *args: Any, timeout_s: float = 120) -> T:
        """Run `fn(*args)` in the cluster's loop, awaiting it if it is a coroutine function, from
        another thread (sync mode only): the store, kubelet and core API belong to that loop."""
        if self._loop is None:
            raise RuntimeError("call() is for a cluster entered with `with`; in async code await directly")

        async def invoke() -> T:
            result = fn(*args)
            return await result if inspect.isawaitable(result) else result

        return asyncio.run_coroutine_threadsafe(invoke(), self._loop).result(timeout_s)

    # -- CRDs

    async def install_crds(self, documents: list[dict[str, Any]], timeout_s: float = 30) -> None:
        """Create or update CRDs through the one URL and wait until each is Established and listed
        in discovery, so a client that starts right after sees the resource."""
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        base = f"{self.url}/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as http:
            for doc in documents:
                async with http.post(base, json=doc) as resp:
                    if resp.status == 409:
                        async with http.get(f"{base}/{doc['metadata']['name']}") as current:
                            existing = await current.json()
                        doc = {**doc, "metadata": {**doc["metadata"],
                                                   "resourceVersion": existing["metadata"]["resourceVersion"]}}
                        async with http.put(f"{base}/{doc['metadata']['name']}", json=doc) as update:
                            if update.status >= 300:
                                raise SubstrateStartError(f"updating CRD {doc['metadata']['name']} failed: "
                                                          f"{await update.text()}")
                    elif resp.status >= 300:
                        raise SubstrateStartError(f"creating CRD {doc['metadata']['name']} failed: "
                                                  f"{await resp.text()}")
            for doc in documents:
                await self._wait_established(http, base, doc, timeout_s)

    async def _wait_established(self, http: aiohttp.ClientSession, base: str, doc: dict[str, Any],
                                timeout_s: float) -> None:
        name = doc["metadata"]["name"]
        group, plural = doc["spec"]["group"], doc["spec"]["names"]["plural"]
        versions = [v["name"] for v in doc["spec"]["versions"] if v.get("served", True)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            async with http.get(f"{base}/{name}") as resp:
                crd = await resp.json()
            conditions = {c["type"]: c["status"] for c in (crd.get("status") or {}).get("conditions") or []}
            if conditions.get("Established") == "True":
                discoverable = True
                for version in versions:
                    async with http.get(f"{self.url}/apis/{group}/{version}") as resp:
                        listed = await resp.json() if resp.status == 200 else {}
                    discoverable &= any(r.get("name") == plural for r in listed.get("resources", []))
                if discoverable:
                    return
            await asyncio.sleep(0.05)
        raise SubstrateStartError(f"CRD {name} was not established and discoverable within {timeout_s} s")

    # -- clients

    def kubectl(self, *args: str, input: str | None = None, check: bool = False,
                timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster (its own discovery cache dir). Never call it from the
        cluster's event loop: the loop must keep serving while kubectl waits."""
        cache = self.kubeconfig_path.parent / "kubectl-cache"
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig_path)}
        return subprocess.run([KUBECTL, f"--kubeconfig={self.kubeconfig_path}", f"--cache-dir={cache}", *args],
                              input=input, capture_output=True, text=True, check=check, timeout=timeout_s, env=env)

    def api_client(self) -> Any:
        """A `kubernetes.client.ApiClient` for this cluster, independent of $KUBECONFIG."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig_path))


async def serve_until_stopped(cluster: EmulatedCluster, kubeconfig_out: Path | None = None) -> None:
    """Run `cluster` until SIGINT or SIGTERM, announcing how to reach it (for `make live`)."""
    import signal
    import sys

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with cluster:
        kubeconfig = cluster.kubeconfig_path
        if kubeconfig_out is not None:
            kubeconfig_out.parent.mkdir(parents=True, exist_ok=True)
            kubeconfig_out.write_text(kubeconfig.read_text())
            kubeconfig = kubeconfig_out
        print(f"emulated cluster at {cluster.url} (CRD server {cluster.crd_server.url}, logs in {cluster.work_dir})\n"
              f"export KUBECONFIG={kubeconfig}", flush=True, file=sys.stderr)
        await stop.wait()
    if kubeconfig_out is not None:
        kubeconfig_out.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m variant_autoscaler_testbed.cluster",
        description="Start an emulated Kubernetes cluster (real CRD server on etcd, emulated core API and "
                    "kubelet) on 127.0.0.1 with the CRDs from crds/, until Ctrl-C.")
    parser.add_argument("--kubeconfig", type=Path, help="also write the kubeconfig here (removed on exit)")
    parser.add_argument("--namespace", action="append", default=[], help="create this namespace (repeatable)")
    parser.add_argument("--start-delay", type=float, default=0.5,
                        help="seconds a pod takes to become Ready (model server cold start), default 0.5")
    parser.add_argument("--keep-work-dir", action="store_true", help="keep etcd data and server logs on exit")
    args = parser.parse_args(argv)
    cluster = EmulatedCluster(namespaces=args.namespace, start_delay_s=args.start_delay,
                              keep_work_dir=args.keep_work_dir)
    asyncio.run(serve_until_stopped(cluster, args.kubeconfig))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

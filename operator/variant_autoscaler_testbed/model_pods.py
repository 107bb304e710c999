"""Emulated model-server pods: every pod of an annotated Deployment runs an emulated vLLM server.

Why: the operator's end-to-end behaviour (load rises -> it scales up -> the new pods take traffic ->
load falls -> it scales down) only shows when pods the operator creates really serve requests and
really export vLLM metrics that a real Prometheus scrapes. `ModelPods` installs itself as the
emulated kubelet's start/stop hooks: a pod whose template carries `MODEL_SERVER_ANNOTATION` (a JSON
`ModelServerConfig` without host/port) gets a server on the pod's port, and Prometheus's targets are
kept equal to the running servers, labelled with `namespace` and `pod` as a Kubernetes service
discovery would. `ModelGateway` stands in for the inference gateway: one URL that sends each request
to the ready pod of its model with the fewest requests in flight, or, given `flow` settings, follows
the operator's published saturation and routing weights (`variant_autoscaler_testbed.gateway`: holds
requests while the pool is saturated, picks the variant by weight for the request's length bucket).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from variant_autoscaler_testbed.gateway import FlowControlSettings, FlowGate
from variant_autoscaler_testbed.kubelet import Kubelet, PodInfo, pod_is_ready
from variant_autoscaler_testbed.model_server import CompletionRequest, EmulatedModelServer, ModelServerConfig
from variant_autoscaler_testbed.prometheus import PrometheusServer, ScrapeTarget

MODEL_SERVER_ANNOTATION = "emulation.variant-autoscaler.io/model-server"
LATENCY_SAMPLES = 100_000

log = logging.getLogger(__name__)


def model_server_annotation(config: dict) -> dict[str, str]:
    """Pod-template annotations that make the emulated kubelet run this server config."""
    ModelServerConfig.model_validate({**config, "port": 0})  # fail early, in the test, not in the kubelet
    return {MODEL_SERVER_ANNOTATION: json.dumps(config, separators=(",", ":"))}


@dataclass
class _Running:
    info: PodInfo
    server: EmulatedModelServer
    in_flight: int = 0


@dataclass
class ModelPods:
    """Kubelet hooks running one emulated vLLM server per annotated pod, scraped by `prometheus`."""

    kubelet: Kubelet
    prometheus: PrometheusServer | None = None
    running: dict[str, _Running] = field(default_factory=dict)

    def install(self) -> ModelPods:
        self.kubelet.on_pod_start = self.on_start
        self.kubelet.on_pod_stop = self.on_stop
        return self

    def uninstall(self) -> None:
        self.kubelet.on_pod_start = None
        self.kubelet.on_pod_stop = None

    async def on_start(self, info: PodInfo) -> None:
        raw = info.annotations.get(MODEL_SERVER_ANNOTATION)
        if raw is None:
            return
        config = ModelServerConfig.model_validate({**json.loads(raw), "host": "127.0.0.1", "port": info.port})
        server = await EmulatedModelServer(config).start()
        self.running[info.uid] = _Running(info=info, server=server)
        await self._sync_targets()

    async def on_stop(self, info: PodInfo) -> None:
        run = self.running.pop(info.uid, None)
        if run is None:
            return
        await self._sync_targets()
        await run.server.stop()

    async def stop_all(self) -> None:
        runs = list(self.running.values())
        self.running.clear()
        await self._sync_targets()
        await asyncio.gather(*(r.server.stop() for r in runs), return_exceptions=True)

    async def _sync_targets(self) -> None:
        if self.prometheus is None:
            return
        targets = [ScrapeTarget(address=f"127.0.0.1:{r.info.port}",
                                labels={"namespace": r.info.namespace, "pod": r.info.name})
                   for r in sorted(self.running.values(), key=lambda r: r.info.name)]
        await asyncio.to_thread(self.prometheus.set_targets, targets)

    def ready_pods(self, model: str) -> list[_Running]:
        pods = self.kubelet.store.type("", "pods")
        out = []
        for r in self.running.values():
            if r.server.config.model != model:
                continue
            pod = self.kubelet.store.find(pods, r.info.namespace, r.info.name)
            if pod is not None and pod_is_ready(pod) and not pod["metadata"].get("deletionTimestamp"):
                out.append(r)
        return out


@dataclass
class ModelGateway:
    """One URL for completions: least-outstanding over the ready pods of the model, or, with `flow`,
    flow control on the operator's /metrics (hold at saturation >= 1.0, variant by routing weight)."""

    pods: ModelPods
    host: str = "127.0.0.1"
    port: int = 0
    url: str = ""
    routed: dict[str, int] = field(default_factory=dict)
    flow: FlowControlSettings | None = None

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.gate: FlowGate | None = FlowGate(self.flow, self.pods.ready_pods) if self.flow is not None else None
        self._stopping = asyncio.Event()
        self._poller: asyncio.Task | None = None
        self.latencies_s: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)

    @property
    def mode(self) -> str:
        if self.gate is None:
            return "least-outstanding"
        return "flow-controlled" if self.gate.settings.hold else "weighted, no holds"

    async def start(self) -> ModelGateway:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://{self.host}:{self.port}"
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        if self.gate is not None:
            self._poller = asyncio.create_task(self.gate.run(self._session, self._stopping))
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self.gate is not None:
            self.gate.stop()
        if self._poller is not None:
            await asyncio.gather(self._poller, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _completions(self, request: web.Request) -> web.Response:
        """Times every answered request from its arrival at the gateway (holds included)."""
        started = time.monotonic()
        response = await self._handle(request)
        if response.status == 200:
            self.latencies_s.append(time.monotonic() - started)
        return response

    def latency_quantiles(self, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict[float, float]:
        """Gateway-side end-to-end latency of the requests answered 200 (nearest rank); empty when none."""
        done = sorted(self.latencies_s)
        return {q: done[min(len(done) - 1, max(0, math.ceil(q * len(done)) - 1))] for q in qs} if done else {}

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.gate is not None:
            return await self._flow_completions(request, body)
        try:
            model = json.loads(body).get("model", "")
        except ValueError:
            return web.json_response({"error": {"message": "body is not JSON"}}, status=400)
        candidates = self.pods.ready_pods(model)
        if not candidates:
            return web.json_response({"error": {"message": f"no ready replica serves {model!r}"}}, status=503)
        pick = min(candidates, key=lambda r: (r.in_flight, r.info.name))
        pick.in_flight += 1
        return await self._forward(pick, body)

    async def _flow_completions(self, request: web.Request, body: bytes) -> web.Response:
        try:
            req = CompletionRequest.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ())) or "body"
            return web.json_response({"error": {"message": f"invalid completion request: {where}: {first['msg']}"}},
                                     status=400)
        pick, status, message = await self.gate.admit(req.model, req.prompt_tokens(), req.max_tokens,
                                                      request.headers.get("X-Request-Id"))
        if pick is None:
            return web.json_response({"error": {"message": message}}, status=status)
        return await self._forward(pick, body)

    async def _forward(self, pick: _Running, body: bytes) -> web.Response:
        """Send to the picked pod, whose in-flight count the caller raised; lowered here."""
        self.routed[pick.info.name] = self.routed.get(pick.info.name, 0) + 1
        try:
            async with self._session.post(f"{pick.server.url}/v1/completions", data=body,
                                          headers={"Content-Type": "application/json"}) as up:
                return web.Response(status=up.status, body=await up.read(), content_type="application/json")
        except aiohttp.ClientError as exc:
            return web.json_response({"error": {"message": f"replica {pick.info.name} failed: {exc}"}}, status=502)
        finally:
            pick.in_flight -= 1

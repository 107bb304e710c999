"""The emulated gateway's flow-controlled mode follows what the operator publishes on its /metrics.

Real parts throughout: the operator's own `Exporter` and `MetricsServer` serve the saturation and
routing-weight gauges over HTTP on 127.0.0.1, the emulated kubelet starts one emulated vLLM server per
pod of real Deployments, and requests go through the gateway over HTTP. The decision the exporter
serves is set with `Exporter.publish`, as the operator's cycle does.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
import pytest
from operator_harness import H100_PROFILE, L4_PROFILE, Kube, server_profile, wait_until
from variant_autoscaler.exporter import DecisionSnapshot, Exporter, MetricsServer, RoutingWeight
from variant_autoscaler.histogram_estimates import joint_length_mix, token_distribution
from variant_autoscaler.saturation import PoolSaturation
from variant_autoscaler_testbed.gateway import (
    FlowControlSettings,
    cell_for,
    parse_cell,
    parse_operator_metrics,
)
from variant_autoscaler_testbed.model_pods import ModelGateway, ModelPods, model_server_annotation
from variant_autoscaler_testbed.vllm_metrics import one_two_five_buckets

MODEL = "gw/chat-1b"
SHORT = {"prompt_token_count": 100, "max_tokens": 2}  # the operator's cell in50-100xout1-2
SHORT_CELL = "in50-100xout1-2"
LONG_CELL = "in200-500xout1-2"


@pytest.fixture(scope="module")
def world(emulated_cluster, kube_api):
    """A namespace with two variants of MODEL (one fast pod, two cheap pods), and the operator's exporter."""
    from kubernetes import client

    ns = f"gw-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(kube_api).create_namespace({"metadata": {"name": ns}})
    pods = ModelPods(emulated_cluster.kubelet).install()
    kube = Kube(kube_api, ns)
    for name, replicas, profile in (("gw-fast", 1, H100_PROFILE), ("gw-cheap", 2, L4_PROFILE)):
        kube.deploy(name, replicas, model_server_annotation(
            {"model": MODEL, "profile": server_profile(profile), "max_batch": 64, "time_scale": 20.0}))
    for name, replicas in (("gw-fast", 1), ("gw-cheap", 2)):
        kube.wait_ready(name, replicas)
    wait_until(lambda: len(pods.ready_pods(MODEL)) == 3, timeout_s=30, what="three ready pods serving the model")
    exporter = Exporter()
    server = emulated_cluster.call(MetricsServer(exporter).start)
    try:
        yield emulated_cluster, ns, pods, exporter, server
    finally:
        emulated_cluster.call(server.stop)
        pods.uninstall()
        emulated_cluster.call(pods.stop_all)
        client.CoreV1Api(kube_api).delete_namespace(ns)


def _publish(exporter: Exporter, ns: str, saturation: float | None, weights: dict[str, dict[str, float]] | None = None,
             at: float | None = None) -> None:
    pools = [] if saturation is None else [
        PoolSaturation(namespace=ns, pool=MODEL, stage=stage, saturation=saturation)
        for stage in ("prefill", "decode", "effective")]
    routing = [RoutingWeight(model=MODEL, bucket=bucket, namespace=ns, variant=v, weight=w)
               for bucket, shares in (weights or {}).items() for v, w in shares.items()]
    exporter.publish(DecisionSnapshot(pools=pools, routing=routing), at=time.time() if at is None else at)


class Gateway:
    """A flow-controlled gateway for one test, and a client that talks to it from the cluster's loop."""

    def __init__(self, world, **flow):
        self.cluster, self.ns, pods, _, server = world
        settings = FlowControlSettings(metrics_url=f"{server.url}/metrics", **{"poll_interval_s": 0.05, **flow})
        self.gateway = self.cluster.call(ModelGateway(pods, flow=settings).start)
        self.gate = self.gateway.gate

    def close(self) -> None:
        self.cluster.call(self.gateway.stop)

    def saturation(self) -> float:
        return self.gate.signal.saturation(self.gate.settings.pool_of(MODEL))[0]

    async def _post(self, http: aiohttp.ClientSession, body: dict, request_id: str | None = None):
        headers = {"X-Request-Id": request_id} if request_id else {}
        async with http.post(f"{self.gateway.url}/v1/completions", json={"model": MODEL, **body},
                             headers=headers) as resp:
            return resp.status, await resp.json()

    def post(self, body: dict | None = None) -> tuple[int, dict]:
        async def one():
            async with aiohttp.ClientSession() as http:
                return await self._post(http, body or SHORT)
        return self.cluster.call(one)

    def post_many(self, bodies: list[dict]) -> list[tuple[int, dict]]:
        async def many():
            async with aiohttp.ClientSession() as http:
                return await asyncio.gather(*(self._post(http, b) for b in bodies))
        return self.cluster.call(many)


@pytest.fixture
def gateway(world):
    made = []

    def make(**flow) -> Gateway:
        made.append(Gateway(world, **flow))
        return made[-1]
    yield make
    for g in made:
        g.close()


def test_held_at_saturation_and_released_in_arrival_order_when_it_drops(world, gateway):
    _, ns, _, exporter, _ = world
    _publish(exporter, ns, 1.25)
    g = gateway(hold_timeout_s=60)
    wait_until(lambda: g.saturation() == 1.25, timeout_s=10, what="the gateway to read saturation 1.25")

    async def scenario():
        async with aiohttp.ClientSession() as http:
            tasks = []
            for i in range(5):
                tasks.append(asyncio.create_task(g._post(http, {**SHORT, "prompt_token_count": 60 + i}, f"r{i}")))
                for _ in range(400):  # bounded: each arrival is held before the next is sent
                    if g.gate.held(MODEL) == i + 1:
                        break
                    await asyncio.sleep(0.01)
            held_while_saturated = (g.gate.held(MODEL), sum(t.done() for t in tasks), g.gate.counts.released)
            _publish(exporter, ns, 0.4)
            return held_while_saturated, await asyncio.gather(*tasks)

    (held, done, released), replies = g.cluster.call(scenario)
    assert (held, done, released) == (5, 0, 0)
    assert [status for status, _ in replies] == [200] * 5
    assert [rid for _, rid, _ in g.gate.dispatch_log] == ["r0", "r1", "r2", "r3", "r4"]
    assert (g.gate.counts.held, g.gate.counts.released, g.gate.counts.refused_timeout) == (5, 5, 0)
    assert g.post()[0] == 200 and g.gate.counts.held == 5  # below 1.0 a new request is not held
    assert len(g.gateway.latencies_s) == 6 and set(g.gateway.latency_quantiles()) == {0.5, 0.9, 0.99}


def test_held_beyond_the_timeout_is_refused_503_and_a_full_queue_429(world, gateway):
    _, ns, _, exporter, _ = world
    _publish(exporter, ns, 2.0)
    g = gateway(hold_timeout_s=0.3, max_held_requests=2)
    wait_until(lambda: g.saturation() == 2.0, timeout_s=10, what="the gateway to read saturation 2.0")
    replies = g.post_many([SHORT, SHORT, SHORT])
    statuses = sorted(status for status, _ in replies)
    assert statuses == [429, 503, 503]
    timed_out = next(body for status, body in replies if status == 503)["error"]["message"]
    assert "held 0.3 s at the gateway" in timed_out and "saturation 2" in timed_out and MODEL in timed_out
    full = next(body for status, body in replies if status == 429)["error"]["message"]
    assert "hold queue" in full and "full" in full
    assert (g.gate.counts.refused_timeout, g.gate.counts.refused_full, g.gate.counts.released) == (2, 1, 0)
    assert g.gate.held(MODEL) == 0
    assert len(g.gateway.latencies_s) == 0 and g.gateway.latency_quantiles() == {}  # only answered 200 are timed


def test_stale_or_missing_signal_fails_closed_after_the_grace(world, gateway):
    cluster, ns, _, exporter, server = world
    # missing: nothing published for the pool; within a long grace the gateway dispatches ...
    _publish(exporter, ns, None)
    open_gate = gateway(stale_after_s=600, hold_timeout_s=0.3)
    wait_until(lambda: open_gate.gate.signal.polls_ok > 0, timeout_s=10, what="a first scrape")
    assert open_gate.post()[0] == 200
    # ... and once the grace has passed it holds, then refuses saying why
    shut = gateway(stale_after_s=0.2, hold_timeout_s=0.3)
    wait_until(lambda: shut.gate.closed(MODEL)[0], timeout_s=10, what="the missing signal to close the pool")
    status, body = shut.post()
    assert status == 503 and "no saturation for pool" in body["error"]["message"]
    assert "fail closed" in body["error"]["message"]

    # stale: the operator's last successful cycle is older than the grace, though the value reads 0.1
    _publish(exporter, ns, 0.1, at=time.time() - 3600)
    old = gateway(stale_after_s=5, hold_timeout_s=0.3)
    wait_until(lambda: old.gate.signal.polls_ok > 0, timeout_s=10, what="a first scrape")
    assert old.gate.closed(MODEL)[0]
    status, body = old.post()
    assert status == 503 and "s old" in body["error"]["message"] and "fail closed" in body["error"]["message"]

    # unreachable: fresh values, then the operator's /metrics goes away
    _publish(exporter, ns, 0.1)
    gone = gateway(stale_after_s=0.3, hold_timeout_s=0.3)
    wait_until(lambda: gone.saturation() == pytest.approx(0.1), timeout_s=10, what="a fresh 0.1")
    assert gone.post()[0] == 200
    port = server.port
    cluster.call(server.stop)
    try:
        wait_until(lambda: gone.gate.closed(MODEL)[0], timeout_s=10, what="the unreachable signal to close the pool")
        status, body = gone.post()
        assert status == 503 and "last scrape failed" in body["error"]["message"]
    finally:
        server.port = port
        cluster.call(server.start)
    assert gone.gate.signal.polls_failed > 0


def test_split_across_variants_follows_the_weights_per_bucket(world, gateway):
    _, ns, pods, exporter, _ = world
    _publish(exporter, ns, 0.3, {SHORT_CELL: {"gw-cheap": 0.75, "gw-fast": 0.25},
                                 LONG_CELL: {"gw-fast": 1.0},
                                 "in1000-2000xout1-2": {"gw-gone": 1.0}})
    g = gateway(hold_timeout_s=30)
    wait_until(lambda: (MODEL, SHORT_CELL) in g.gate.signal.reading.weights, timeout_s=10, what="the weights")
    n = 120
    replies = g.post_many([SHORT] * n)
    assert all(status == 200 for status, _ in replies)
    counts = dict(g.gate.counts.per_variant)
    assert abs(counts.get("gw-cheap", 0) - 0.75 * n) <= 0.05 * n
    assert abs(counts.get("gw-fast", 0) - 0.25 * n) <= 0.05 * n
    cheap_pods = {r.info.name for r in pods.ready_pods(MODEL) if r.info.deployment == "gw-cheap"}
    assert all(g.gateway.routed.get(p, 0) > 0 for p in cheap_pods)  # least-outstanding within the variant

    before = dict(g.gate.counts.per_variant)
    assert all(s == 200 for s, _ in g.post_many([{"prompt_token_count": 400, "max_tokens": 2}] * 10))
    assert g.gate.counts.per_variant["gw-fast"] - before.get("gw-fast", 0) == 10
    # a variant with no ready pod: any ready pod; a cell without weights: unguided
    assert g.post({"prompt_token_count": 1500, "max_tokens": 2})[0] == 200
    assert g.post({"prompt_token_count": 100, "max_tokens": 40})[0] == 200
    assert (g.gate.counts.weighted, g.gate.counts.fallback, g.gate.counts.unguided) == (n + 10, 1, 1)


def test_weights_only_mode_never_holds_on_saturation(world, gateway):
    _, ns, _, exporter, _ = world
    _publish(exporter, ns, 3.0, {SHORT_CELL: {"gw-fast": 1.0}})
    g = gateway(hold=False, hold_timeout_s=0.3)
    wait_until(lambda: g.saturation() == 3.0, timeout_s=10, what="the gateway to read saturation 3.0")
    assert all(status == 200 for status, _ in g.post_many([SHORT] * 4))
    assert (g.gate.counts.held, g.gate.counts.per_variant) == (0, {"gw-fast": 4})
    assert g.gateway.mode == "weighted, no holds"


def test_bad_request_is_refused_400_with_the_field(world, gateway):
    g = gateway()
    status, body = g.post({"max_tokens": 0, "prompt_token_count": 10})
    assert status == 400 and "max_tokens" in body["error"]["message"]


def test_request_cells_match_the_operators_bucket_names():
    """The operator names cells from the servers' 1-2-5 histograms; the gateway finds the same cell."""
    edges = list(one_two_five_buckets(8192)) + [float("inf")]
    requests = [(100, 40)] * 3 + [(400, 20)] * 2 + [(7, 1)] + [(3000, 700)]

    def cumulative(values):
        return [(le, float(sum(v <= le for v in values))) for le in edges]
    prompts, outputs = [p for p, _ in requests], [o for _, o in requests]
    mix = joint_length_mix(token_distribution(cumulative(prompts), sum(prompts) / len(prompts)),
                           token_distribution(cumulative(outputs), sum(outputs) / len(outputs)), min_share=0.0)
    cells = [c for c in (parse_cell(b.name) for b in mix) if c is not None]
    assert len(cells) == len(mix)
    for p, o in set(requests):
        cell = cell_for(cells, p, o)
        assert cell is not None and cell.in_lo < p <= cell.in_hi and cell.out_lo < o <= cell.out_hi
    assert cell_for(cells, 100, 40).label == "in50-100xout20-50"
    assert parse_cell("in120xout40") is None
    with pytest.raises(ValueError, match="loopback"):
        FlowControlSettings(metrics_url="http://10.0.0.1:9100/metrics")


def test_parse_reads_the_exporters_text_and_an_infinite_saturation_holds():
    exporter = Exporter()
    exporter.publish(DecisionSnapshot(
        pools=[PoolSaturation(namespace="a", pool="p", stage="prefill", saturation=0.5),
               PoolSaturation(namespace="a", pool="p", stage="decode", saturation=float("inf"))],
        routing=[RoutingWeight(model=MODEL, bucket=SHORT_CELL, namespace="a", variant="v", weight=1.0)]), at=123.0)
    reading = parse_operator_metrics(exporter.render().decode())
    assert reading.saturation == {("a", "p"): float("inf")}  # no effective stage: the larger one
    assert reading.weights == {(MODEL, SHORT_CELL): {("a", "v"): 1.0}} and reading.last_cycle_s == 123.0
    assert [c.label for c in reading.cells[MODEL]] == [SHORT_CELL]

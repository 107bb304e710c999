"""End to end: the operator process (kopf + loop) on the emulated cluster, a real Prometheus scraping
emulated vLLM pods that the emulated kubelet starts for the operator's replicas, and a load ramp.

Load rises -> the operator scales up the cheapest variant that meets the SLO (not the cheapest per
hour, which cannot meet it, nor the fast expensive one) -> load falls -> it scales down once the
stabilization window has passed. The exporter's /metrics is scraped along the way.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import yaml
from conftest_metrics import BackgroundLoop
from operator_harness import (
    H100_PROFILE,
    L4_PROFILE,
    T4_PROFILE,
    TINY_MODEL,
    Kube,
    OperatorThread,
    server_profile,
    settings_dict,
    variant,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families
from variant_autoscaler.operator import RunOptions
from variant_autoscaler_testbed.load import LoadSpec, generate_load
from variant_autoscaler_testbed.model_pods import ModelGateway, ModelPods, model_server_annotation
from variant_autoscaler_testbed.prometheus import PrometheusNotInstalled, PrometheusServer, free_port

MODEL = TINY_MODEL["name"]
MIX = [{"prompt_tokens": 100, "max_tokens": 40}]
DOWN_WINDOW_S = 8


@pytest.fixture(scope="module")
def prometheus():
    try:
        prom = PrometheusServer([]).start()
    except PrometheusNotInstalled as exc:
        pytest.skip(str(exc))
    yield prom
    prom.stop()


@pytest.fixture(scope="module")
def model_pods(emulated_cluster, prometheus):
    pods = ModelPods(emulated_cluster.kubelet, prometheus).install()
    gateway = emulated_cluster.call(ModelGateway(pods).start)
    yield pods, gateway
    emulated_cluster.call(gateway.stop)
    pods.uninstall()
    emulated_cluster.call(pods.stop_all)


def _annotations(profile: dict) -> dict:
    return model_server_annotation({"model": MODEL, "profile": server_profile(profile), "max_batch": 32})


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    async def get():
        async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
            return await resp.text()
    out = {}
    for fam in text_string_to_metric_families(asyncio.run(get())):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_load_rise_scales_up_the_cheapest_variant_meeting_the_slo_and_fall_scales_down(
        emulated_cluster, kube_api, kube_namespace, prometheus, model_pods, tmp_path):
    pods, gateway = model_pods
    kube = Kube(kube_api, kube_namespace)
    for name, replicas, profile in (("chat-l4", 1, L4_PROFILE), ("chat-h100", 0, H100_PROFILE),
                                    ("chat-t4", 0, T4_PROFILE)):
        kube.deploy(name, replicas, _annotations(profile))
    kube.apply_variant(variant("chat-l4", "chat-l4", accelerator="L4", profile=L4_PROFILE, min_replicas=1))
    kube.apply_variant(variant("chat-h100", "chat-h100", accelerator="H100", profile=H100_PROFILE, min_replicas=0))
    kube.apply_variant(variant("chat-t4", "chat-t4", accelerator="T4", profile=T4_PROFILE, min_replicas=0))
    settings = settings_dict(prometheus={"url": prometheus.url, "timeout_s": 3}, scale_down_window_s=DOWN_WINDOW_S,
                             watched_namespaces=[kube_namespace])
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    port = free_port()
    options = RunOptions(settings_file=path, kubeconfig=emulated_cluster.kubeconfig_path, metrics_host="127.0.0.1",
                         metrics_port=port, standalone=True, namespaces=(kube_namespace,), instance="e2e")
    metrics_url = f"http://127.0.0.1:{port}"
    l4_key = (("accelerator", "L4"), ("model", MODEL), ("namespace", kube_namespace), ("role", "both"),
              ("variant", "chat-l4"))

    loads = BackgroundLoop()

    def load(rate: float, stop: asyncio.Event, seconds: float = 120):
        spec = LoadSpec(targets=[gateway.url], model=MODEL, phases=[{"duration_s": seconds, "rate_rps": rate}],
                        mix=MIX, arrivals="uniform", drain_timeout_s=5, max_requests=5000)
        return loads.submit(generate_load(spec, stop))

    stop_high, stop_low = loads.run(_event()), loads.run(_event())
    try:
        _scenario(kube, options, gateway, metrics_url, l4_key, kube_namespace, load, loads, stop_high, stop_low)
    finally:
        for stop in (stop_high, stop_low):
            loads.loop.call_soon_threadsafe(stop.set)
        loads.close()


def _scenario(kube, options, gateway, metrics_url, l4_key, kube_namespace, load, loads, stop_high, stop_low):
    with OperatorThread(options) as op:
        started = time.monotonic()
        high = load(5.0, stop_high)
        wait_until(lambda: kube.replicas("chat-l4") >= 3, timeout_s=60, interval_s=1,
                   what="the L4 variant to scale up under 5 req/s")
        assert kube.replicas("chat-h100") == 0 and kube.replicas("chat-t4") == 0
        up_after = time.monotonic() - started
        kube.wait_ready("chat-l4", kube.replicas("chat-l4"))
        metrics = wait_until(lambda: (m := _scrape(metrics_url)).get(("variant_autoscaler_variant_normalized_load",
                                                                      l4_key)) is not None and m,
                             timeout_s=20, what="a normalized load for the L4 variant")
        assert metrics[("variant_autoscaler_desired_replicas", l4_key)] >= 3
        assert metrics[("wva_desired_replicas", (("accelerator_type", "L4"), ("namespace", kube_namespace),
                                                 ("variant_name", "chat-l4")))] >= 3
        assert 2.0 < metrics[("variant_autoscaler_model_arrival_rate_rps", (("model", MODEL),))] < 8.0
        assert metrics[("variant_autoscaler_active", ())] == 1.0
        pool = {stage: metrics.get(("variant_autoscaler_pool_saturation", (("inference_pool", MODEL),
                                                                           ("namespace", kube_namespace),
                                                                           ("stage", stage))))
                for stage in ("prefill", "decode", "effective")}
        # Only the L4 variant has ready replicas: the pool's saturation is its normalized load, every stage.
        l4_load = metrics[("variant_autoscaler_variant_normalized_load", l4_key)]
        assert pool == {stage: pytest.approx(l4_load) for stage in pool} and l4_load > 0
        t4_cap = metrics.get(("variant_autoscaler_capacity_per_replica_rps",
                              (("accelerator", "T4"), ("model", MODEL), ("namespace", kube_namespace),
                               ("role", "both"), ("variant", "chat-t4"))))
        assert t4_cap == 0.0, "the T4 variant cannot meet the ITL target"
        assert gateway.routed and len([p for p in gateway.routed if p.startswith("chat-l4")]) >= 2

        loads.loop.call_soon_threadsafe(stop_high.set)
        high.result(timeout=30)
        low = load(0.3, stop_low)
        fall = time.monotonic()
        wait_until(lambda: kube.replicas("chat-l4") == 1, timeout_s=90, interval_s=1,
                   what="the L4 variant to scale down after the load fell")
        assert time.monotonic() - fall >= DOWN_WINDOW_S
        loads.loop.call_soon_threadsafe(stop_low.set)
        low.result(timeout=30)
    assert op.error is None
    assert kube.events("ScaledUp", "chat-l4") and kube.events("ScaledDown", "chat-l4")
    status = kube.variant("chat-l4")["status"]
    assert status["observedLoad"]["meanInputTokens"] == pytest.approx(100, rel=0.3)
    assert {c["type"]: c["status"] for c in status["conditions"]}["MetricsAvailable"] == "True"
    assert up_after < 60


async def _event() -> asyncio.Event:
    return asyncio.Event()


def test_live_demo_objects_parse_and_its_ramp_fits_the_duration():
    from variant_autoscaler.resources import parse_variant
    from variant_autoscaler_testbed.live import _objects, ramp

    deployments, variants = _objects()
    parsed = [parse_variant({**v, "metadata": {**v["metadata"], "namespace": "demo"}}) for v in variants]
    assert {p.target.name for p in parsed} == {d["metadata"]["name"] for d in deployments}
    phases = ramp(300)
    assert sum(p["duration_s"] for p in phases) == pytest.approx(300)
    assert max(p["rate_rps"] for p in phases) > 4 * min(p["rate_rps"] for p in phases)

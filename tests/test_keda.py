"""The KEDA path (metrics mode): the ScaledObjects we ship make KEDA set exactly the operator's decision.

Why live: a ScaledObject is only a PromQL string and a threshold; whether KEDA ends at the replicas the
operator decided depends on the query selecting one series of the metric the exporter really serves,
with the labels a real Prometheus keeps, and on KEDA's arithmetic. So the real exporter publishes a
decision on 127.0.0.1, a real Prometheus scrapes it, every shipped ScaledObject's exact query runs
against that Prometheus, and KEDA's documented formula turns the answer into replicas:

* metricType AverageValue (what we ship): the HPA KEDA manages computes
  ``desired = ceil(value / threshold)``, clamped to [minReplicaCount, maxReplicaCount]; with
  minReplicaCount 0, KEDA itself deactivates the target (0 replicas) while
  ``value <= activationThreshold`` (default 0).
* an empty result with ``ignoreNullValues: "false"`` is a scaler error, and on a scaler error the HPA
  keeps the replicas it has (no fallback is configured): a stopped operator must not read as "0".
"""

from __future__ import annotations

import math
import time
import urllib.error
from pathlib import Path

import pytest
import yaml
from chart_tools import generator
from conftest_metrics import BackgroundLoop, wait_until
from variant_autoscaler.exporter import DecisionSnapshot, Exporter, MetricsServer, VariantReading
from variant_autoscaler_testbed.prometheus import PrometheusNotInstalled, PrometheusServer, ScrapeTarget

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "deploy" / "keda" / "scaledobjects.yaml"
SAMPLE_VAS = REPO / "deploy" / "samples" / "variantautoscalings.yaml"


def scaled_objects() -> list[dict]:
    return [d for d in yaml.safe_load_all(SAMPLE.read_text()) if d]


def sample_vas() -> list[dict]:
    return [d for d in yaml.safe_load_all(SAMPLE_VAS.read_text()) if d and d.get("kind") == "VariantAutoscaling"]


def keda_replicas(scaled_object: dict, result: list[dict], current: int) -> int:
    """Replicas KEDA's Prometheus scaler + HPA end at for one query result (see the module doc)."""
    spec = scaled_object["spec"]
    trigger = spec["triggers"][0]
    meta = trigger["metadata"]
    if not result:
        if meta.get("ignoreNullValues", "true").lower() == "false":
            return current  # scaler error: the HPA holds
        value = 0.0
    else:
        assert len(result) == 1, "KEDA's Prometheus scaler rejects a query that returns several series"
        value = float(result[0]["value"][1])
    lo, hi = spec.get("minReplicaCount", 0), spec["maxReplicaCount"]
    if lo == 0 and value <= float(meta.get("activationThreshold", 0)):
        return 0
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
    return min(hi, max(lo, 1, math.ceil(value / float(meta["threshold"]))))


# ------------------------------------------------------------------------------------------------
# What we ship.


def test_sample_has_one_scaled_object_per_sample_variant_with_its_bounds():
    vas = {(va["metadata"]["namespace"], va["metadata"]["name"]): va for va in sample_vas()}
    objects = {(so["metadata"]["namespace"], so["metadata"]["name"]): so for so in scaled_objects()}
    assert set(objects) == set(vas) and len(vas) >= 6
    for key, so in objects.items():
        va, spec = vas[key], so["spec"]
        assert so["apiVersion"] == "keda.sh/v1alpha1" and so["kind"] == "ScaledObject"
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                          "name": va["spec"]["scaleTargetRef"]["name"]}
        assert spec["minReplicaCount"] == va["spec"].get("minReplicas", 1)
        assert spec["maxReplicaCount"] == va["spec"]["maxReplicas"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        assert trigger["metadata"]["threshold"] == "1"
        assert trigger["metadata"]["ignoreNullValues"] == "false", "an absent series must not read as 0"
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 0


def test_chart_renders_no_scaled_object_by_default_and_refuses_keda_in_direct_mode(helm):
    gen = generator()
    assert "ScaledObject" not in gen.helm_template(helm)
    with pytest.raises(RuntimeError, match="keda.enabled needs operator.actuationMode=metrics"):
        gen.helm_template(helm, "--set", "keda.enabled=true")
    with pytest.raises(RuntimeError, match="maxReplicas"):
        gen.helm_template(helm, "--set", "operator.actuationMode=metrics", "--set", "keda.enabled=true",
                          "--set-json", 'keda.scaledObjects=[{"name": "x", "namespace": "ns"}]')


def test_chart_keda_values_render_the_documented_defaults(helm):
    rendered = generator().helm_template(
        helm, "--set", "operator.actuationMode=metrics", "--set", "keda.enabled=true",
        "--set", "keda.prometheusServerAddress=http://prom.example:9090", "--set", "keda.pollingIntervalSeconds=7",
        "--set-json", 'keda.scaledObjects=[{"name": "chat-l4", "namespace": "serving", "maxReplicas": 3}]',
        "--show-only", "templates/keda-scaledobjects.yaml")
    (so,) = [d for d in yaml.safe_load_all(rendered) if d]
    spec = so["spec"]
    assert spec["scaleTargetRef"]["name"] == "chat-l4" and spec["minReplicaCount"] == 1
    assert spec["pollingInterval"] == 7
    meta = spec["triggers"][0]["metadata"]
    assert meta["serverAddress"] == "http://prom.example:9090"
    assert meta["query"] == 'max(variant_autoscaler_desired_replicas{namespace="serving",variant="chat-l4"})'


# ------------------------------------------------------------------------------------------------
# Live: real exporter -> real Prometheus -> the shipped queries -> KEDA's arithmetic.


def _reading(va: dict, desired: int) -> VariantReading:
    spec = va["spec"]
    return VariantReading(namespace=va["metadata"]["namespace"], name=va["metadata"]["name"], model=spec["modelID"],
                          accelerator=spec["accelerator"], role=spec.get("role", "both"), current_replicas=1,
                          ready_replicas=1, desired_replicas=desired, optimal_replicas=desired)


def test_keda_reaches_the_operators_desired_replicas_and_holds_when_the_series_is_gone():
    vas = sample_vas()
    # Every case KEDA's arithmetic distinguishes: 0 on a variant that may go to zero, 1, several, above max.
    desired = {}
    for i, va in enumerate(vas):
        lo, hi = va["spec"].get("minReplicas", 1), va["spec"]["maxReplicas"]
        desired[va["metadata"]["name"]] = [lo, 1, 3, hi + 2][i % 4]
    exporter = Exporter()
    exporter.publish(DecisionSnapshot(variants=[_reading(va, desired[va["metadata"]["name"]]) for va in vas]))
    loop = BackgroundLoop()
    server = loop.run(MetricsServer(exporter).start())
    try:
        try:
            prometheus = PrometheusServer([ScrapeTarget(address=server.url.removeprefix("http://"))],
                                          job="variant-autoscaler")
        except PrometheusNotInstalled as err:
            pytest.fail(f"{err} (run `make system-deps`)")
        with prometheus:
            objects = scaled_objects()

            def query(so):
                try:
                    return prometheus.query(so["spec"]["triggers"][0]["metadata"]["query"])
                except urllib.error.HTTPError as err:
                    pytest.fail(f"Prometheus rejects {so['metadata']['name']}'s query: {err.read().decode()}")

            wait_until(lambda: all(query(so) for so in objects), timeout_s=45, what="every ScaledObject's series")
            seen = {}
            for so in objects:
                name, spec = so["metadata"]["name"], so["spec"]
                want = min(spec["maxReplicaCount"], max(spec["minReplicaCount"], desired[name]))
                seen[name] = keda_replicas(so, query(so), current=5)
                assert seen[name] == want, f"{name}: KEDA would set {seen[name]}, operator decided {desired[name]}"
            assert len(set(seen.values())) >= 3, f"cases not distinct enough: {seen}"

            # The operator stops publishing one variant: the query goes empty (not 0) and KEDA holds.
            gone = vas[1]["metadata"]["name"]
            exporter.publish(DecisionSnapshot(variants=[_reading(va, desired[va["metadata"]["name"]])
                                                        for va in vas if va["metadata"]["name"] != gone]))
            so_gone = next(so for so in objects if so["metadata"]["name"] == gone)
            deadline = time.monotonic() + 45
            while query(so_gone) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert query(so_gone) == [], "Prometheus still answers for a variant the operator no longer publishes"
            assert keda_replicas(so_gone, [], current=4) == 4
    finally:
        loop.run(server.stop())
        loop.close()

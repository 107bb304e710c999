"""The control cycle against the emulated cluster over HTTP (real CRD server, real `kubernetes` client).

Each test drives `Controller.cycle()` directly, the way the kopf loop does, with observations that
the collector would have returned (the real collector meets a real Prometheus in
test_operator_e2e.py, and a down, slow or garbage one here). API failures come from a fault-injecting
proxy between the client and the API server.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from pathlib import Path

import pytest
import yaml
from conftest_metrics import FakePrometheus
from operator_harness import (
    H100_PROFILE,
    L4_PROFILE,
    TINY_MODEL,
    Demand,
    Kube,
    observations,
    settings_dict,
    variant,
    wait_until,
)
from variant_autoscaler.actuator import DELETION_COST_ANNOTATION, KubeGateway, RetryPolicy
from variant_autoscaler.collector import Collector, CollectorSettings, PrometheusSettings
from variant_autoscaler.controller import Controller, ControllerDeps
from variant_autoscaler.exporter import Exporter
from variant_autoscaler.resources import PAUSED_ANNOTATION
from variant_autoscaler.settings import OperatorSettings, SettingsStore
from variant_autoscaler.status import READY
from variant_autoscaler_testbed.cluster import kubeconfig_text
from variant_autoscaler_testbed.fault_proxy import FaultProxy, FaultRule
from variant_autoscaler_testbed.prometheus import free_port

MODEL = TINY_MODEL["name"]
REPO = Path(__file__).resolve().parents[1]


def make_controller(api, namespace: str, settings: dict | None = None, collect=None, **deps) -> Controller:
    """A controller watching only the test's namespace (the session cluster holds other tests' objects)."""
    data = {**(settings or settings_dict()), "watched_namespaces": [namespace]}
    store = SettingsStore(OperatorSettings.model_validate(data))
    gateway = KubeGateway(api, retry=RetryPolicy(attempts=5, first_delay_s=0.05, max_delay_s=0.4))
    return Controller(ControllerDeps(gateway=gateway, settings=store, exporter=Exporter(),
                                     collect=collect or Demand().collect, **deps))


def wva_manifest(namespace: str, name: str, target: str, model: str, *, acc_count: int,
                 variant_cost: str | None = None) -> dict:
    """An llm-d WVA README-style manifest (its older modelProfile block), apiVersion changed only."""
    spec = {"scaleTargetRef": {"kind": "Deployment", "name": target}, "modelID": model,
            **({"variantCost": variant_cost} if variant_cost else {}),
            "modelProfile": {"accelerators": [{
                "acc": "A100-80G", "accCount": acc_count, "maxBatchSize": 256,
                "perfParms": {"decodeParms": {"alpha": "20.58", "beta": "0.41"},
                              "prefillParms": {"gamma": "5.2", "delta": "0.1"}}}]}}
    return {"apiVersion": "autoscaling.variant-autoscaler.io/v1alpha1", "kind": "VariantAutoscaling",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def cycle(controller: Controller):
    return asyncio.run(controller.cycle())


@pytest.fixture
def kube(kube_api, kube_namespace) -> Kube:
    return Kube(kube_api, kube_namespace)


@pytest.fixture
def proxy(emulated_cluster, tmp_path):
    """A fault proxy in front of the cluster, and an ApiClient that goes through it."""
    fp = emulated_cluster.call(FaultProxy(upstream=emulated_cluster.url).start)
    path = tmp_path / "proxy.kubeconfig"
    path.write_text(kubeconfig_text(fp.url, emulated_cluster.token))
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(path))
    try:
        yield fp, api
    finally:
        api.close()
        emulated_cluster.call(fp.stop)


# ----------------------------------------------------------------------------------------------
# Decisions


def test_load_rise_scales_up_the_cheapest_variant_then_down_after_stabilization(kube, kube_api):
    kube.deploy("chat-l4", 1)
    kube.deploy("chat-h100", 0)
    kube.apply_variant(variant("chat-l4", "chat-l4", accelerator="L4", profile=L4_PROFILE, min_replicas=1))
    kube.apply_variant(variant("chat-h100", "chat-h100", accelerator="H100", profile=H100_PROFILE, min_replicas=0))
    demand = Demand({MODEL: 0.5})
    ctrl = make_controller(kube_api, kube.ns, settings_dict(scale_down_window_s=3), collect=demand.collect)
    first = cycle(ctrl)
    assert first.ok and first.optimizer_status in ("optimal", "within_gap")
    assert kube.replicas("chat-l4") == 1 and kube.replicas("chat-h100") == 0

    demand.set(MODEL, 6.0)
    up = cycle(ctrl)
    l4, h100 = kube.replicas("chat-l4"), kube.replicas("chat-h100")
    assert l4 >= 3 and h100 == 0, (l4, h100, up.variants)
    assert kube.events("ScaledUp", "chat-l4")
    scraped = ctrl.deps.exporter.render().decode()
    # L4 alone ($1/h per ~2.3 req/s) is the cheapest single type; the decision costs no more than it
    assert 'variant_autoscaler_homogeneous_cost_per_hour{accelerator="L4"} 3.0' in scraped
    assert f"variant_autoscaler_cost_per_hour {float(l4):.1f}" in scraped
    status = kube.variant("chat-l4")["status"]
    assert status["desiredReplicas"] == l4
    assert status["capacityPerReplicaRps"] > 0
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "TargetResolved": "True", "MetricsAvailable": "True", "OptimizationReady": "True", "Actuated": "True",
        "Ready": "True"}

    kube.wait_ready("chat-l4", l4)
    demand.set(MODEL, 0.5)
    held = cycle(ctrl)
    assert kube.replicas("chat-l4") == l4, "scaled down inside the stabilization window"
    assert "stabilization" in held.plan.step(f"{kube.ns}/chat-l4").limited_by
    wait_until(lambda: cycle(ctrl) and kube.replicas("chat-l4") == 1, timeout_s=20, interval_s=0.5,
               what="scale-down after the window")
    assert kube.events("ScaledDown", "chat-l4")


def test_infeasible_demand_gets_a_best_effort_allocation_and_an_event_naming_the_shortfall(kube, kube_api):
    kube.deploy("tight-l4", 1)
    kube.apply_variant(variant("tight-l4", "tight-l4", accelerator="L4", profile=L4_PROFILE, max_replicas=2))
    ctrl = make_controller(kube_api, kube.ns, collect=Demand({MODEL: 40.0}).collect)
    report = cycle(ctrl)
    assert report.optimizer_status == "infeasible"
    assert kube.replicas("tight-l4") == 2
    cond = kube.condition("tight-l4", "OptimizationReady")
    assert cond["status"] == "True" and cond["reason"] == "BestEffort"
    [event] = kube.events("Infeasible", "tight-l4")
    assert MODEL in event.message and "req/s" in event.message


def test_restart_mid_transition_resumes_from_the_cluster_state(kube, kube_api, emulated_cluster):
    """Move a model off L4 (its pool shrank to 0) onto H100; a fresh controller finishes the move."""
    emulated_cluster.kubelet.start_delay_s = 1.5
    try:
        kube.deploy("move-l4", 2)
        kube.deploy("move-h100", 0)
        kube.wait_ready("move-l4", 2)
        kube.apply_variant(variant("move-l4", "move-l4", accelerator="L4", profile=L4_PROFILE, min_replicas=0))
        kube.apply_variant(variant("move-h100", "move-h100", accelerator="H100", profile=H100_PROFILE,
                                   min_replicas=0))
        demand = Demand({MODEL: 4.0})
        settings = settings_dict(accelerators=[{"name": "L4", "cost_per_hour": 1.0, "available": 0},
                                               {"name": "H100", "cost_per_hour": 8.0, "available": 4}])
        cycle(make_controller(kube_api, kube.ns, settings, collect=demand.collect))
        h100 = kube.replicas("move-h100")
        assert h100 >= 1 and kube.replicas("move-l4") == 2  # new first, old kept until ready
        assert kube.condition("move-l4", "Actuated")["reason"] == "WaitingForReplacement"
        # "restart": a new controller with no memory; the new replicas are still starting
        restarted = make_controller(kube_api, kube.ns, settings, collect=demand.collect)
        cycle(restarted)
        assert kube.replicas("move-h100") == h100 and kube.replicas("move-l4") == 2
        kube.wait_ready("move-h100", h100)
        cycle(restarted)
        assert kube.replicas("move-l4") == 0 and kube.replicas("move-h100") == h100
        assert len(kube.events("ScaledUp", "move-h100")) == 1
    finally:
        emulated_cluster.kubelet.start_delay_s = 0.2


def test_a_move_from_a_both_variant_to_a_pd_pair_keeps_the_old_replicas_until_the_pair_is_ready(
        kube, kube_api, emulated_cluster):
    """L4 leaves the inventory; the model's only other variants are an H100 prefill/decode pair. The "both"
    replicas stay until both halves have ready replicas (they used to go in the first cycle: make-before-break
    grouped by model and role, so a pair never stood in for a "both" variant and the model served nothing
    while the pair started). A fresh controller (a restart) in the middle keeps holding."""
    emulated_cluster.kubelet.start_delay_s = 1.5
    try:
        for name in ("pd-both", "pd-pre", "pd-dec"):
            kube.deploy(name, 2 if name == "pd-both" else 0)
        kube.wait_ready("pd-both", 2)
        kube.apply_variant(variant("pd-both", "pd-both", accelerator="L4", profile=L4_PROFILE, min_replicas=0))
        for name, role in (("pd-pre", "prefill"), ("pd-dec", "decode")):
            kube.apply_variant(variant(name, name, accelerator="H100", profile=H100_PROFILE, min_replicas=0,
                                       role=role))
        demand = Demand({MODEL: 4.0})
        settings = settings_dict(accelerators=[{"name": "L4", "cost_per_hour": 1.0, "available": 0},
                                               {"name": "H100", "cost_per_hour": 8.0, "available": 4}])
        cycle(make_controller(kube_api, kube.ns, settings, collect=demand.collect))
        pre, dec = kube.replicas("pd-pre"), kube.replicas("pd-dec")
        assert pre >= 1 and dec >= 1 and kube.ready("pd-pre") == kube.ready("pd-dec") == 0
        assert kube.replicas("pd-both") == 2, "the both variant went before the pair was ready"
        assert kube.condition("pd-both", "Actuated")["reason"] == "WaitingForReplacement"
        restarted = make_controller(kube_api, kube.ns, settings, collect=demand.collect)
        cycle(restarted)
        assert (kube.replicas("pd-both"), kube.replicas("pd-pre"), kube.replicas("pd-dec")) == (2, pre, dec)
        kube.wait_ready("pd-pre", pre)
        kube.wait_ready("pd-dec", dec)
        cycle(restarted)
        assert kube.replicas("pd-both") == 0 and (kube.replicas("pd-pre"), kube.replicas("pd-dec")) == (pre, dec)
    finally:
        emulated_cluster.kubelet.start_delay_s = 0.2


def test_metrics_mode_only_publishes(kube, kube_api):
    kube.deploy("pub-l4", 1)
    kube.apply_variant(variant("pub-l4", "pub-l4", accelerator="L4", profile=L4_PROFILE))
    ctrl = make_controller(kube_api, kube.ns, settings_dict(actuation_mode="metrics"), collect=Demand({MODEL: 6.0}).collect)
    report = cycle(ctrl)
    assert kube.replicas("pub-l4") == 1
    desired = report.variants[f"{kube.ns}/pub-l4"].desired_replicas
    assert desired >= 3
    text = ctrl.deps.exporter.render().decode()
    assert f'wva_desired_replicas{{accelerator_type="L4",namespace="{kube.ns}",variant_name="pub-l4"}} {desired}.0' \
        in text
    assert kube.condition("pub-l4", "Actuated")["reason"] == "MetricsPublished"


# ----------------------------------------------------------------------------------------------
# Reliability


@pytest.mark.parametrize("failure", ["down", "slow", "garbage"])
def test_prometheus_failures_hold_replicas_and_say_why(kube, kube_api, failure):
    kube.deploy("hold-l4", 3)
    kube.apply_variant(variant("hold-l4", "hold-l4", accelerator="L4", profile=L4_PROFILE, min_replicas=1))
    fake = None
    if failure == "down":
        url = f"http://127.0.0.1:{free_port()}"
    else:
        fake = FakePrometheus("slow" if failure == "slow" else "html", delay_s=3)
        url = fake.url
    try:
        collector = Collector(CollectorSettings(prometheus=PrometheusSettings(url=url, timeout_s=0.5),
                                                rate_window_s=10, staleness_threshold_s=10))
        ctrl = make_controller(kube_api, kube.ns, collect=collector.collect)
        report = cycle(ctrl)
        collector.close()
    finally:
        if fake is not None:
            fake.close()
    assert not report.metrics_available
    assert kube.replicas("hold-l4") == 3
    cond = kube.condition("hold-l4", "MetricsAvailable")
    assert cond["status"] == "False" and cond["reason"] == "PrometheusError"
    words = {"down": "refused", "slow": "within", "garbage": "Prometheus"}[failure]
    assert words in cond["message"]
    assert kube.events("MetricsUnavailable", "hold-l4")
    assert 'variant_autoscaler_cycle_errors_total{reason="MetricsUnavailable"} 1.0' in \
        ctrl.deps.exporter.render().decode()
    # right after the gap the same controller does not trust the first readings for a scale-down ...
    ctrl.deps.collect = Demand({MODEL: 0.5}).collect
    cycle(ctrl)
    assert kube.replicas("hold-l4") == 3 and kube.condition("hold-l4", "Actuated")["reason"] == "MetricsRecovering"
    # ... the control case: a controller that saw no gap scales down on the same low demand
    cycle(make_controller(kube_api, kube.ns, collect=Demand({MODEL: 0.5}).collect))
    assert kube.replicas("hold-l4") == 1


def test_a_model_without_series_is_held_while_others_are_optimized(kube, kube_api):
    kube.deploy("quiet-l4", 2)
    kube.deploy("busy-l4", 1)
    kube.apply_variant(variant("quiet-l4", "quiet-l4", model="other/model-1b", profile=L4_PROFILE))
    kube.apply_variant(variant("busy-l4", "busy-l4", profile=L4_PROFILE))
    settings = settings_dict(models=[TINY_MODEL, {**TINY_MODEL, "name": "other/model-1b"}])
    ctrl = make_controller(kube_api, kube.ns, settings, collect=Demand({MODEL: 6.0}).collect)
    cycle(ctrl)
    assert kube.replicas("quiet-l4") == 2
    assert kube.condition("quiet-l4", "MetricsAvailable")["reason"] == "MetricsMissing"
    assert kube.replicas("busy-l4") >= 3


def test_invalid_resources_get_a_condition_and_an_event_and_others_are_unaffected(kube, kube_api):
    kube.deploy("good-l4", 1)
    kube.deploy("bad-cm", 1)
    kube.deploy("bad-acc", 1)
    kube.core.create_namespaced_config_map(kube.ns, {"metadata": {"name": "broken-profile"},
                                                     "data": {"profile.yaml": "parametric: {decodeBaseSeconds: -1}"}})
    kube.apply_variant(variant("good-l4", "good-l4", profile=L4_PROFILE))
    broken = variant("bad-cm", "bad-cm")
    broken["spec"]["profile"] = {"configMapRef": {"name": "broken-profile"}}
    kube.apply_variant(broken)
    kube.apply_variant(variant("bad-acc", "bad-acc", accelerator="TPU-v9", profile=L4_PROFILE))
    lws = variant("bad-kind", "some-lws", profile=L4_PROFILE)
    lws["spec"]["scaleTargetRef"] = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
                                     "name": "some-lws"}
    kube.apply_variant(lws)
    ctrl = make_controller(kube_api, kube.ns, collect=Demand({MODEL: 6.0}).collect)
    report = cycle(ctrl)
    bad = kube.condition("bad-cm", "OptimizationReady")
    assert bad["status"] == "False" and "decodeBaseSeconds" in bad["message"] or "decode_base_s" in bad["message"]
    assert kube.events("InvalidSpec", "bad-cm")
    acc = kube.condition("bad-acc", "OptimizationReady")
    assert acc["status"] == "False" and acc["reason"] == "AcceleratorUnknown" and "TPU-v9" in acc["message"]
    assert kube.events("AcceleratorUnknown", "bad-acc")
    assert kube.condition("bad-kind", "OptimizationReady")["reason"] == "UnsupportedTargetKind"
    assert kube.replicas("good-l4") >= 3
    assert kube.condition("good-l4", "OptimizationReady")["status"] == "True"
    # the same problems do not repeat their Events every cycle
    cycle(ctrl)
    assert len(kube.events("InvalidSpec", "bad-cm")) == 1
    assert not report.variants[f"{kube.ns}/bad-cm"].valid


def test_missing_target_sets_target_resolved_false(kube, kube_api):
    kube.apply_variant(variant("orphan", "no-such-deployment", profile=L4_PROFILE))
    cycle(make_controller(kube_api, kube.ns, collect=Demand({MODEL: 1.0}).collect))
    cond = kube.condition("orphan", "TargetResolved")
    assert cond["status"] == "False" and cond["reason"] == "TargetNotFound"
    assert "no-such-deployment" in cond["message"]
    assert kube.events("TargetNotFound", "orphan")


def test_ready_column_shows_the_ready_condition_the_operator_writes(kube, kube_api, emulated_cluster):
    """`kubectl get va` READY reads the `Ready` summary (the condition `kubectl wait` waits for), and
    the OPTIMIZED column (-o wide) the specific OptimizationReady: a paused VA optimizes but is not Ready."""
    crd = yaml.safe_load((REPO / "crds" / "variantautoscalings.yaml").read_text())
    columns = {c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Ready"] == f".status.conditions[?(@.type=='{READY}')].status"
    assert columns["Optimized"] == ".status.conditions[?(@.type=='OptimizationReady')].status"
    kube.deploy("col-l4", 1)
    kube.apply_variant(variant("col-l4", "col-l4", profile=L4_PROFILE))
    kube.apply_variant(variant("col-orphan", "no-such-deployment", profile=L4_PROFILE))
    kube.deploy("col-paused", 1)
    paused = variant("col-paused", "col-paused", profile=L4_PROFILE)
    paused["metadata"]["annotations"] = {PAUSED_ANNOTATION: "true"}
    kube.apply_variant(paused)
    cycle(make_controller(kube_api, kube.ns, collect=Demand({MODEL: 1.0}).collect))
    out = emulated_cluster.kubectl("get", "va", "-n", kube.ns, "-o", "wide")
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]  # cells may be empty: cut at the header's offsets
    cut = [(header[a:b].strip(), a, b) for a, b in zip(starts, [*starts[1:], None], strict=True)]
    shown = {row.split()[0]: {name: row[a:b].strip() for name, a, b in cut} for row in rows}
    for name in ("col-l4", "col-orphan", "col-paused"):
        conds = {c["type"]: c["status"] for c in kube.variant(name)["status"]["conditions"]}
        assert (shown[name]["READY"], shown[name]["OPTIMIZED"]) == (conds[READY], conds["OptimizationReady"]), name
    assert [shown[n]["READY"] for n in ("col-l4", "col-orphan", "col-paused")] == ["True", "False", "False"]
    assert shown["col-paused"]["OPTIMIZED"] == "True", "where they differ: OptimizationReady alone says True"


def test_wva_manifest_with_only_the_api_version_changed_is_reconciled(kube, kube_api):
    """The llm-d WVA README example (plus its older modelProfile block), apiVersion changed only."""
    kube.deploy("llama-8b", 1)
    kube.apply_variant(wva_manifest(kube.ns, "llama-8b-autoscaler", "llama-8b", "meta/llama-3.1-8b", acc_count=1,
                                    variant_cost="10.0"))
    settings = settings_dict(models=[], accelerators=[{"name": "A100-80G", "cost_per_hour": 2.5}],
                             default_slo={"ttft_s": 2.0, "itl_s": 0.1})
    report = cycle(make_controller(kube_api, kube.ns, settings, collect=Demand({"meta/llama-3.1-8b": 100.0}).collect))
    out = report.variants[f"{kube.ns}/llama-8b-autoscaler"]
    assert out.valid and out.metrics_available
    conds = {c["type"]: (c["status"], c["reason"]) for c in kube.variant("llama-8b-autoscaler")["status"]["conditions"]}
    assert conds["TargetResolved"] == ("True", "TargetFound")
    assert conds["OptimizationReady"] == ("True", "OptimizationSucceeded")
    assert kube.replicas("llama-8b") == out.desired_replicas >= 2


def test_scale_down_sets_pod_deletion_cost_so_the_least_loaded_pods_go(kube, kube_api, emulated_cluster):
    kube.deploy("drain-l4", 3)
    kube.wait_ready("drain-l4", 3)
    pods = sorted(p.metadata.name for p in kube.core.list_namespaced_pod(kube.ns, label_selector="app=drain-l4").items)
    busy = {pods[0]: 9.0, pods[1]: 0.0, pods[2]: 4.0}
    kube.apply_variant(variant("drain-l4", "drain-l4", profile=L4_PROFILE, max_replicas=1))
    ns = kube.ns
    ctrl = make_controller(kube_api, kube.ns, collect=Demand({MODEL: 0.5}).collect,
                           pod_load=lambda namespaces: {(ns, p): x for p, x in busy.items()})
    cycle(ctrl)
    assert kube.replicas("drain-l4") == 1
    wait_until(lambda: len(kube.core.list_namespaced_pod(kube.ns, label_selector="app=drain-l4").items) == 1,
               timeout_s=10, what="the surplus pods to go")
    [left] = kube.core.list_namespaced_pod(kube.ns, label_selector="app=drain-l4").items
    assert left.metadata.name == pods[0]
    assert left.metadata.annotations[DELETION_COST_ANNOTATION] == "9000"


def test_api_conflicts_are_resolved_by_re_reading(kube, proxy):
    fp, api = proxy
    kube.deploy("conflict-l4", 1)
    kube.apply_variant(variant("conflict-l4", "conflict-l4", profile=L4_PROFILE, min_replicas=2))
    rule = fp.add(FaultRule(method="PUT", path=r"/deployments/conflict-l4/scale$", status=409, times=2))
    ctrl = make_controller(api, kube.ns, collect=Demand({}).collect)  # no metrics: only the minimum moves it
    cycle(ctrl)
    assert rule.hits == 2
    assert kube.replicas("conflict-l4") == 2
    reads = [r for r in fp.log if r.method == "GET" and r.path.endswith("/deployments/conflict-l4/scale")]
    assert len(reads) == 3  # one read before each write attempt
    [event] = kube.events("ScaledUp", "conflict-l4")
    assert "2 conflict(s) resolved" in event.message


def test_5xx_and_dropped_connections_are_retried_with_backoff(kube, proxy):
    fp, api = proxy
    kube.deploy("flaky-l4", 1)
    kube.apply_variant(variant("flaky-l4", "flaky-l4", profile=L4_PROFILE, min_replicas=2))
    fp.add(FaultRule(method="GET", path=r"/namespaces/[^/]+/deployments$", status=503, times=2))
    fp.add(FaultRule(method="PATCH", path=r"/variantautoscalings/flaky-l4/status$", status=0, times=1))
    fp.add(FaultRule(method="PUT", path=r"/deployments/flaky-l4/scale$", status=500, times=1))
    report = cycle(make_controller(api, kube.ns, collect=Demand({}).collect))
    assert report.ok, report.error
    assert kube.replicas("flaky-l4") == 2
    assert kube.condition("flaky-l4", "TargetResolved")["status"] == "True"
    statuses = [r.status for r in fp.log if r.path.endswith("/deployments") and r.method == "GET"]
    assert statuses[:3] == [503, 503, 200]


def test_a_persistently_failing_api_aborts_the_cycle_before_any_write(kube, proxy):
    fp, api = proxy
    kube.deploy("down-l4", 1)
    kube.apply_variant(variant("down-l4", "down-l4", profile=L4_PROFILE, min_replicas=2))
    fp.add(FaultRule(method="GET", path=r"/deployments$", status=503, times=100))
    ctrl = make_controller(api, kube.ns, collect=Demand({}).collect)
    report = cycle(ctrl)
    assert not report.ok and "503" in report.error
    assert kube.replicas("down-l4") == 1
    assert not [r for r in fp.log if r.method in ("PUT", "PATCH", "POST")]
    assert 'reason="KubernetesApiUnavailable"' in ctrl.deps.exporter.render().decode()


def test_settings_configmap_updates_apply_and_invalid_ones_keep_the_last_good(kube, kube_api):
    kube.deploy("cfg-l4", 1)
    kube.apply_variant(variant("cfg-l4", "cfg-l4", profile=L4_PROFILE))
    mine = {"watched_namespaces": [kube.ns]}
    cm = {"metadata": {"name": "va-settings"}, "data": {"settings.yaml": json.dumps(settings_dict(**mine))}}
    kube.core.create_namespaced_config_map(kube.ns, cm)
    ctrl = make_controller(kube_api, kube.ns, collect=Demand({MODEL: 1.0}).collect)
    ctrl.deps.settings_configmap = (kube.ns, "va-settings")
    cycle(ctrl)
    assert ctrl.deps.settings.current.interval_s == 2
    bad = {"data": {"settings.yaml": "interval_s: -5\n"}}
    kube.core.patch_namespaced_config_map("va-settings", kube.ns, bad)
    report = cycle(ctrl)
    assert report.ok and ctrl.deps.settings.current.interval_s == 2
    assert "interval_s" in ctrl.deps.settings.last_error
    assert 'reason="InvalidSettings"' in ctrl.deps.exporter.render().decode()
    kube.core.patch_namespaced_config_map("va-settings", kube.ns,
                                          {"data": {"settings.yaml": json.dumps(settings_dict(interval_s=7, **mine))}})
    cycle(ctrl)
    assert ctrl.deps.settings.current.interval_s == 7


def test_observations_helper_matches_the_collector_contract():
    """The pre-collected observations used above are valid collector results for the optimizer."""
    from variant_autoscaler.collector import VariantSelector

    sel = [VariantSelector(name="ns/a", namespace="ns", model=MODEL, deployment="a")]
    got = observations({MODEL: 3.0}, sel)
    w = got.models[MODEL].to_workload()
    assert w.arrival_rate_rps == 3.0 and w.buckets[0].input_tokens == 100


@pytest.mark.parametrize(("value", "shown"), [(-5.0, "completed = -5"), (math.nan, "completed = nan"),
                                             (math.inf, "completed = inf")])
def test_impossible_metric_values_are_invalid_data_and_hold_replicas(kube, kube_api, value, shown):
    """A well-formed Prometheus answer of -5, NaN or +Inf req/s is wrong data, not zero demand nor missing
    series: held like missing metrics, with a reason that quotes the value (NaN was once skipped silently and
    the variant reported as having no series at all)."""
    kube.deploy("neg-l4", 3)
    kube.apply_variant(variant("neg-l4", "neg-l4", accelerator="L4", profile=L4_PROFILE, min_replicas=1))
    pod = {"namespace": kube.ns, "pod": "neg-l4-5d8f9c7b6-abcde", "model_name": MODEL}
    fake = FakePrometheus("samples", samples=lambda query: [(pod, value)] if "request_success_total" in query else [])
    collector = Collector(CollectorSettings(prometheus=PrometheusSettings(url=fake.url, timeout_s=2),
                                            rate_window_s=10, staleness_threshold_s=10))
    try:
        ctrl = make_controller(kube_api, kube.ns, collect=collector.collect)
        report = cycle(ctrl)
    finally:
        collector.close()
        fake.close()
    assert kube.replicas("neg-l4") == 3
    assert not report.variants[f"{kube.ns}/neg-l4"].metrics_available
    cond = kube.condition("neg-l4", "MetricsAvailable")
    assert cond["status"] == "False" and cond["reason"] == "MetricsInvalid"
    assert shown in cond["message"] and "neg-l4-5d8f9c7b6-abcde" in cond["message"]
    assert kube.events("MetricsUnavailable", "neg-l4")
    assert 'variant_autoscaler_cycle_errors_total{reason="MetricsInvalid"} 1.0' in ctrl.deps.exporter.render().decode()


def test_a_metrics_outage_does_not_let_the_first_reading_after_it_scale_down(kube, kube_api):
    """Prometheus down 60 s, then a rate over a window spanning the gap (2.03 req/s against a real 5): held."""
    kube.deploy("gap-l4", 3)
    kube.apply_variant(variant("gap-l4", "gap-l4", accelerator="L4", profile=L4_PROFILE, min_replicas=1))
    now = [1000.0]
    demand = Demand({MODEL: 5.0})
    down = Collector(CollectorSettings(prometheus=PrometheusSettings(url=f"http://127.0.0.1:{free_port()}",
                                                                     timeout_s=0.5),
                                       rate_window_s=10, staleness_threshold_s=10))
    ctrl = make_controller(kube_api, kube.ns, settings_dict(scale_down_window_s=10, rate_window_s=10),
                           collect=demand.collect, clock=lambda: now[0])
    key = f"{kube.ns}/gap-l4"

    def at(t: float, collect):
        now[0] = 1000.0 + t
        ctrl.deps.collect = collect
        return cycle(ctrl)

    try:
        assert at(0, demand.collect).variants[key].desired_replicas == 3
        for t in (2, 30, 60):
            assert not at(t, down.collect).metrics_available
    finally:
        down.close()
    demand.set(MODEL, 2.03)
    report = at(62, demand.collect)
    assert report.variants[key].desired_replicas == 1  # what the gap-spanning rate alone would do
    assert kube.replicas("gap-l4") == 3 and "stabilization" in report.plan.step(key).limited_by  # the held cycles
    report = at(71, demand.collect)  # the holds left the scale-down window; the rate window is not yet fresh
    assert kube.replicas("gap-l4") == 3 and "metrics_recovering" in report.plan.step(key).limited_by
    assert kube.condition("gap-l4", "Actuated")["reason"] == "MetricsRecovering"
    # a full rate window of fresh data after the gap, a fall in demand scales down as usual
    demand.set(MODEL, 0.5)
    at(73, demand.collect)
    assert kube.replicas("gap-l4") == 1


@pytest.mark.parametrize("answer", [404, 403])
def test_a_target_kind_that_cannot_be_read_fails_only_its_own_variant(kube, kube_api, proxy, answer):
    """A StatefulSet target: the emulated API does not serve the kind (404); a real cluster without the
    chart's rbac.statefulSets answers 403. Only that VA is affected; the others are sized as usual."""
    fp, proxied = proxy
    kube.deploy("fine-l4", 1)
    kube.apply_variant(variant("fine-l4", "fine-l4", accelerator="L4", profile=L4_PROFILE, min_replicas=1))
    sts = variant("sts-l4", "some-sts", accelerator="L4", profile=L4_PROFILE)
    sts["spec"]["scaleTargetRef"]["kind"] = "StatefulSet"
    kube.apply_variant(sts)
    if answer == 403:
        fp.add(FaultRule(method="GET", path=r"/statefulsets$", status=403, times=1000))
    report = cycle(make_controller(proxied, kube.ns, collect=Demand({MODEL: 6.0}).collect))
    assert report.ok, report.error
    assert kube.replicas("fine-l4") >= 3
    assert kube.condition("fine-l4", "Actuated")["reason"] == "ScaledUp"
    cond = kube.condition("sts-l4", "TargetResolved")
    assert cond["status"] == "False" and cond["reason"] == "TargetUnreadable"
    assert "StatefulSet" in cond["message"] and f"HTTP {answer}" in cond["message"]
    if answer == 403:
        assert "rbac.statefulSets" in cond["message"]
    [event] = kube.events("TargetUnreadable", "sts-l4")
    assert event.type == "Warning"


def test_a_newer_duplicate_va_never_takes_a_target_over_from_the_older_one(kube, kube_api):
    """`aaa-dup` sorts before `orig` by name, but orig is older: orig keeps the Deployment."""
    kube.deploy("shared", 1)
    orig = kube.apply_variant(variant("orig", "shared", accelerator="L4", profile=L4_PROFILE, min_replicas=1,
                                      max_replicas=1))
    ctrl = make_controller(kube_api, kube.ns, collect=Demand({MODEL: 0.5}).collect)
    cycle(ctrl)
    created = orig["metadata"]["creationTimestamp"]
    wait_until(lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) > created, timeout_s=3,
               what="a later creationTimestamp (one-second resolution)")
    kube.apply_variant(variant("aaa-dup", "shared", accelerator="L4", profile=L4_PROFILE, min_replicas=4))
    report = cycle(ctrl)
    assert kube.replicas("shared") == 1
    dup = kube.condition("aaa-dup", "OptimizationReady")
    assert dup["status"] == "False" and dup["reason"] == "TargetConflict" and f"{kube.ns}/orig" in dup["message"]
    assert kube.events("TargetConflict", "aaa-dup")
    assert kube.condition("orig", "OptimizationReady")["reason"] == "OptimizationSucceeded"
    assert not report.variants[f"{kube.ns}/aaa-dup"].valid


def test_a_wva_acc_count_is_honoured_over_the_crd_default(kube, kube_api):
    """An llm-d WVA manifest whose replica takes 4 GPUs (accCount: 4) is costed and counted as 4 GPUs a replica."""
    manifest = wva_manifest(kube.ns, "llama-70b", "llama-70b", "meta/llama-3.1-70b", acc_count=4)
    kube.deploy("llama-70b", 1)
    stored = kube.apply_variant(manifest)
    assert "acceleratorCount" not in stored["spec"]
    settings = settings_dict(models=[], accelerators=[{"name": "A100-80G", "cost_per_hour": 2.5, "available": 8}],
                             default_slo={"ttft_s": 2.0, "itl_s": 0.1})
    ctrl = make_controller(kube_api, kube.ns, settings, collect=Demand({"meta/llama-3.1-70b": 500.0}).collect)
    report = cycle(ctrl)
    replicas = kube.replicas("llama-70b")
    assert replicas == 2, "8 GPUs hold two 4-GPU replicas"
    assert report.cost_per_hour == pytest.approx(replicas * 4 * 2.5)
    assert 'variant_autoscaler_inventory_in_use{accelerator="A100-80G"} 8.0' in ctrl.deps.exporter.render().decode()
    # a spec that says otherwise is a contradiction, not a silent pick
    body = kube.variant("llama-70b")
    body["spec"]["acceleratorCount"] = 2
    kube.custom.replace_namespaced_custom_object("autoscaling.variant-autoscaler.io", "v1alpha1", kube.ns,
                                                 "variantautoscalings", "llama-70b", body)
    cycle(ctrl)
    cond = kube.condition("llama-70b", "OptimizationReady")
    assert cond["reason"] == "InvalidSpec" and "accCount" in cond["message"]


def test_inventory_zero_never_drains_a_serving_model_without_a_replacement(kube, kube_api):
    """All inventories set to 0 at 4.9 req/s: the serving H100 replica stays, loudly; with no demand it drains."""
    kube.deploy("inv-h100", 1)
    kube.deploy("inv-l4", 0)
    kube.wait_ready("inv-h100", 1)
    kube.apply_variant(variant("inv-h100", "inv-h100", accelerator="H100", profile=H100_PROFILE, min_replicas=0))
    kube.apply_variant(variant("inv-l4", "inv-l4", accelerator="L4", profile=L4_PROFILE, min_replicas=0))
    none_left = settings_dict(accelerators=[{"name": "L4", "cost_per_hour": 1.0, "available": 0},
                                            {"name": "H100", "cost_per_hour": 8.0, "available": 0}])
    demand = Demand({MODEL: 4.9})
    ctrl = make_controller(kube_api, kube.ns, none_left, collect=demand.collect)
    report = cycle(ctrl)
    key = f"{kube.ns}/inv-h100"
    assert report.variants[key].desired_replicas == 0 and report.optimizer_status == "infeasible"
    assert kube.replicas("inv-h100") == 1 and kube.replicas("inv-l4") == 0
    cond = kube.condition("inv-h100", "Actuated")
    assert cond["reason"] == "NoReplacement" and "replacement" in cond["message"]
    [event] = kube.events("NoReplacement", "inv-h100")
    assert event.type == "Warning" and MODEL in event.message
    cycle(ctrl)
    assert kube.replicas("inv-h100") == 1 and len(kube.events("NoReplacement", "inv-h100")) == 1
    demand.set(MODEL, 0.0)  # nothing left to serve: the drain goes ahead
    cycle(ctrl)
    assert kube.replicas("inv-h100") == 0


def test_a_deleted_target_re_plans_its_model_on_the_remaining_variants_at_once(kube, kube_api):
    """The serving L4 Deployment is deleted; its pods, and with them the model's metrics, vanish. The
    H100 variant at 0 must take the demand now, not stay at 0 while nothing reports."""
    kube.deploy("del-l4", 3)
    kube.deploy("del-h100", 0)
    kube.apply_variant(variant("del-l4", "del-l4", accelerator="L4", profile=L4_PROFILE, min_replicas=0))
    kube.apply_variant(variant("del-h100", "del-h100", accelerator="H100", profile=H100_PROFILE, min_replicas=0))
    serving = {"metrics": True}

    def collect(selectors):  # what Prometheus shows: demand while a replica serves, nothing once all are gone
        return observations({MODEL: 5.0} if serving["metrics"] else {}, selectors)

    ctrl = make_controller(kube_api, kube.ns, settings_dict(scale_down_window_s=30), collect=collect)
    cycle(ctrl)
    assert kube.replicas("del-l4") == 3 and kube.replicas("del-h100") == 0
    kube.apps.delete_namespaced_deployment("del-l4", kube.ns)
    serving["metrics"] = False
    report = cycle(ctrl)
    assert kube.condition("del-l4", "TargetResolved")["reason"] == "TargetNotFound"
    assert kube.replicas("del-h100") >= 1, report.variants[f"{kube.ns}/del-h100"]
    cond = kube.condition("del-h100", "MetricsAvailable")
    assert cond["status"] == "False" and "last measured demand (5.00 req/s" in cond["message"]
    assert "demand_carried" in report.plan.step(f"{kube.ns}/del-h100").limited_by
    # the control case: a model that never lost a variant is held as before when its metrics vanish
    kube.deploy("still-l4", 0)
    kube.apply_variant(variant("still-l4", "still-l4", model="other/model-1b", accelerator="L4", profile=L4_PROFILE,
                               min_replicas=0))
    other = make_controller(kube_api, kube.ns, settings_dict(models=[TINY_MODEL, {**TINY_MODEL, "name": "other/model-1b"}]),
                            collect=lambda selectors: observations({}, selectors))
    cycle(other)
    assert kube.replicas("still-l4") == 0


def test_settings_never_fall_back_to_defaults_silently(kube, kube_api):
    """At start (nothing good yet) a renamed key keeps the loop from running on defaults (which would
    make every VA ModelUnknown); an empty value later keeps the last good settings. Both are logged,
    counted and get a Warning Event on the ConfigMap."""
    kube.deploy("cfg2-l4", 1)
    kube.apply_variant(variant("cfg2-l4", "cfg2-l4", profile=L4_PROFILE))
    good = json.dumps(settings_dict(interval_s=7, watched_namespaces=[kube.ns]))
    kube.core.create_namespaced_config_map(kube.ns, {"metadata": {"name": "va-settings"},
                                                     "data": {"config.yaml": good}})
    ctrl = make_controller(kube_api, kube.ns, collect=Demand({MODEL: 1.0}).collect)
    ctrl.deps.settings = SettingsStore(OperatorSettings(), loaded=False)  # as the operator starts with a ConfigMap
    ctrl.deps.settings_configmap = (kube.ns, "va-settings")
    for _ in range(2):
        report = cycle(ctrl)
        assert not report.ok and "settings.yaml" in report.error and "config.yaml" in report.error
    assert not (kube.variant("cfg2-l4").get("status") or {}).get("conditions"), "nothing written on defaults"
    [event] = kube.events("InvalidSettings", "va-settings")
    assert event.type == "Warning" and event.involved_object.kind == "ConfigMap" and "config.yaml" in event.message
    assert 'variant_autoscaler_cycle_errors_total{reason="InvalidSettings"} 2.0' in ctrl.deps.exporter.render().decode()
    kube.core.replace_namespaced_config_map("va-settings", kube.ns, {"metadata": {"name": "va-settings"},
                                                                     "data": {"settings.yaml": good}})
    assert cycle(ctrl).ok and ctrl.deps.settings.current.interval_s == 7
    assert kube.condition("cfg2-l4", "OptimizationReady")["reason"] == "OptimizationSucceeded"
    kube.core.patch_namespaced_config_map("va-settings", kube.ns, {"data": {"settings.yaml": ""}})
    assert cycle(ctrl).ok and ctrl.deps.settings.current.interval_s == 7
    assert "empty" in ctrl.deps.settings.last_error
    assert len(kube.events("InvalidSettings", "va-settings")) == 2


def test_ready_summarises_the_conditions_and_events_name_the_variants_own_pods(kube, kube_api):
    """Two variants of one model without metrics: each one's condition and Event quote its own Deployment's
    pods (chat-t4's Event named chat-l4's pods), and Ready is False with the first failing condition's reason."""
    kube.deploy("own-l4", 1)
    kube.deploy("own-t4", 1)
    for name, acc in (("own-l4", "L4"), ("own-t4", "T4")):
        kube.apply_variant(variant(name, name, accelerator=acc, profile=L4_PROFILE))
    cycle(make_controller(kube_api, kube.ns, collect=Demand({}).collect))
    for name, other in (("own-l4", "own-t4"), ("own-t4", "own-l4")):
        ready, metrics = kube.condition(name, "Ready"), kube.condition(name, "MetricsAvailable")
        assert ready["status"] == "False" and ready["reason"] == metrics["reason"], ready
        assert ready["message"].startswith("MetricsAvailable: ")
        assert repr(name) in metrics["message"] and repr(other) not in metrics["message"], metrics
        for e in kube.events("MetricsUnavailable", name):
            assert repr(other) not in e.message, e.message


def test_a_paused_variant_is_never_scaled_and_resumes_when_the_annotation_goes(kube, kube_api):
    """autoscaling.variant-autoscaler.io/paused: "true" (as KEDA's autoscaling.keda.sh/paused): demand that
    needs several replicas leaves the target where it is, Actuated says Paused; removing it scales again."""
    kube.deploy("pause-l4", 1)
    body = variant("pause-l4", "pause-l4", profile=L4_PROFILE)
    body["metadata"]["annotations"] = {"autoscaling.variant-autoscaler.io/paused": "true"}
    kube.apply_variant(body)
    ctrl = make_controller(kube_api, kube.ns, collect=Demand({MODEL: 6.0}).collect)
    cycle(ctrl)
    assert kube.replicas("pause-l4") == 1
    cond = kube.condition("pause-l4", "Actuated")
    assert (cond["status"], cond["reason"]) == ("False", "Paused") and "stays at 1" in cond["message"]
    assert kube.condition("pause-l4", "Ready")["reason"] == "Paused"
    kube.custom.patch_namespaced_custom_object("autoscaling.variant-autoscaler.io", "v1alpha1", kube.ns,
                                               "variantautoscalings", "pause-l4",
                                               {"metadata": {"annotations": {"autoscaling.variant-autoscaler.io/paused": None}}})
    cycle(ctrl)
    assert kube.replicas("pause-l4") >= 3


def test_a_paused_variant_in_metrics_mode_says_paused_and_publishes_its_current_replicas(kube, kube_api):
    """Metrics mode: the HPA/KEDA scales on wva_desired_replicas, so pausing holds that series at the
    target's replicas, and Actuated/Ready say Paused as in direct mode (not NotActuated)."""
    kube.deploy("mpause-l4", 1)
    body = variant("mpause-l4", "mpause-l4", profile=L4_PROFILE)
    body["metadata"]["annotations"] = {PAUSED_ANNOTATION: "true"}
    kube.apply_variant(body)
    kube.deploy("mfree-l4", 1)
    kube.apply_variant(variant("mfree-l4", "mfree-l4", profile=L4_PROFILE))
    ctrl = make_controller(kube_api, kube.ns, settings_dict(actuation_mode="metrics"),
                           collect=Demand({MODEL: 6.0}).collect)
    cycle(ctrl)
    cond = kube.condition("mpause-l4", "Actuated")
    assert (cond["status"], cond["reason"]) == ("False", "Paused") and "held at its 1 replicas" in cond["message"]
    assert (kube.condition("mpause-l4", "Ready")["status"], kube.condition("mpause-l4", "Ready")["reason"]) == \
        ("False", "Paused")
    assert kube.condition("mfree-l4", "Actuated")["reason"] == "MetricsPublished"
    text = ctrl.deps.exporter.render().decode()
    assert f'wva_desired_replicas{{accelerator_type="L4",namespace="{kube.ns}",variant_name="mpause-l4"}} 1.0' in text
    assert kube.replicas("mpause-l4") == 1 and kube.variant("mfree-l4")["status"]["desiredReplicas"] >= 2


def test_behavior_paces_a_variant_with_hpa_rate_policies_and_windows(kube, kube_api):
    """spec.behavior as the HPA's: scaleUp at most 1 Pod per 600 s (so 1 -> 2, then held within the
    period, Actuated says RatePolicy), scaleDown with a 0 s window although the settings say 300 s
    (so it drops at once). The CRD server rejects out-of-bounds values with its own error."""
    from kubernetes.client.exceptions import ApiException

    kube.deploy("beh-l4", 1)
    body = variant("beh-l4", "beh-l4", profile=L4_PROFILE)
    body["spec"]["behavior"] = {"scaleUp": {"policies": [{"type": "Pods", "value": 1, "periodSeconds": 600}]},
                                "scaleDown": {"stabilizationWindowSeconds": 0}}
    stored = kube.apply_variant(body)["spec"]["behavior"]
    assert stored["scaleUp"]["selectPolicy"] == "Max", "the schema defaults selectPolicy as the HPA does"
    demand = Demand({MODEL: 6.0})
    ctrl = make_controller(kube_api, kube.ns, settings_dict(scale_down_window_s=300), collect=demand.collect)
    first = cycle(ctrl)
    assert first.variants[f"{kube.ns}/beh-l4"].desired_replicas >= 3
    assert kube.replicas("beh-l4") == 2
    assert "rate policy" in kube.condition("beh-l4", "Actuated")["message"]
    kube.wait_ready("beh-l4", 2)
    cycle(ctrl)
    cond = kube.condition("beh-l4", "Actuated")
    assert kube.replicas("beh-l4") == 2 and cond["reason"] == "RatePolicy", cond
    demand.set(MODEL, 0.3)
    cycle(ctrl)
    assert kube.replicas("beh-l4") == 1, "scaleDown.stabilizationWindowSeconds 0 overrides the 300 s setting"
    for bad, words in (({"scaleUp": {"policies": [{"type": "Pods", "value": 0, "periodSeconds": 60}]}},
                        "should be greater than or equal to 1"),
                       ({"scaleDown": {"stabilizationWindowSeconds": 3601}}, "should be less than or equal to 3600"),
                       ({"scaleUp": {"policies": [{"type": "Pods", "value": 1, "periodSeconds": 1801}]}},
                        "should be less than or equal to 1800"),
                       ({"scaleUp": {"selectPolicy": "Fastest"}}, "supported values")):
        broken = variant("beh-bad", "beh-l4", profile=L4_PROFILE)
        broken["spec"]["behavior"] = bad
        with pytest.raises(ApiException) as info:
            kube.apply_variant(broken)
        assert info.value.status == 422 and words in info.value.body, info.value.body


def _hpa(name: str, target: str) -> dict:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": name},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
                     "minReplicas": 1, "maxReplicas": 10,
                     "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                         "type": "Utilization", "averageUtilization": 80}}}]}}


def test_an_hpa_on_the_same_deployment_is_not_fought_in_direct_mode(kube, kube_api, emulated_cluster):
    """An autoscaling/v2 HPA already scales the VA's Deployment: in direct mode the operator does not
    write its replicas, says ConflictingAutoscaler (condition, Actuated reason, Ready, one Event) and
    names the HPA; an HPA on another Deployment changes nothing; deleting the HPA hands the target
    back. In metrics mode an HPA is the expected actuator: no conflict, and HPAs are not even listed."""
    from kubernetes import client

    hpas = client.AutoscalingV2Api(kube_api)
    kube.deploy("hpa-l4", 1)
    kube.apply_variant(variant("hpa-l4", "hpa-l4", profile=L4_PROFILE))
    hpas.create_namespaced_horizontal_pod_autoscaler(kube.ns, _hpa("cpu-scaler", "hpa-l4"))
    hpas.create_namespaced_horizontal_pod_autoscaler(kube.ns, _hpa("elsewhere", "some-other-deployment"))
    ctrl = make_controller(kube_api, kube.ns, collect=Demand({MODEL: 6.0}).collect)
    report = cycle(ctrl)
    assert report.variants[f"{kube.ns}/hpa-l4"].desired_replicas == 1, "held where the HPA keeps it"
    assert kube.replicas("hpa-l4") == 1
    conflict = kube.condition("hpa-l4", "ConflictingAutoscaler")
    assert conflict["status"] == "True" and f"HorizontalPodAutoscaler {kube.ns}/cpu-scaler" in conflict["message"]
    assert kube.condition("hpa-l4", "Actuated")["reason"] == "ConflictingAutoscaler"
    assert (kube.condition("hpa-l4", "Ready")["status"], kube.condition("hpa-l4", "Ready")["reason"]) == \
        ("False", "ConflictingAutoscaler")
    cycle(ctrl)
    assert len(kube.events("ConflictingAutoscaler", "hpa-l4")) == 1 and kube.replicas("hpa-l4") == 1
    scales = [r for r in emulated_cluster.core.requests if r.namespace == kube.ns and r.subresource == "scale"
              and r.method in ("PUT", "PATCH")]
    assert not scales, "the operator wrote replicas of a Deployment an HPA scales"

    metrics = make_controller(kube_api, kube.ns, settings_dict(actuation_mode="metrics"),
                              collect=Demand({MODEL: 6.0}).collect)
    before = len(emulated_cluster.core.requests)
    cycle(metrics)
    assert kube.condition("hpa-l4", "ConflictingAutoscaler") is None
    assert kube.condition("hpa-l4", "Actuated")["reason"] == "MetricsPublished"
    assert not [r for r in list(emulated_cluster.core.requests)[before:] if r.resource == "horizontalpodautoscalers"]

    hpas.delete_namespaced_horizontal_pod_autoscaler("cpu-scaler", kube.ns)
    cycle(ctrl)
    assert kube.replicas("hpa-l4") >= 3 and kube.condition("hpa-l4", "ConflictingAutoscaler") is None


def test_an_unchanged_status_is_not_patched_again(kube, kube_api, emulated_cluster):
    """A second cycle that decides the same thing sends no status PATCH (read from the API's request log);
    a changed decision does."""
    kube.deploy("same-l4", 2)
    kube.apply_variant(variant("same-l4", "same-l4", profile=L4_PROFILE))
    demand = Demand({MODEL: 3.0})
    ctrl = make_controller(kube_api, kube.ns, collect=demand.collect)

    def status_patches() -> int:
        return sum(r.method == "PATCH" and r.subresource == "status" and r.namespace == kube.ns
                   and r.name == "same-l4" for r in emulated_cluster.core.requests)
    cycle(ctrl)
    kube.wait_ready("same-l4", kube.replicas("same-l4"))
    cycle(ctrl)
    settled = status_patches()
    cycle(ctrl)
    cycle(ctrl)
    assert status_patches() == settled, "an unchanged status was written again"
    demand.set(MODEL, 8.0)
    cycle(ctrl)
    assert status_patches() == settled + 1


def test_the_second_cycle_starts_warm_from_the_first_and_says_so_on_metrics(kube, kube_api):
    """Enough variants (8 models x 8) for the decomposition: the controller keeps the last allocation's
    prices, columns and plan and hands them to the next one, which reports it (`optimizer_warm_start`)
    with a proven gap no wider than the cold cycle's."""
    models = [{**TINY_MODEL, "name": f"tiny/chat-1b-{m}"} for m in range(8)]
    for m in range(8):
        for acc, profile in (("L4", L4_PROFILE), ("H100", H100_PROFILE)):
            for count in (1, 2, 3, 4):
                name = f"m{m}-{acc.lower()}-x{count}"
                kube.deploy(name, 0)
                kube.apply_variant(variant(name, name, accelerator=acc, profile=profile, min_replicas=0,
                                           model=models[m]["name"], acceleratorCount=count))
    settings = settings_dict(models=models, accelerators=[{"name": "L4", "cost_per_hour": 1.0, "available": 10},
                                                          {"name": "H100", "cost_per_hour": 8.0, "available": 16}])
    demand = Demand({mm["name"]: 2.0 + m for m, mm in enumerate(models)})
    ctrl = make_controller(kube_api, kube.ns, settings, collect=demand.collect)
    first = cycle(ctrl)
    assert first.ok and len(first.variants) == 64 and first.optimizer_gap is not None
    assert not first.optimizer_warm_started
    assert "variant_autoscaler_optimizer_warm_start 0.0" in ctrl.deps.exporter.render().decode()
    second = cycle(ctrl)
    assert second.ok and second.optimizer_warm_started
    assert second.optimizer_gap <= first.optimizer_gap + 1e-9
    scraped = ctrl.deps.exporter.render().decode()
    assert "variant_autoscaler_optimizer_warm_start 1.0" in scraped
    gap = re.search(r"^variant_autoscaler_optimizer_gap_ratio (\S+)$", scraped, flags=re.M)
    assert gap and math.isclose(float(gap.group(1)), second.optimizer_gap, rel_tol=1e-9, abs_tol=1e-12)


def test_a_rising_demand_is_planned_ahead_and_the_status_says_so(kube, kube_api):
    """With the forecast (the default) the plan leads a steady rise; status and /metrics show the planned
    rate beside the observed one, and the normalized load stays the observed one."""
    kube.deploy("ahead-l4", 1)
    kube.apply_variant(variant("ahead-l4", "ahead-l4", accelerator="L4", profile=L4_PROFILE, min_replicas=1))
    now = [5000.0]
    demand = Demand({MODEL: 1.0})
    ctrl = make_controller(kube_api, kube.ns, settings_dict(interval_s=30, forecast_lead_time_s=120),
                           collect=demand.collect, clock=lambda: now[0])
    for i in range(16):  # +0.25 req/s per 30 s cycle
        now[0] = 5000.0 + 30.0 * i
        demand.set(MODEL, 1.0 + 0.25 * i)
        cycle(ctrl)
    status = kube.variant("ahead-l4")["status"]
    observed = status["observedLoad"]["arrivalRateRps"]
    assert observed == 4.75
    assert status["plannedArrivalRateRps"] > observed * 1.05
    scraped = ctrl.deps.exporter.render().decode()
    line = next(x for x in scraped.splitlines()
                if x.startswith(f'variant_autoscaler_model_planned_arrival_rate_rps{{model="{MODEL}"}} '))
    assert float(line.split()[-1]) == pytest.approx(status["plannedArrivalRateRps"], abs=1e-5)
    assert status["normalizedLoad"] * status["capacityPerReplicaRps"] * status["readyReplicas"] \
        == pytest.approx(observed, rel=0.02)

    off = make_controller(kube_api, kube.ns, settings_dict(interval_s=30, forecast=False), collect=demand.collect,
                          clock=lambda: now[0] + 30.0)
    report = cycle(off)
    assert report.ok and not off.memory.forecasts
    line = next(x for x in off.deps.exporter.render().decode().splitlines()
                if x.startswith(f'variant_autoscaler_model_planned_arrival_rate_rps{{model="{MODEL}"}} '))
    assert float(line.split()[-1]) == observed  # forecast off: the plan is the measured rate

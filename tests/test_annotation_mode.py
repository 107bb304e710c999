"""Annotation mode (issue 15 item 2): llm-d-autoscaling v0.9 users' annotated KEDA ScaledObjects are
managed beside VariantAutoscalings, in one cluster and one joint decision.

On the real CRD server with a ScaledObject CRD written here from KEDA's public schema
(tests/keda/), through the real `kubernetes` client; the controller cycle runs as the kopf loop runs
it, in metrics mode (KEDA actuates): the annotated variant's decision must appear on /metrics under
its ScaledObject's name, its problems as Events on the ScaledObject, and its status (KEDA's) untouched.
"""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path

import pytest
import yaml
from operator_harness import Demand, Kube, settings_dict, variant
from variant_autoscaler.actuator import KubeGateway, RetryPolicy
from variant_autoscaler.annotations import (
    KEDA_DEFAULT_MAX_REPLICAS,
    SCALE_TO_ZERO_RETENTION,
    VARIANT_COST,
    is_managed,
    variant_from_annotated,
)
from variant_autoscaler.controller import Controller, ControllerDeps
from variant_autoscaler.exporter import Exporter
from variant_autoscaler.resources import InvalidResource, parse_variant
from variant_autoscaler.settings import OperatorSettings, SettingsStore

REPO = Path(__file__).resolve().parents[1]
SO_CRD = REPO / "tests" / "keda" / "scaledobjects.keda.sh.yaml"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # a known architecture: datasheet profiles on L4 and H100
PRICES = {"L4": 1.0, "H100": 8.0}


@pytest.fixture(scope="module")
def keda_crd(emulated_cluster):
    emulated_cluster.call(emulated_cluster.install_crds, [yaml.safe_load(SO_CRD.read_text())])


@pytest.fixture
def kube(kube_api, kube_namespace, keda_crd) -> Kube:
    return Kube(kube_api, kube_namespace)


def scaled_object(name: str, target: str, annotations: dict[str, str] | None, *, labels: dict | None = None,
                  **spec) -> dict:
    """A v0.9 user's ScaledObject: KEDA's Prometheus trigger on our desired-replicas metric."""
    meta = {"name": name, **({"annotations": annotations} if annotations is not None else {}),
            **({"labels": labels} if labels else {})}
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": meta,
            "spec": {"scaleTargetRef": {"name": target}, **spec,
                     "triggers": [{"type": "prometheus", "metricType": "AverageValue", "metadata": {
                         "serverAddress": "http://prometheus.monitoring.svc:9090", "threshold": "1",
                         "query": f'max(variant_autoscaler_desired_replicas{{variant="{name}"}})'}}]}}


def managed(model: str = MODEL, **extra: str) -> dict[str, str]:
    return {"llm-d.ai/managed": "true", "llm-d.ai/model-id": model, **extra}


def create_so(kube: Kube, body: dict) -> dict:
    return kube.custom.create_namespaced_custom_object("keda.sh", "v1alpha1", kube.ns, "scaledobjects", body)


def read_so(kube: Kube, name: str) -> dict:
    return kube.custom.get_namespaced_custom_object("keda.sh", "v1alpha1", kube.ns, "scaledobjects", name)


def make_controller(api, namespace: str, demand: Demand, **over) -> Controller:
    data = settings_dict(actuation_mode="metrics", annotation_mode=True, models=[], watched_namespaces=[namespace],
                         accelerators=[{"name": n, "cost_per_hour": p, "available": 8} for n, p in PRICES.items()],
                         default_slo={"ttft_s": 2.0, "itl_s": 0.1}, **over)
    gateway = KubeGateway(api, retry=RetryPolicy(attempts=5, first_delay_s=0.05, max_delay_s=0.4))
    return Controller(ControllerDeps(gateway=gateway, settings=SettingsStore(OperatorSettings.model_validate(data)),
                                     exporter=Exporter(), collect=demand.collect))


def desired_on_metrics(text: str, namespace: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("variant_autoscaler_desired_replicas{") and f'namespace="{namespace}"' in line \
                and f'variant="{name}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_both_modes_in_one_cluster_share_one_decision(kube, kube_api):
    kube.deploy("llama-l4", 1)
    kube.deploy("llama-h100", 1)
    kube.deploy("plain", 2)
    va = variant("llama-l4", "llama-l4", accelerator="L4", model=MODEL)
    del va["spec"]["slo"]
    kube.apply_variant(va)
    so = create_so(kube, scaled_object("llama-h100", "llama-h100",
                                       managed(**{VARIANT_COST: "3.5", "llm-d.ai/gpus-per-replica": "1"}),
                                       labels={"inference.optimization/acceleratorName": "H100"},
                                       minReplicaCount=1, maxReplicaCount=6))
    create_so(kube, scaled_object("plain", "plain", None))  # not annotated: KEDA's alone
    ctrl = make_controller(kube_api, kube.ns, Demand({MODEL: 40.0}))
    report = asyncio.run(ctrl.cycle())

    assert report.ok, report.error
    l4, h100 = report.variants[f"{kube.ns}/llama-l4"], report.variants[f"{kube.ns}/llama-h100"]
    assert l4.valid and h100.valid and f"{kube.ns}/plain" not in report.variants
    assert h100.desired_replicas is not None and 1 <= h100.desired_replicas <= 6
    # one joint decision: the annotated variant's price is the variant-cost annotation, not the settings' 8 $/h
    assert report.cost_per_hour == pytest.approx(l4.desired_replicas * PRICES["L4"] + h100.desired_replicas * 3.5)
    assert h100.desired_replicas >= 1 and report.cost_per_hour != pytest.approx(
        l4.desired_replicas * PRICES["L4"] + h100.desired_replicas * PRICES["H100"])
    text = ctrl.deps.exporter.render().decode()
    assert desired_on_metrics(text, kube.ns, "llama-h100") == h100.desired_replicas
    assert desired_on_metrics(text, kube.ns, "llama-l4") == l4.desired_replicas
    assert desired_on_metrics(text, kube.ns, "plain") is None
    # metrics mode: nothing scaled; the ScaledObject (its status is KEDA's) is not written, the VA is
    assert [kube.replicas(n) for n in ("llama-l4", "llama-h100", "plain")] == [1, 1, 2]
    after = read_so(kube, "llama-h100")
    assert after["metadata"]["resourceVersion"] == so["metadata"]["resourceVersion"] and "status" not in after
    assert kube.condition("llama-l4", "Actuated")["reason"] == "MetricsPublished"


def test_annotation_problems_are_events_on_the_scaled_object_and_the_rest_goes_on(kube, kube_api):
    for name in ("ok-h100", "no-model", "bad-cost", "llama-l4"):
        kube.deploy(name, 1)
    va = variant("llama-l4", "llama-l4", accelerator="L4", model=MODEL)
    del va["spec"]["slo"]
    kube.apply_variant(va)
    labels = {"inference.optimization/acceleratorName": "H100"}
    create_so(kube, scaled_object("ok-h100", "ok-h100", managed(), labels=labels))
    create_so(kube, scaled_object("no-model", "no-model", {"llm-d.ai/managed": "true"}, labels=labels))
    create_so(kube, scaled_object("bad-cost", "bad-cost", managed(**{VARIANT_COST: "cheap"}), labels=labels))
    create_so(kube, scaled_object("llama-l4", "ok-h100", managed(), labels=labels))  # the VA's name
    ctrl = make_controller(kube_api, kube.ns, Demand({MODEL: 10.0}))
    report = asyncio.run(ctrl.cycle())

    assert report.ok and report.variants[f"{kube.ns}/ok-h100"].valid
    assert report.variants[f"{kube.ns}/llama-l4"].valid, "the VA keeps its name; the ScaledObject is refused"
    events = {(e.involved_object.name, e.reason): e for e in kube.events()
              if e.involved_object.kind == "ScaledObject"}
    missing = events[("no-model", "InvalidAnnotations")]
    assert "llm-d.ai/model-id" in missing.message and missing.involved_object.api_version == "keda.sh/v1alpha1"
    assert "llm-d.ai/variant-cost" in events[("bad-cost", "InvalidAnnotations")].message
    assert "cheap" in events[("bad-cost", "InvalidAnnotations")].message
    assert "same name" in events[("llama-l4", "VariantNameConflict")].message
    assert not [k for k in events if k[0] == "ok-h100"]
    text = ctrl.deps.exporter.render().decode()
    assert desired_on_metrics(text, kube.ns, "no-model") is None and desired_on_metrics(text, kube.ns, "bad-cost") is None
    assert desired_on_metrics(text, kube.ns, "ok-h100") is not None
    # the same problems are not re-posted every cycle
    asyncio.run(ctrl.cycle())
    assert len([e for e in kube.events("InvalidAnnotations") if e.involved_object.name == "bad-cost"]) == 1


# ------------------------------------------------------------------------------------------------
# The mapping itself (pure): each annotation lands where the CRD path has it.


def parsed(annotations: dict[str, str], **spec):
    return parse_variant(variant_from_annotated({**scaled_object("so", "serve", annotations, **spec),
                                                     "metadata": {"name": "so", "namespace": "n",
                                                                  "annotations": annotations}}))


def test_annotations_map_to_the_variant_model():
    p = parsed(managed(**{VARIANT_COST: "2.25", "llm-d.ai/gpus-per-replica": "4", "llm-d.ai/role": "decode"}),
               maxReplicaCount=12)
    assert (p.model_id, p.variant_cost, p.accelerator_count, p.role_name) == (MODEL, 2.25, 4, "decode")
    assert (p.target.kind, p.target.name, p.min_replicas, p.max_replicas) == ("Deployment", "serve", 1, 12)
    assert (p.ref.kind, p.ref.api_version, p.ref.name) == ("ScaledObject", "keda.sh/v1alpha1", "so")
    # KEDA's own default minimum is 0; without the retention annotation it must not mean "scale to zero"
    plain = parsed(managed(), minReplicaCount=0)
    assert (plain.min_replicas, plain.max_replicas, plain.scale_down) == (1, KEDA_DEFAULT_MAX_REPLICAS, None)
    zero = parsed(managed(**{SCALE_TO_ZERO_RETENTION: "10m"}))
    assert zero.min_replicas == 0 and zero.scale_down.stabilization_window_s == 600
    assert parsed(managed(**{SCALE_TO_ZERO_RETENTION: "1m30s"})).scale_down.stabilization_window_s == 90
    assert parsed({**managed(), "autoscaling.keda.sh/paused": "true"}).paused
    assert not parsed({**managed(), "llm-d.ai/managed": "true"}).paused


@pytest.mark.parametrize(("annotations", "spec", "field"), [
    ({"llm-d.ai/managed": "true"}, {}, "llm-d.ai/model-id"),
    (managed(**{VARIANT_COST: "-1"}), {}, "llm-d.ai/variant-cost"),
    (managed(**{VARIANT_COST: "nan"}), {}, "llm-d.ai/variant-cost"),
    (managed(**{"llm-d.ai/gpus-per-replica": "0"}), {}, "llm-d.ai/gpus-per-replica"),
    (managed(**{"llm-d.ai/role": "router"}), {}, "llm-d.ai/role"),
    (managed(**{SCALE_TO_ZERO_RETENTION: "soon"}), {}, SCALE_TO_ZERO_RETENTION),
    (managed(**{SCALE_TO_ZERO_RETENTION: "1h30m"}), {}, SCALE_TO_ZERO_RETENTION),
    (managed(), {"minReplicaCount": 5, "maxReplicaCount": 2}, "spec.minReplicaCount"),
])
def test_bad_annotations_name_the_field(annotations, spec, field):
    with pytest.raises(InvalidResource) as info:
        parsed(annotations, **spec)
    assert field in info.value.field and info.value.condition_reason == "InvalidAnnotations"
    assert not re.search(r"Traceback|Error\(", str(info.value))


def test_annotation_mode_needs_metrics_mode():
    with pytest.raises(ValueError, match="annotation_mode: needs actuation_mode: metrics"):
        OperatorSettings.model_validate({"annotation_mode": True})
    assert not math.isnan(OperatorSettings.model_validate({"annotation_mode": True, "actuation_mode": "metrics"})
                          .rate_window_s)


# ------------------------------------------------------------------------------------------------
# The same annotations on an autoscaling/v2 HPA (v0.9's other carrier), next to a ScaledObject and a VA.


def hpa(name: str, target: str, annotations: dict[str, str], *, min_replicas: int | None = None,
        max_replicas: int = 5) -> dict:
    """A v0.9 user's HPA on the llm-d WVA metric (External, AverageValue 1)."""
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": name, "annotations": annotations, "labels": {
                "inference.optimization/acceleratorName": "L4"}},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
                     **({"minReplicas": min_replicas} if min_replicas is not None else {}),
                     "maxReplicas": max_replicas,
                     "metrics": [{"type": "External", "external": {
                         "metric": {"name": "wva_desired_replicas",
                                    "selector": {"matchLabels": {"variant_name": name}}},
                         "target": {"type": "AverageValue", "averageValue": "1"}}}]}}


def test_annotated_hpas_are_managed_beside_scaled_objects_and_vas(kube, kube_api):
    from kubernetes import client

    autoscaling = client.AutoscalingV2Api(kube_api)
    for name in ("va-l4", "hpa-l4", "so-h100", "bad-hpa"):
        kube.deploy(name, 1)
    va = variant("va-l4", "va-l4", accelerator="L4", model=MODEL)
    del va["spec"]["slo"]
    kube.apply_variant(va)
    created = autoscaling.create_namespaced_horizontal_pod_autoscaler(
        kube.ns, hpa("hpa-l4", "hpa-l4", managed(**{VARIANT_COST: "0.75"}), max_replicas=4))
    autoscaling.create_namespaced_horizontal_pod_autoscaler(
        kube.ns, hpa("bad-hpa", "bad-hpa", managed(**{"llm-d.ai/gpus-per-replica": "two"})))
    create_so(kube, scaled_object("so-h100", "so-h100", managed(),
                                  labels={"inference.optimization/acceleratorName": "H100"}))
    ctrl = make_controller(kube_api, kube.ns, Demand({MODEL: 30.0}))
    report = asyncio.run(ctrl.cycle())

    assert report.ok, report.error
    keys = {k.split("/", 1)[1] for k, o in report.variants.items() if o.valid}
    assert keys == {"va-l4", "hpa-l4", "so-h100"}
    by = {k.split("/", 1)[1]: o for k, o in report.variants.items()}
    assert 1 <= by["hpa-l4"].desired_replicas <= 4
    assert report.cost_per_hour == pytest.approx(by["va-l4"].desired_replicas * PRICES["L4"]
                                                 + by["hpa-l4"].desired_replicas * 0.75
                                                 + by["so-h100"].desired_replicas * PRICES["H100"])
    text = ctrl.deps.exporter.render().decode()
    assert desired_on_metrics(text, kube.ns, "hpa-l4") == by["hpa-l4"].desired_replicas
    assert f'wva_desired_replicas{{accelerator_type="L4",namespace="{kube.ns}",variant_name="hpa-l4"}}' in text
    after = autoscaling.read_namespaced_horizontal_pod_autoscaler("hpa-l4", kube.ns)
    assert after.metadata.resource_version == created.metadata.resource_version  # its status is the HPA's
    (event,) = [e for e in kube.events("InvalidAnnotations") if e.involved_object.name == "bad-hpa"]
    assert (event.involved_object.kind, event.involved_object.api_version) == ("HorizontalPodAutoscaler",
                                                                               "autoscaling/v2")
    assert "llm-d.ai/gpus-per-replica" in event.message and "two" in event.message


def test_hpa_bounds_map_like_a_scaled_objects():
    body = hpa("h", "serve", managed(**{"llm-d.ai/role": "prefill"}), max_replicas=7)
    body["metadata"]["namespace"] = "n"
    p = parse_variant(variant_from_annotated(body))
    assert (p.ref.kind, p.ref.api_version, p.min_replicas, p.max_replicas, p.role_name) == (
        "HorizontalPodAutoscaler", "autoscaling/v2", 1, 7, "prefill")
    body = hpa("h", "serve", managed(**{SCALE_TO_ZERO_RETENTION: "300"}), min_replicas=0, max_replicas=3)
    zero = parse_variant(variant_from_annotated(body))
    assert (zero.min_replicas, zero.scale_down.stabilization_window_s) == (0, 300)
    with pytest.raises(InvalidResource) as info:
        variant_from_annotated(hpa("h", "serve", managed(), min_replicas=4, max_replicas=2))
    assert info.value.field == "spec.minReplicas"


def test_the_hpa_keda_creates_for_a_scaled_object_is_not_a_second_variant():
    owned = hpa("keda-hpa-so", "serve", managed())
    owned["metadata"]["ownerReferences"] = [{"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
                                             "name": "so", "uid": "u", "controller": True}]
    assert not is_managed(owned) and is_managed(hpa("mine", "serve", managed()))
    assert not is_managed(hpa("off", "serve", {**managed(), "llm-d.ai/managed": "True"}))  # only "true"


def test_the_readme_example_is_a_valid_scaled_object_and_maps_as_documented(kube):
    """The annotated ScaledObject of README 'Using with KEDA' is accepted by the ScaledObject schema
    and becomes the variant the comments say."""
    text = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "llm-d.ai/managed" in b)
    body = yaml.safe_load(block)
    body["metadata"]["namespace"] = kube.ns
    stored = create_so(kube, body)
    p = parse_variant(variant_from_annotated(stored))
    assert (p.model_id, p.variant_cost, p.accelerator_count, p.role_name, p.accelerator) == (
        "meta-llama/Llama-3.1-8B-Instruct", 3.5, 1, "both", "H100")
    assert (p.min_replicas, p.max_replicas, p.scale_down.stabilization_window_s) == (0, 8, 600)
    del stored["metadata"]["annotations"]["llm-d.ai/scale-to-zero-retention"]
    assert parse_variant(variant_from_annotated(stored)).min_replicas == 1
    assert stored["spec"]["triggers"][0]["metadata"]["query"] == (
        'max(variant_autoscaler_desired_replicas{namespace="llm",variant="llama-8b-h100"})')

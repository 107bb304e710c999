"""llm-d WVA users change one apiVersion line: every published manifest form must then work.

The manifests in tests/wva_manifests/ are written in the shapes the upstream WVA repositories
publish (config/samples, the vllm-emulator example, the docs tutorials, the older CRD's e2e helper
and its first CRD reference; see that folder's README). Each one gets only its apiVersion (and its
namespace) changed, is created on the real CRD server, and goes through a control cycle on the
emulated cluster with the SLO ConfigMaps in WVA's service-class format. What each must come to is
in EXPECTED, one row per manifest: the accelerator it resolves to (the label
inference.optimization/acceleratorName, the target's node selector), the target (a missing
scaleTargetRef is the Deployment of the VA's name), the price (variantCost overrides the settings),
and the OptimizationReady reason, WVA's own `OptimizationSucceeded` where it succeeds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from operator_harness import Demand, Kube, deployment, settings_dict
from variant_autoscaler.actuator import KubeGateway, RetryPolicy
from variant_autoscaler.controller import Controller, ControllerDeps
from variant_autoscaler.exporter import Exporter
from variant_autoscaler.settings import GPU_PRODUCT_LABEL, OperatorSettings, SettingsStore

HERE = Path(__file__).parent / "wva_manifests"
OUR_API = "autoscaling.variant-autoscaler.io/v1alpha1"
WVA_APIS = ("llmd.ai/v1alpha1", "llm-d.ai/v1alpha1")
TINY = {"weight_gb": 2.0, "kv_bytes_per_token": 131072.0}
SETTINGS = settings_dict(
    accelerators=[{"name": "A100", "cost_per_hour": 2.0, "memory_gb": 80, "available": 64},
                  {"name": "A100-80G", "cost_per_hour": 2.2, "available": 64,
                   "product_labels": ["NVIDIA-A100-SXM4-80GB"]},
                  {"name": "H100", "cost_per_hour": 4.0, "available": 64},
                  {"name": "T4", "cost_per_hour": 0.3, "available": 64},
                  {"name": "L40S", "cost_per_hour": 1.5, "memory_gb": 48, "available": 64}],
    models=[{"name": "default/default", **TINY}, {"name": "meta/llama-3.1-13b", "weight_gb": 26.0,
                                                  "kv_bytes_per_token": 819200.0}],
    default_slo={"ttft_s": 5.0, "itl_s": 0.2})
# WVA service classes (its ConfigMap format: slo-tpot / slo-ttft in ms), for the sloClassRefs above
SERVICE_CLASSES = {
    "service-classes-config": {"premium.yaml": ["meta/llama-3.1-8b", "meta/llama-3.1-70b", "meta/llama-3.1-13b"]},
    "premium": {"opt-125m": ["default/default"], "slo": ["default/default"]},
    "premium-slo": {"opt-125m": ["meta/llama-3.1-8b"]},
}
# The Deployments of with-cost.yaml ask for their hardware by node selector, as upstream says they do.
NODE_PRODUCT = {"llama-70b-premium-h100": "NVIDIA-H100-80GB-HBM3", "llama-70b-standard-a100": "NVIDIA-A100-SXM4-80GB",
                "llama-8b-budget-t4": "Tesla-T4", "llama-8b-tenant-gold": "NVIDIA-H100-80GB-HBM3",
                "llama-8b-tenant-silver": "NVIDIA-H100-80GB-HBM3", "llama-8b-default-cost": "NVIDIA-H100-80GB-HBM3"}

# (file, VA name) -> (accelerator, target Deployment, $/h of one replica, OptimizationReady reason)
EXPECTED = {
    # no profile in the manifest: WVA tunes one online, as this operator fits one from live vLLM metrics;
    # a single cycle on pre-collected observations has none yet
    ("integration.yaml", "sample-deployment"): ("A100", "sample-deployment", 2.0, "NoProfile"),
    # a 70B model (141 GB of weights) on one 80 GB GPU, as these samples ask (no acceleratorCount): it does not fit
    ("with-cost.yaml", "llama-70b-premium-h100"): ("H100", "llama-70b-premium-h100", 80.0, "InvalidVariant"),
    ("with-cost.yaml", "llama-70b-standard-a100"): ("A100-80G", "llama-70b-standard-a100", 40.0, "InvalidVariant"),
    # an 8B model's 16.06 GB of weights on a 16 GB T4: does not fit either
    ("with-cost.yaml", "llama-8b-budget-t4"): ("T4", "llama-8b-budget-t4", 5.0, "InvalidVariant"),
    ("with-cost.yaml", "llama-8b-tenant-gold"): ("H100", "llama-8b-tenant-gold", 25.0, "OptimizationSucceeded"),
    ("with-cost.yaml", "llama-8b-tenant-silver"): ("H100", "llama-8b-tenant-silver", 15.0, "OptimizationSucceeded"),
    ("with-cost.yaml", "llama-8b-default-cost"): ("H100", "llama-8b-default-cost", 4.0, "OptimizationSucceeded"),
    ("scale-to-zero.yaml", "llama-8b-a100"): ("A100", "llama-8b-a100", 10.5, "OptimizationSucceeded"),
    ("scale-to-zero.yaml", "llama-8b-l40s"): ("L40S", "llama-8b-l40s", 8.5, "OptimizationSucceeded"),
    ("scale-to-zero.yaml", "llama-70b-a100"): ("A100", "llama-70b-a100", 12.0, "InvalidVariant"),
    ("scale-to-zero.yaml", "llama-13b-a100"): ("A100", "llama-13b-a100", 11.0, "OptimizationSucceeded"),
    ("vllm-emulator.yaml", "vllme-deployment"): ("A100", "vllme-deployment", 2.0, "OptimizationSucceeded"),
    # a LeaderWorkerSet has a scale subresource, but this operator scales Deployments and StatefulSets only
    ("with-lws.yaml", "sample-deployment"): (None, None, None, "UnsupportedTargetKind"),
    ("docs-configuration.yaml", "llama-8b-autoscaler"): ("A100", "llama-8b-deployment", 2.0, "OptimizationSucceeded"),
    # the early WVA kept profiles in its own ConfigMap; "A100" has no datasheet here, so: set spec.profile
    ("docs-configuration-early.yaml", "llama-8b-autoscaler"): ("A100", "llama-8b-autoscaler", 2.0, "NoProfile"),
    ("e2e-model-profile.yaml", "vllme-e2e"): ("A100", "vllme-e2e", 2.0, "OptimizationSucceeded"),
    # decode parameters only (no prefill): there is no profile to size with until one is given or fitted online
    ("crd-reference-v0.yaml", "vllme-v0"): ("A100", "vllme-v0", 2.0, "NoProfile"),
}


def manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(HERE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def test_every_manifest_has_an_expected_result():
    names = {(f, d["metadata"]["name"]) for f, d in manifests()}
    assert names == set(EXPECTED)
    assert all(d["apiVersion"] in WVA_APIS for _, d in manifests()), "test data must keep upstream's apiVersion"


def _service_class(models: list[str]) -> str:
    return yaml.safe_dump({"name": "Premium", "priority": 1,
                           "data": [{"model": m, "slo-tpot": 200, "slo-ttft": 3000} for m in models]})


def _deploy(kube: Kube, name: str, replicas: int = 1) -> None:
    body = deployment(name, replicas)
    if name in NODE_PRODUCT:
        body["spec"]["template"]["spec"]["nodeSelector"] = {GPU_PRODUCT_LABEL: NODE_PRODUCT[name]}
    kube.apps.create_namespaced_deployment(kube.ns, body)


@pytest.mark.parametrize("source", sorted({f for f, _ in EXPECTED}))
def test_a_wva_manifest_works_after_changing_only_its_api_version(kube_api, kube_namespace, source):
    kube = Kube(kube_api, kube_namespace)
    for cm, keys in SERVICE_CLASSES.items():
        kube.core.create_namespaced_config_map(kube.ns, {"metadata": {"name": cm},
                                                         "data": {k: _service_class(v) for k, v in keys.items()}})
    docs = [d for f, d in manifests() if f == source]
    models = set()
    for doc in docs:
        doc = {**doc, "apiVersion": OUR_API, "metadata": {**doc["metadata"], "namespace": kube.ns}}
        stored = kube.apply_variant(doc)  # the real CRD server accepts it as written
        assert stored["spec"].get("variantCost") == doc["spec"].get("variantCost"), "no schema default for variantCost"
        expected = EXPECTED[(source, doc["metadata"]["name"])]
        if expected[1]:
            _deploy(kube, expected[1])
        models.add(doc["spec"].get("modelID") or doc["spec"].get("modelName"))
    store = SettingsStore(OperatorSettings.model_validate({**SETTINGS, "watched_namespaces": [kube.ns]}))
    exporter = Exporter()
    ctrl = Controller(ControllerDeps(gateway=KubeGateway(kube_api, retry=RetryPolicy(attempts=3, first_delay_s=0.05)),
                                     settings=store, exporter=exporter,
                                     collect=Demand({m: 3.0 for m in models}).collect))
    report = asyncio.run(ctrl.cycle())
    assert report.ok, report.error
    scraped = exporter.render().decode()
    for doc in docs:
        name = doc["metadata"]["name"]
        accelerator, target, price, reason = EXPECTED[(source, name)]
        status = kube.variant(name)["status"]
        conds = {c["type"]: c for c in status["conditions"]}
        assert conds["OptimizationReady"]["reason"] == reason, (name, conds["OptimizationReady"])
        if target is None:
            continue
        assert conds["TargetResolved"]["status"] == "True", (name, conds["TargetResolved"])
        assert f"Deployment {target} has" in conds["TargetResolved"]["message"]
        if "scaleTargetRef" not in doc["spec"]:
            assert "scaleTargetRef is unset" in conds["TargetResolved"]["message"]
        assert status["currentAlloc"]["accelerator"] == accelerator, (name, status["currentAlloc"])
        assert status["replicaCostPerHour"] == pytest.approx(price), name
        if reason == "OptimizationSucceeded":
            assert status["desiredOptimizedAlloc"]["accelerator"] == accelerator
            replicas = kube.replicas(target)
            assert replicas == status["desiredReplicas"] >= 1
            if replicas != 1:
                direction = "up" if replicas > 1 else "down"
                assert (f'wva_replica_scaling_total{{accelerator_type="{accelerator}",direction="{direction}",'
                        f'namespace="{kube.ns}",reason="Scaled{direction.capitalize()}",variant_name="{name}"}} 1.0'
                        in scraped), scraped


def test_variant_cost_overrides_the_settings_price_in_the_decision(kube_api, kube_namespace):
    """Two H100 variants of one model; the settings price both at 4 $/h a GPU, but one says variantCost
    "1.0": the optimizer must put the load there, and the cycle's cost is priced with it."""
    kube = Kube(kube_api, kube_namespace)
    for name, cost in (("cheap", "1.0"), ("dear", None)):
        _deploy(kube, name, 0)
        spec = {"scaleTargetRef": {"kind": "Deployment", "name": name}, "modelID": "default/default",
                "accelerator": "H100", "minReplicas": 0,
                "profile": {"parametric": {"decodeBaseSeconds": 0.02, "decodePerSeqSeconds": 0.001,
                                           "prefillPerTokenSeconds": 0.00005}},
                **({"variantCost": cost} if cost else {})}
        kube.apply_variant({"apiVersion": OUR_API, "kind": "VariantAutoscaling", "metadata": {"name": name},
                            "spec": spec})
    store = SettingsStore(OperatorSettings.model_validate({**SETTINGS, "watched_namespaces": [kube.ns]}))
    ctrl = Controller(ControllerDeps(gateway=KubeGateway(kube_api, retry=RetryPolicy(attempts=3, first_delay_s=0.05)),
                                     settings=store, exporter=Exporter(),
                                     collect=Demand({"default/default": 20.0}).collect))
    report = asyncio.run(ctrl.cycle())
    cheap, dear = kube.replicas("cheap"), kube.replicas("dear")
    assert cheap >= 1 and dear == 0, (cheap, dear)
    assert report.cost_per_hour == pytest.approx(cheap * 1.0)
    assert kube.variant("cheap")["status"]["replicaCostPerHour"] == 1.0
    assert kube.variant("dear")["status"]["replicaCostPerHour"] == 4.0
    scraped = ctrl.deps.exporter.render().decode()
    assert (f'wva_replica_scaling_total{{accelerator_type="H100",direction="up",namespace="{kube.ns}",'
            f'reason="ScaledUp",variant_name="cheap"}} 1.0') in scraped

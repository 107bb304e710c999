"""The VariantAutoscaling CRD, checked by the real Kubernetes CRD server (schema, defaults, CEL,
status subresource, printer columns) and by kubectl (explain, get, apply of an llm-d WVA manifest)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "crds" / "variantautoscalings.yaml"
GROUP, VERSION, PLURAL = "autoscaling.variant-autoscaler.io", "v1alpha1", "variantautoscalings"
API_VERSION = f"{GROUP}/{VERSION}"

# An llm-d workload-variant-autoscaler manifest as its users write it (WVA's "simplified API" and the
# older one with modelProfile), to be accepted here after changing only its apiVersion line.
WVA_MANIFESTS = """\
apiVersion: llmd.ai/v1alpha1
kind: VariantAutoscaling
metadata:
  name: llama-70b-premium-h100
  labels:
    model: llama-70b
spec:
  scaleTargetRef:
    kind: Deployment
    name: llama-70b-premium-h100
  modelID: "meta/llama-3.1-70b"
  variantCost: "80.0"
  minReplicas: 1
  maxReplicas: 10
  acceleratorType: "H100"
  acceleratorCount: 1
  variantProfile:
    maxBatchSize: 256
    perfParms:
      decodeParms:
        alpha: "15.2"
        beta: "0.28"
      prefillParms:
        gamma: "3.8"
        delta: "0.07"
---
apiVersion: llmd.ai/v1alpha1
kind: VariantAutoscaling
metadata:
  name: llama-8b-standard-a100
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: llama-8b-standard-a100
  modelID: "meta/llama-3.1-8b"
  variantID: "meta/llama-3.1-8b-A100-1"
  accelerator: A100
  acceleratorCount: 1
  sloClassRef:
    name: service-classes-config
    key: premium.yaml
  modelProfile:
    accelerators:
      - acc: "A100"
        accCount: 1
        perfParms:
          decodeParms: {alpha: "20.5", beta: "0.41"}
          prefillParms: {gamma: "5.2", delta: "0.1"}
        maxBatchSize: 256
"""


def crd_doc() -> dict:
    return yaml.safe_load(CRD_FILE.read_text())


def version_doc() -> dict:
    return crd_doc()["spec"]["versions"][0]


def spec_schema() -> dict:
    return version_doc()["schema"]["openAPIV3Schema"]["properties"]["spec"]


def custom(kube_api):
    from kubernetes import client

    return client.CustomObjectsApi(kube_api)


def va(name: str, **spec) -> dict:
    body = {"scaleTargetRef": {"name": f"{name}-deploy"}, "modelID": "meta/llama-3.1-8b"}
    body.update(spec)
    return {"apiVersion": API_VERSION, "kind": "VariantAutoscaling", "metadata": {"name": name}, "spec": body}


def create(kube_api, namespace: str, body: dict) -> dict:
    return custom(kube_api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def rejection(kube_api, namespace: str, body: dict) -> tuple[int, str]:
    """Create `body`, expect the server to refuse; return (HTTP status, message)."""
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as info:
        create(kube_api, namespace, body)
    return info.value.status, json.loads(info.value.body)["message"]


def words(text: str) -> str:
    return " ".join(text.split())


def test_crd_is_established_with_names_and_status_subresource(emulated_cluster, kube_api):
    from kubernetes import client

    crd = client.ApiextensionsV1Api(kube_api).read_custom_resource_definition(f"{PLURAL}.{GROUP}")
    conditions = {c.type: c.status for c in crd.status.conditions}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert crd.spec.scope == "Namespaced"
    assert {"va", "vas"} <= set(crd.spec.names.short_names)
    discovery = custom(kube_api).get_api_resources(GROUP, VERSION)
    resources = {r.name: r for r in discovery.resources}
    assert "va" in resources[PLURAL].short_names
    assert f"{PLURAL}/status" in resources
    assert f"{PLURAL}/scale" not in resources


def test_kubectl_explain_prints_the_field_descriptions(emulated_cluster):
    slo = spec_schema()["properties"]["slo"]
    out = emulated_cluster.kubectl("explain", "va.spec.slo")
    assert out.returncode == 0, out.stderr
    text = words(out.stdout)
    assert words(slo["description"])[:60] in text
    for name, prop in slo["properties"].items():
        assert name in text
        assert words(prop["description"])[:40] in text
    spec_out = emulated_cluster.kubectl("explain", "va.spec.scaleTargetRef")
    assert spec_out.returncode == 0, spec_out.stderr
    assert "-required-" in spec_out.stdout and "name" in spec_out.stdout


def test_every_schema_field_has_a_description():
    missing = []

    def walk(node: dict, path: str) -> None:
        if path and "description" not in node and not path.endswith(".metadata"):
            missing.append(path)
        for name, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict) and node["items"].get("properties"):
            walk(node["items"], f"{path}[]")

    walk(version_doc()["schema"]["openAPIV3Schema"], "")
    assert not missing, f"fields without a description (kubectl explain shows nothing): {missing}"


def test_defaults_are_applied_by_the_server(kube_api, kube_namespace):
    obj = create(kube_api, kube_namespace, va("defaults", slo={"ttftSeconds": 0.5, "itlSeconds": 0.05}))
    spec = obj["spec"]
    assert "variantCost" not in spec  # unset: the settings' price (an explicit one overrides it, so no default)
    assert spec["minReplicas"] == 1
    assert "acceleratorCount" not in spec  # unset: a WVA modelProfile accCount, else 1 (resources.py)
    assert spec["role"] == "both"
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "defaults-deploy"}
    assert spec["slo"]["percentile"] == 90
    assert "maxReplicas" not in spec
    assert obj["metadata"]["generation"] == 1


def test_min_replicas_zero_is_allowed(kube_api, kube_namespace):
    obj = create(kube_api, kube_namespace, va("zero", minReplicas=0, maxReplicas=0))
    assert obj["spec"]["minReplicas"] == 0


def test_cel_rejects_min_above_max_with_a_readable_message(kube_api, kube_namespace):
    from kubernetes.client.exceptions import ApiException

    status, message = rejection(kube_api, kube_namespace, va("minmax", minReplicas=3, maxReplicas=2))
    assert status == 422
    assert "spec.minReplicas" in message
    assert "minReplicas must be less than or equal to maxReplicas" in message
    create(kube_api, kube_namespace, va("minmax-ok", minReplicas=2, maxReplicas=3))
    with pytest.raises(ApiException) as info:
        custom(kube_api).patch_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, "minmax-ok",
                                                        {"spec": {"minReplicas": 4}})
    assert info.value.status == 422
    assert "less than or equal to maxReplicas" in json.loads(info.value.body)["message"]


@pytest.mark.parametrize(("spec", "expected"), [
    ({"minReplicas": "three"}, "spec.minReplicas: Invalid value: \"string\""),
    ({"role": "sideways"}, "spec.role: Unsupported value: \"sideways\""),
    ({"variantCost": "cheap"}, "spec.variantCost in body should match"),
    ({"minReplicas": -1}, "spec.minReplicas in body should be greater than or equal to 0"),
    ({"acceleratorCount": 0}, "spec.acceleratorCount in body should be greater than or equal to 1"),
    ({"slo": {"ttftSeconds": 0, "itlSeconds": 0.05}}, "spec.slo.ttftSeconds in body should be greater than 0"),
    ({"slo": {"ttftSeconds": 1.0}}, "spec.slo.itlSeconds: Required value"),
    ({"scaleTargetRef": {"name": ""}}, "spec.scaleTargetRef.name"),
    ({"scaleTargetRef": {"name": "Not A Name"}}, "spec.scaleTargetRef.name in body should match"),
    ({"priority": 0}, "spec.priority in body should be greater than 0"),
])
def test_invalid_values_are_rejected_by_the_schema(kube_api, kube_namespace, spec, expected):
    status, message = rejection(kube_api, kube_namespace, va("bad", **spec))
    assert status == 422
    assert expected in message, message


def test_required_fields_are_enforced(kube_api, kube_namespace):
    body = va("no-model")
    del body["spec"]["modelID"]
    status, message = rejection(kube_api, kube_namespace, body)
    assert status == 422 and "spec.modelID: Required value" in message, message


def test_an_old_wva_manifest_without_scale_target_ref_is_accepted(kube_api, kube_namespace):
    """The older llm-d WVA CRD had no scaleTargetRef (its target was the Deployment of the VA's name)."""
    body = va("old-wva")
    del body["spec"]["scaleTargetRef"]
    obj = create(kube_api, kube_namespace, body)
    assert "scaleTargetRef" not in obj["spec"]


@pytest.mark.parametrize(("spec", "expected"), [
    ({"profile": {}}, "profile must set exactly one of parametric, tabulated or configMapRef"),
    ({"profile": {"parametric": {"decodeBaseSeconds": 0.01, "prefillPerTokenSeconds": 1e-4},
                  "configMapRef": {"name": "p"}}}, "exactly one of parametric, tabulated or configMapRef"),
    ({"slo": {"ttftSeconds": 2.0, "itlSeconds": 0.05, "e2eSeconds": 1.0}}, "e2eSeconds must be at least ttftSeconds"),
    ({"role": "decode", "variantProfile": {"maxBatchSize": 8}}, "variantProfile (llm-d WVA) models aggregated serving"),
    ({"accelerator": "H100", "acceleratorType": "A100"}, "must name the same accelerator"),
    ({"modelName": "other/model"}, "modelID and modelName (its early llm-d WVA alias) must name the same model"),
    ({"maxBatch": 8, "maxBatchSize": 16}, "maxBatch and maxBatchSize (its early llm-d WVA alias) must agree"),
    ({"profile": {"tabulated": {"decodePoints": [{"batch": 1, "timeSeconds": 0}, {"batch": 2, "timeSeconds": 0}],
                                "prefillPoints": [{"tokens": 1, "timeSeconds": 0.1},
                                                  {"tokens": 2, "timeSeconds": 0.2}]}}},
     "decodePoints must contain a positive timeSeconds"),
])
def test_cel_rules_reject_inconsistent_specs(kube_api, kube_namespace, spec, expected):
    status, message = rejection(kube_api, kube_namespace, va("inconsistent", **spec))
    assert status == 422
    assert expected in message, message


def test_inline_profiles_are_stored_with_their_defaults(kube_api, kube_namespace):
    parametric = create(kube_api, kube_namespace, va("param", role="decode", maxBatch=64, profile={
        "parametric": {"decodeBaseSeconds": 0.012, "decodePerSeqSeconds": 1e-4, "prefillPerTokenSeconds": 2e-4}}))
    stored = parametric["spec"]["profile"]["parametric"]
    assert stored["decodeBaseSeconds"] == 0.012
    assert stored["prefillBaseSeconds"] == 0 and stored["decodePerKvTokenSeconds"] == 0
    from_configmap = create(kube_api, kube_namespace, va("cm", profile={"configMapRef": {"name": "profiles"}}))
    assert from_configmap["spec"]["profile"]["configMapRef"] == {"name": "profiles", "key": "profile.yaml"}


def test_unknown_fields_are_pruned(kube_api, kube_namespace):
    body = va("pruned")
    body["spec"]["notAField"] = 1
    obj = create(kube_api, kube_namespace, body)
    assert "notAField" not in obj["spec"]


def test_status_subresource_keeps_generation_and_spec_writes_keep_status(kube_api, kube_namespace):
    api = custom(kube_api)
    created = create(kube_api, kube_namespace, va("gen"))
    assert created["metadata"]["generation"] == 1
    status = {"status": {"currentReplicas": 2, "desiredReplicas": 3, "normalizedLoad": 0.75,
                         "observedLoad": {"arrivalRateRps": 12.5, "meanInputTokens": 900, "meanOutputTokens": 180}}}
    after_status = api.patch_namespaced_custom_object_status(GROUP, VERSION, kube_namespace, PLURAL, "gen", status)
    assert after_status["metadata"]["generation"] == 1
    assert after_status["status"]["observedLoad"]["arrivalRateRps"] == 12.5
    after_spec = api.patch_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, "gen",
                                                    {"spec": {"maxReplicas": 8}, "status": {"desiredReplicas": 99}})
    assert after_spec["metadata"]["generation"] == 2
    assert after_spec["status"]["desiredReplicas"] == 3
    assert api.get_namespaced_custom_object_status(GROUP, VERSION, kube_namespace, PLURAL, "gen")["status"][
        "desiredReplicas"] == 3


def test_conditions_must_have_the_standard_shape(kube_api, kube_namespace):
    from kubernetes.client.exceptions import ApiException

    api = custom(kube_api)
    create(kube_api, kube_namespace, va("conds"))
    good = {"type": "MetricsAvailable", "status": "False", "reason": "PrometheusUnreachable",
            "message": "GET http://prometheus:9090/api/v1/query failed", "lastTransitionTime": "2025-01-01T00:00:00Z"}
    patched = api.patch_namespaced_custom_object_status(GROUP, VERSION, kube_namespace, PLURAL, "conds",
                                                        {"status": {"conditions": [good]}})
    assert patched["status"]["conditions"][0]["reason"] == "PrometheusUnreachable"
    for broken, field in (({**good, "status": "Maybe"}, "status"), ({**good, "reason": "not camel case"}, "reason")):
        with pytest.raises(ApiException) as info:
            api.patch_namespaced_custom_object_status(GROUP, VERSION, kube_namespace, PLURAL, "conds",
                                                      {"status": {"conditions": [broken]}})
        assert info.value.status == 422
        assert f"status.conditions[0].{field}" in json.loads(info.value.body)["message"]


def test_kubectl_get_shows_the_printer_columns(emulated_cluster, kube_api, kube_namespace):
    api = custom(kube_api)
    create(kube_api, kube_namespace, va("shown", accelerator="H100", role="decode"))
    api.patch_namespaced_custom_object_status(GROUP, VERSION, kube_namespace, PLURAL, "shown", {"status": {
        "currentReplicas": 2, "desiredReplicas": 3, "normalizedLoad": 1.25, "replicaCostPerHour": 12.5,
        "conditions": [{"type": "OptimizationReady", "status": "True", "reason": "OptimizationSucceeded",
                        "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z"},
                       {"type": "Ready", "status": "True", "reason": "Ready",
                        "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z"}]}})
    out = emulated_cluster.kubectl("get", "va", "-n", kube_namespace)
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()[:2]
    expected = ["NAME"] + [c["name"].upper() for c in version_doc()["additionalPrinterColumns"]
                           if not c.get("priority")]
    assert header.split() == expected
    cells = dict(zip(expected, row.split(), strict=True))
    assert cells["TARGET"] == "shown-deploy" and cells["MODEL"] == "meta/llama-3.1-8b"
    assert cells["ACCELERATOR"] == "H100" and cells["ROLE"] == "decode"
    assert (cells["CURRENT"], cells["DESIRED"], cells["LOAD"], cells["READY"]) == ("2", "3", "1.25", "True")
    wide = emulated_cluster.kubectl("get", "vas", "-n", kube_namespace, "-o", "wide")
    assert wide.returncode == 0 and "COST" in wide.stdout.splitlines()[0]
    assert "12.5" in wide.stdout.splitlines()[1], "COST is the price the optimizer used (status), not a spec default"


def test_wva_manifest_is_accepted_after_changing_only_its_api_version(emulated_cluster, kube_api, kube_namespace):
    ours = WVA_MANIFESTS.replace("apiVersion: llmd.ai/v1alpha1", f"apiVersion: {API_VERSION}")
    changed = [(a, b) for a, b in zip(WVA_MANIFESTS.splitlines(), ours.splitlines(), strict=True) if a != b]
    assert changed and all(a.startswith("apiVersion: llmd.ai/") for a, _ in changed)
    out = emulated_cluster.kubectl("apply", "-n", kube_namespace, "--validate=strict", "-f", "-", input=ours)
    assert out.returncode == 0, out.stderr
    api = custom(kube_api)
    for manifest in yaml.safe_load_all(WVA_MANIFESTS):
        stored = api.get_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, manifest["metadata"]["name"])
        for key, value in manifest["spec"].items():
            if key == "scaleTargetRef":
                assert {k: stored["spec"][key][k] for k in value} == value
            else:
                assert stored["spec"][key] == value, key
    premium = api.get_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, "llama-70b-premium-h100")
    assert premium["spec"]["role"] == "both"
    again = emulated_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=ours)
    assert again.returncode == 0 and "unchanged" in again.stdout


def test_custom_resources_need_an_existing_namespace(kube_api):
    status, message = rejection(kube_api, f"absent-{int(time.time())}", va("orphan"))
    assert status == 404
    assert re.search(r'namespaces "absent-\d+" not found', message)

"""deploy/ and the chart's CRDs and custom resources, created on the real CRD server; the rest of
deploy/ validated against the Kubernetes schemas; the samples checked against each other.

Why the real CRD server: a sample the schema rejects, or one whose fields the server silently prunes,
would teach users something that does not work. Custom resources are therefore created for real and
read back; built-in objects the emulated core API does not serve (HPA, RBAC) are validated with
kubernetes-validate.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from chart_tools import generator as _generator

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "variant-autoscaler"
DEPLOY = REPO / "deploy"
SAMPLES = DEPLOY / "samples"
GROUP, VERSION, PLURAL = "autoscaling.variant-autoscaler.io", "v1alpha1", "variantautoscalings"
CUSTOM_GROUPS = ("monitoring.coreos.com/", "kopf.dev/", "autoscaling.variant-autoscaler.io/", "keda.sh/",
                 "apiextensions.k8s.io/")
KUBERNETES_VERSION = "1.27"






def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def sample_docs() -> list[dict]:
    kustomization = yaml.safe_load((SAMPLES / "kustomization.yaml").read_text())
    return [d for name in kustomization["resources"] for d in load(SAMPLES / name)]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def in_namespace(doc: dict, namespace: str) -> dict:
    doc = copy.deepcopy(doc)
    doc["metadata"]["namespace"] = namespace
    return doc


def _api_error_text(err) -> str:
    try:
        return json.loads(err.body).get("message", err.body)
    except (TypeError, ValueError):
        return str(err)


def _dry_run_create(api, crd: dict) -> None:
    """Create a CRD with dryRun=All: the server validates it in full (structural schema, CEL rules
    compiled) and stores nothing, so the session cluster's CRDs are never touched."""
    from kubernetes import client

    client.ApiextensionsV1Api(api).create_custom_resource_definition(crd, dry_run="All")


# ------------------------------------------------------------------------------------------------
# The real CRD server.


def test_chart_crds_are_accepted_by_the_crd_server(helm, emulated_cluster, kube_api):
    text = _generator().helm_template(helm, "--include-crds")
    crds = of_kind([d for d in yaml.safe_load_all(text) if d], "CustomResourceDefinition")
    assert len(crds) == 3
    plain = of_kind(load(DEPLOY / "manifests" / "crds.yaml"), "CustomResourceDefinition")
    assert plain == crds, "deploy/manifests/crds.yaml and the chart must carry the same CRDs"
    for crd in crds:
        # The session cluster has these CRDs already; a dry run under a fresh name is validated in full.
        body = copy.deepcopy(crd)
        plural = f"{body['spec']['names']['plural']}x"
        body["spec"]["names"] = {**body["spec"]["names"], "plural": plural,
                                 "singular": f"{body['spec']['names']['singular']}x",
                                 "kind": f"{body['spec']['names']['kind']}X"}
        body["spec"]["names"].pop("shortNames", None)
        body["spec"]["names"].pop("listKind", None)
        body["metadata"]["name"] = f"{plural}.{body['spec']['group']}"
        _dry_run_create(kube_api, body)


def test_crd_dry_run_would_catch_a_broken_crd(emulated_cluster, kube_api):
    from kubernetes.client.exceptions import ApiException

    (crd,) = [d for d in load(REPO / "crds" / "variantautoscalings.yaml") if d["kind"] == "CustomResourceDefinition"]
    body = copy.deepcopy(crd)
    body["metadata"]["name"] = f"brokens.{body['spec']['group']}"
    body["spec"]["names"] = {"plural": "brokens", "singular": "broken", "kind": "Broken"}
    body["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"][0][
        "rule"] = "self.noSuchField <= 1"
    with pytest.raises(ApiException) as err:
        _dry_run_create(kube_api, body)
    assert err.value.status == 422 and "noSuchField" in _api_error_text(err.value)


def test_sample_variantautoscalings_are_stored_as_written(emulated_cluster, kube_api, kube_namespace):
    from kubernetes import client

    custom = client.CustomObjectsApi(kube_api)
    vas = of_kind(sample_docs(), "VariantAutoscaling")
    assert len(vas) >= 6
    for va in vas:
        custom.create_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, in_namespace(va, kube_namespace))
    for va in vas:
        stored = custom.get_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, va["metadata"]["name"])
        _assert_contains(stored["spec"], va["spec"], f"{va['metadata']['name']}.spec")
        assert stored["spec"]["scaleTargetRef"]["kind"] == "Deployment", "the server applies defaults"


def _assert_contains(stored, written, where: str) -> None:
    """Every field written is stored with the same value: nothing pruned, nothing coerced."""
    if isinstance(written, dict):
        assert isinstance(stored, dict), where
        for key, value in written.items():
            assert key in stored, f"{where}.{key} was pruned by the server"
            _assert_contains(stored[key], value, f"{where}.{key}")
    else:
        assert stored == written, f"{where}: wrote {written!r}, stored {stored!r}"


def test_sample_model_servers_run_on_the_emulated_cluster(emulated_cluster, kube_api, kube_namespace):
    from kubernetes import client, utils

    docs = [d for d in sample_docs() if d["kind"] in ("Deployment", "Service")]
    for doc in docs:
        utils.create_from_dict(kube_api, in_namespace(doc, kube_namespace), namespace=kube_namespace)
    apps = client.AppsV1Api(kube_api)
    wanted = {d["metadata"]["name"]: d["spec"]["replicas"] for d in of_kind(docs, "Deployment")}
    deadline = time.monotonic() + 20
    ready: dict[str, int] = {}
    while time.monotonic() < deadline:
        ready = {d.metadata.name: d.status.ready_replicas or 0
                 for d in apps.list_namespaced_deployment(kube_namespace).items}
        if ready == wanted:
            break
        time.sleep(0.2)
    assert ready == wanted
    assert {s.metadata.name for s in client.CoreV1Api(kube_api).list_namespaced_service(kube_namespace).items} == {
        d["metadata"]["name"] for d in of_kind(docs, "Service")}


def test_a_broken_sample_would_be_caught(emulated_cluster, kube_api, kube_namespace):
    """The CRD server really judges the samples: the same sample with an invalid field is rejected."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    va = in_namespace(of_kind(sample_docs(), "VariantAutoscaling")[0], kube_namespace)
    va["spec"]["role"] = "prefill-and-decode"
    with pytest.raises(ApiException) as err:
        client.CustomObjectsApi(kube_api).create_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, va)
    assert err.value.status == 422 and "role" in _api_error_text(err.value)


def test_notes_render_for_default_and_non_default_values(helm, emulated_cluster, tmp_path):
    """NOTES.txt only renders at install time; `helm install --dry-run=client` against the emulated
    cluster renders it (RBAC off: the emulated API serves no rbac.authorization.k8s.io)."""
    def notes(*args: str) -> str:
        done = subprocess.run(
            [str(helm), "install", "va", str(CHART), "--dry-run=client", "--disable-openapi-validation",
             "--namespace", "platform", "--kubeconfig", str(emulated_cluster.kubeconfig_path),
             "--set", "rbac.create=false", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split("NOTES:", 1)[1]

    default = notes()
    assert "all namespaces" in default and "Actuation mode: direct" in default
    assert "kubectl apply --server-side -f" in default and "CRDs" in default
    assert "serviceMonitor.enabled=true" in default
    custom = notes("--set", "operator.actuationMode=metrics,replicaCount=2",
                   "--set", "operator.watchNamespaces={llm-a,llm-b}")
    assert "llm-a, llm-b" in custom and "HPA or KEDA" in custom and "one active" in custom
    assert "all namespaces" not in custom


# ------------------------------------------------------------------------------------------------
# Everything else in deploy/ against the Kubernetes schemas.


def deploy_builtin_docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name in ("kustomization.yaml", "prometheus-adapter-values.yaml", "scrape-vllm.yaml", "alerts.yaml"):
            continue
        for doc in load(path):
            if not doc["apiVersion"].startswith(CUSTOM_GROUPS):
                out.append((str(path.relative_to(REPO)), doc))
    return out


def test_deploy_builtin_objects_pass_kubernetes_validate():
    docs = deploy_builtin_docs()
    kinds = {doc["kind"] for _, doc in docs}
    assert {"HorizontalPodAutoscaler", "Deployment", "ClusterRole", "Namespace", "Service", "ConfigMap"} <= kinds
    failures = []
    for where, doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            failures.append(f"{where} {doc['kind']}/{doc['metadata']['name']}: "
                            f"{'.'.join(map(str, err.path))}: {err.message}")
    assert not failures, "\n".join(failures)


def test_kustomizations_build_with_kubectl():
    kubectl = "kubectl"
    for folder, expected in ((DEPLOY, {"CustomResourceDefinition", "Deployment", "ClusterRole", "Namespace"}),
                             (SAMPLES, {"VariantAutoscaling", "Deployment", "Service", "Namespace"})):
        try:
            done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            pytest.skip("kubectl not on PATH (it builds the kustomizations users apply with `kubectl apply -k`)")
        assert done.returncode == 0, done.stderr
        kinds = {d["kind"] for d in yaml.safe_load_all(done.stdout) if d}
        assert expected <= kinds, f"{folder}: {kinds}"


# ------------------------------------------------------------------------------------------------
# The samples against each other and against the operator.


def test_samples_are_a_two_model_heterogeneous_fleet_with_prefill_decode():
    vas = of_kind(sample_docs(), "VariantAutoscaling")
    models = {va["spec"]["modelID"] for va in vas}
    assert len(models) == 2
    for model in models:
        accelerators = {va["spec"]["accelerator"] for va in vas if va["spec"]["modelID"] == model}
        assert len(accelerators) >= 2, f"{model} has one accelerator type only"
    roles = {(va["spec"]["modelID"], va["spec"].get("role", "both")) for va in vas}
    assert any((m, "prefill") in roles and (m, "decode") in roles for m in models), "no P/D pair"


def test_samples_fit_the_default_settings_and_each_other(helm):
    from variant_autoscaler.settings import architecture_of

    docs = sample_docs()
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    chart_accelerators = {a["name"] for a in yaml.safe_load((CHART / "values.yaml").read_text())["accelerators"]}
    for va in of_kind(docs, "VariantAutoscaling"):
        spec, name = va["spec"], va["metadata"]["name"]
        target = deployments.get(spec["scaleTargetRef"]["name"])
        assert target is not None, f"{name}: no Deployment {spec['scaleTargetRef']['name']}"
        assert target["metadata"]["namespace"] == va["metadata"]["namespace"]
        assert spec["accelerator"] in chart_accelerators, f"{name}: {spec['accelerator']} not in the chart's inventory"
        assert architecture_of(spec["modelID"]) is not None, f"{name}: the operator knows no facts of {spec['modelID']}"
        assert spec.get("minReplicas", 1) <= target["spec"]["replicas"] <= spec.get("maxReplicas", 10**6)


def test_sample_model_server_arguments_are_accepted_by_the_cli():
    from variant_autoscaler.cli import build_parser
    from variant_autoscaler_testbed.commands.emulate_server import build_config

    parser = build_parser()
    for deployment in of_kind(sample_docs(), "Deployment"):
        pod = deployment["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        args = parser.parse_args(container["args"])
        config = build_config(args)
        va = next(v for v in of_kind(sample_docs(), "VariantAutoscaling")
                  if v["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"])
        assert config.model == va["spec"]["modelID"]
        assert args.accelerator == va["spec"]["accelerator"] and args.tp == va["spec"]["acceleratorCount"]
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
        assert config.port == port == int(pod["metadata"]["annotations"]["prometheus.io/port"])
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert pod["metadata"]["labels"]["variant-autoscaler.io/variant"] == deployment["metadata"]["name"]

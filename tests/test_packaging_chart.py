"""The Helm chart, rendered and linted by the real helm binary, and the files generated from it.

Why the real binary: template mistakes (a wrong indent, a nil value, a schema the values break) show
only when helm itself renders; and why kubernetes-validate: a rendered object helm is happy with can
still be one the API server rejects (a string where an integer belongs, a misspelt field).
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from chart_tools import generator as _generator

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "variant-autoscaler"
# Oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest schema available.
KUBERNETES_VERSIONS = ("1.27", kubernetes_validate.latest_version())
CUSTOM_GROUPS = ("monitoring.coreos.com/", "kopf.dev/", "autoscaling.variant-autoscaler.io/")

NON_DEFAULT = {
    "replicaCount": 2,
    "image": {"repository": "registry.example.com/platform/variant-autoscaler", "tag": "9.9.9",
              "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry"}],
    "operator": {
        "intervalSeconds": 15, "actuationMode": "metrics", "watchNamespaces": ["llm-a", "llm-b"],
        "scaleDownStabilizationSeconds": 600, "maxChangePerCycle": 2, "changePenaltyPerReplica": 0.5,
        "discoverInventory": True, "verbose": True,
        "defaultSLO": {"ttftSeconds": 0.4, "itlSeconds": 0.04, "percentile": 95},
        "models": [{"name": "meta-llama/Llama-3.1-8B-Instruct", "architecture": "Llama-3.1-8B"}],
        "extraSettings": {"default_max_batch": 64},
    },
    "prometheus": {"url": "https://thanos-query.monitoring.svc:10902", "timeoutSeconds": 10,
                   "tls": {"verify": True, "caSecret": {"name": "prometheus-ca", "key": "ca.pem"}},
                   "bearerToken": {"secretName": "prometheus-token", "secretKey": "token"},
                   "headers": {"X-Scope-OrgID": "tenant-a"}},
    "accelerators": [{"name": "H100", "costPerHour": 3.5},
                     {"name": "MI300X", "memoryGB": 192, "costPerHour": 3.0, "available": 8,
                      "productLabels": ["AMD-Instinct-MI300X"]}],
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "dashboard": {"enabled": True, "namespace": "grafana"},
    "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "platform", "effect": "NoSchedule"}],
}
SA_TOKEN = {"prometheus": {"bearerToken": {"useServiceAccountToken": True}},
            "operator": {"actuationMode": "direct"}}
VALUE_SETS = {"default": {}, "non-default": NON_DEFAULT, "sa-token": SA_TOKEN}






def _values_file(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def render(helm: Path, tmp_path: Path, values: dict, *extra: str) -> list[dict]:
    text = _generator().helm_template(helm, "-f", str(_values_file(tmp_path, values)), *extra,
                                      release="va", namespace="platform")
    return [d for d in yaml.safe_load_all(text) if d]


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def settings_of(docs: list[dict]):
    from variant_autoscaler.settings import settings_from_configmap

    (cm,) = find(docs, "ConfigMap", "va-variant-autoscaler-settings")
    return settings_from_configmap(cm)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict_passes(helm, tmp_path, name):
    done = subprocess.run([str(helm), "lint", "--strict", str(CHART), "-f", str(_values_file(tmp_path, VALUE_SETS[name]))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize(("values", "expected"), [
    ({"operator": {"actuationMode": "sideways"}}, "operator.actuationMode"),
    ({"operator": {"intervalSecond": 10}}, "intervalSecond"),
    ({"prometheus": {"url": "prometheus:9090"}}, "prometheus.url"),
    ({"accelerators": [{"name": "H100"}]}, "costPerHour"),
    ({"operator": {"watchNamespaces": ["Not_A_Namespace"]}}, "operator.watchNamespaces"),
    ({"operator": {"annotationMode": True}}, "operator.annotationMode needs operator.actuationMode=metrics"),
])
def test_bad_values_fail_with_the_key_named(helm, tmp_path, values, expected):
    done = subprocess.run([str(helm), "template", "va", str(CHART), "-f", str(_values_file(tmp_path, values))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert expected in done.stderr, done.stderr


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_builtin_resources_pass_kubernetes_validate(helm, tmp_path, name):
    docs = render(helm, tmp_path, VALUE_SETS[name])
    builtin = [d for d in docs if not d["apiVersion"].startswith(CUSTOM_GROUPS)]
    assert {"Deployment", "ServiceAccount", "Service", "ConfigMap"} <= {d["kind"] for d in builtin}
    failures = []
    for version in KUBERNETES_VERSIONS:
        for doc in builtin:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                failures.append(f"{version} {doc['kind']}/{doc['metadata']['name']}: "
                                f"{'.'.join(map(str, err.path))}: {err.message}")
    assert not failures, "\n".join(failures)


def test_kubernetes_validate_would_catch_a_broken_deployment(helm, tmp_path):
    """The check above is not vacuous: the same validation rejects a mistyped field of our Deployment."""
    (deployment,) = find(render(helm, tmp_path, {}), "Deployment")
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_operator_pod_is_hardened_and_probed(helm, tmp_path, name):
    docs = render(helm, tmp_path, VALUE_SETS[name])
    (deployment,) = find(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ports, f"{probe} names an undeclared port"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts, "a read-only root filesystem needs a writable /tmp"
    assert pod["serviceAccountName"] == find(docs, "ServiceAccount")[0]["metadata"]["name"]
    (service,) = find(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics" and "metrics" in ports
    labels = pod.get("labels") or deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    # listeners on the pod IP only (the operator binds $POD_IP by default), never all interfaces
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert not [a for a in container["args"] if "0.0.0.0" in a]
    assert "--liveness=http://$(POD_IP):" in " ".join(container["args"])


def test_image_defaults_to_the_app_version_and_follows_values(helm, tmp_path):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (default,) = find(render(helm, tmp_path, {}), "Deployment")
    assert default["spec"]["template"]["spec"]["containers"][0]["image"] == f"variant-autoscaler:{chart['appVersion']}"
    (custom,) = find(render(helm, tmp_path, NON_DEFAULT), "Deployment")
    pod = custom["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example.com/platform/variant-autoscaler:9.9.9"
    assert pod["containers"][0]["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert custom["spec"]["replicas"] == 2


def test_chart_version_matches_the_python_package():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    assert chart["apiVersion"] == "v2" and chart["type"] == "application"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_settings_configmap_is_read_by_the_operators_own_parser(helm, tmp_path, name):
    docs = render(helm, tmp_path, VALUE_SETS[name])
    settings = settings_of(docs)
    values = VALUE_SETS[name]
    op = values.get("operator", {})
    assert settings.interval_s == op.get("intervalSeconds", 30)
    assert settings.actuation_mode == op.get("actuationMode", "direct")
    assert settings.watched_namespaces == op.get("watchNamespaces", [])
    expected_accs = values.get("accelerators") or yaml.safe_load((CHART / "values.yaml").read_text())["accelerators"]
    assert [(a.name, a.cost_per_hour, a.available) for a in settings.accelerators] == [
        (a["name"], a["costPerHour"], a.get("available")) for a in expected_accs]


def test_non_default_settings_reach_the_operator(helm, tmp_path):
    docs = render(helm, tmp_path, NON_DEFAULT)
    settings = settings_of(docs)
    assert settings.scale_down_window_s == 600 and settings.max_change_per_cycle == 2
    assert settings.change_penalty == 0.5 and settings.discover_inventory is True
    assert settings.default_slo is not None and settings.default_slo.percentile == 95
    assert settings.models[0].architecture == "Llama-3.1-8B"
    assert settings.default_max_batch == 64
    assert settings.prometheus.url == "https://thanos-query.monitoring.svc:10902"
    assert settings.prometheus.headers == {"X-Scope-OrgID": "tenant-a"}
    mi300 = settings.accelerator("MI300X")
    assert mi300.memory_gb == 192 and mi300.product_labels == ["AMD-Instinct-MI300X"]
    # The files the settings name are the files the pod mounts.
    (deployment,) = find(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = {}
    for m in pod["containers"][0]["volumeMounts"]:
        volume = volumes[m["name"]]
        for item in (volume.get("secret") or {}).get("items", []):
            mounted[f"{m['mountPath']}/{item['path']}"] = (volume["secret"]["secretName"], item["key"])
    assert mounted[str(settings.prometheus.bearer_token_file)] == ("prometheus-token", "token")
    assert mounted[str(settings.prometheus.ca_file)] == ("prometheus-ca", "ca.pem")


def test_service_account_token_for_prometheus_is_a_projected_volume(helm, tmp_path):
    docs = render(helm, tmp_path, SA_TOKEN)
    settings = settings_of(docs)
    (deployment,) = find(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    projected = [v for v in pod["volumes"] if "projected" in v]
    assert len(projected) == 1
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == projected[0]["name"])
    path = projected[0]["projected"]["sources"][0]["serviceAccountToken"]["path"]
    assert str(settings.prometheus.bearer_token_file) == f"{mount['mountPath']}/{path}"


def test_monitoring_objects_follow_their_toggles(helm, tmp_path):
    off = render(helm, tmp_path, {})
    assert not find(off, "ServiceMonitor") and not find(off, "PrometheusRule")
    assert not find(off, "ConfigMap", "va-variant-autoscaler-dashboard")
    on = render(helm, tmp_path, NON_DEFAULT)
    (monitor,) = find(on, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    (service,) = find(on, "Service")
    assert all(service["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    (rule,) = find(on, "PrometheusRule")
    assert {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]} >= {
        "VariantAutoscalerOptimizationStalled", "VariantAutoscalerMetricsMissing",
        "VariantAutoscalerInventoryExhausted", "VariantAutoscalerScalingThrash"}
    (dashboard,) = find(on, "ConfigMap", "va-variant-autoscaler-dashboard")
    assert dashboard["metadata"]["namespace"] == "grafana"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["variant-autoscaler.json"] == (CHART / "files" / "dashboard.json").read_text().rstrip("\n")


def test_watched_namespaces_get_roles_there_and_nothing_cluster_wide_but_nodes(helm, tmp_path):
    docs = render(helm, tmp_path, NON_DEFAULT)
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in find(docs, "Role")}
    assert roles == {("llm-a", "va-variant-autoscaler"), ("llm-b", "va-variant-autoscaler"),
                     ("platform", "va-variant-autoscaler-settings")}
    bindings = find(docs, "RoleBinding")
    assert {(b["metadata"]["namespace"], b["roleRef"]["name"]) for b in bindings} == roles
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "va-variant-autoscaler", "namespace": "platform"}]
    (settings_role,) = [r for r in find(docs, "Role") if r["metadata"]["namespace"] == "platform"]
    assert settings_role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                                       "resourceNames": ["va-variant-autoscaler-settings"], "verbs": ["get"]}]
    (cluster_role,) = find(docs, "ClusterRole")
    resources = {res for rule in cluster_role["rules"] for res in rule["resources"]}
    assert resources == {"nodes"}, f"namespaced mode grants {resources} cluster-wide (only discoverInventory's nodes)"
    assert all(set(rule["verbs"]) == {"list"} for rule in cluster_role["rules"])
    plain = render(helm, tmp_path, {"operator": {"watchNamespaces": ["llm-a"]}})
    assert not find(plain, "ClusterRole") and not find(plain, "ClusterRoleBinding"), (
        "watchNamespaces without discoverInventory: nothing cluster-wide")
    assert {r["metadata"]["namespace"] for r in find(plain, "Role")} == {"llm-a", "platform"}
    (deployment,) = find(docs, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace=")] == ["--namespace=llm-a", "--namespace=llm-b"]


def test_all_namespaces_mode_uses_one_cluster_role(helm, tmp_path):
    docs = render(helm, tmp_path, {})
    assert not find(docs, "Role") and not find(docs, "RoleBinding")
    (role,) = find(docs, "ClusterRole")
    (binding,) = find(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    resources = {res for rule in role["rules"] for res in rule["resources"]}
    assert "clusterkopfpeerings" in resources and "kopfpeerings" not in resources
    assert "nodes" not in resources, "nodes only with operator.discoverInventory"
    assert not find(docs, "ClusterKopfPeering") and not find(docs, "KopfPeering"), "the operator creates peering"


def test_statefulset_targets_are_an_explicit_opt_in(helm, tmp_path):
    def resources(values):
        (role,) = find(render(helm, tmp_path, values), "ClusterRole")
        return {res for rule in role["rules"] for res in rule["resources"]}
    assert not {"statefulsets", "statefulsets/scale"} & resources({})
    assert {"statefulsets", "statefulsets/scale"} <= resources({"rbac": {"statefulSets": True}})


def test_annotation_mode_reaches_the_settings_and_lists_scaled_objects_only_when_on(helm, tmp_path):
    on = render(helm, tmp_path, {"operator": {"annotationMode": True, "actuationMode": "metrics"}})
    assert settings_of(on).annotation_mode is True
    (role,) = find(on, "ClusterRole")
    assert {"apiGroups": ["keda.sh"], "resources": ["scaledobjects"], "verbs": ["list"]} in role["rules"]
    assert {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "verbs": ["list"]} \
        in role["rules"]
    (off,) = find(render(helm, tmp_path, {"operator": {"actuationMode": "metrics"}}), "ClusterRole")
    assert not [r for r in off["rules"] if {"keda.sh", "autoscaling"} & set(r["apiGroups"])]
    assert settings_of(render(helm, tmp_path, {})).annotation_mode is False


def test_rbac_can_be_left_to_the_cluster_admin(helm, tmp_path):
    docs = render(helm, tmp_path, {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}})
    assert not [d for d in docs if d["apiVersion"].startswith("rbac.authorization.k8s.io/")]
    assert not find(docs, "ServiceAccount")
    (deployment,) = find(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


def test_chart_crds_are_identical_to_crds_dir():
    sources = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    copies = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert copies == sources, "run `make manifests`"
    for name in sources:
        assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"charts/variant-autoscaler/crds/{name} differs from crds/{name}: run `make manifests`")


def test_helm_template_include_crds_renders_the_crds(helm, tmp_path):
    docs = render(helm, tmp_path, {}, "--include-crds")
    names = {d["metadata"]["name"] for d in find(docs, "CustomResourceDefinition")}
    assert names == {"variantautoscalings.autoscaling.variant-autoscaler.io", "clusterkopfpeerings.kopf.dev",
                     "kopfpeerings.kopf.dev"}


def test_generated_files_are_up_to_date(helm):
    gen = _generator()
    rendered = gen.render_all(helm)
    stale = [str(p.relative_to(REPO)) for p in gen.stale_files(rendered)]
    assert not stale, f"stale generated files (run `make manifests`): {stale}"
    assert (REPO / "deploy" / "grafana" / "variant-autoscaler-dashboard.json").read_bytes() == (
        CHART / "files" / "dashboard.json").read_bytes()


def _leaf_keys(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        opaque = path in ("resources", "podSecurityContext", "securityContext", "dashboard.labels")
        keys += _leaf_keys(value, path) if isinstance(value, dict) and value and not opaque else [path]
    return keys


def test_every_value_is_documented_in_the_chart_readme():
    rows = [line for line in (CHART / "README.md").read_text().splitlines() if line.startswith("| `")]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    undocumented = []
    for path in _leaf_keys(values):
        parent, _, last = path.rpartition(".")
        if not any(f"`{path}`" in row or (parent and f"`{parent}." in row and f"`.{last}`" in row) for row in rows):
            undocumented.append(path)
    assert not undocumented, f"values missing from charts/variant-autoscaler/README.md: {undocumented}"
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]) >= set(values), "every top-level value has a schema"

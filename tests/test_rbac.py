"""The chart's RBAC grants exactly the API calls the operator makes: nothing missing, nothing extra.

How the list of calls is derived: the operator runs for real (kopf plus the control loop, `variant-
autoscaler run` with the arguments and settings ConfigMap the chart renders) against an emulated
cluster of its own, with real Prometheus scraping emulated vLLM pods and real load, until it has
scaled one variant up and another down (the paths that write the scale subresource and annotate
pods). The emulated core API records every request; those made by the operator (user agents
`kopf/...` and `variant-autoscaler/...`) become (apiGroup, resource, verb) triples and are compared
with the rendered ClusterRole exactly. A second, shorter run in watched-namespaces mode checks that
every call is authorized by that mode's Roles and ClusterRole, and that its mode-specific rules are
all used.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from chart_tools import generator as _generator

REPO = Path(__file__).resolve().parents[1]
RELEASE, RELEASE_NAMESPACE = "va", "platform"
GROUP, VERSION, PLURAL = "autoscaling.variant-autoscaler.io", "v1alpha1", "variantautoscalings"
OPERATOR_AGENTS = ("kopf/", "variant-autoscaler/")
SLOW_PROFILE = {"decodeBaseSeconds": 0.04, "decodePerSeqSeconds": 0.004, "prefillPerTokenSeconds": 0.0002}
SERVER_PROFILE = {"kind": "parametric", "decode_base_s": 0.04, "decode_per_seq_s": 0.004,
                  "prefill_per_token_s": 0.0002}
MODEL_IDLE, MODEL_BUSY = "tiny/idle-chat", "tiny/busy-chat"




@dataclass(frozen=True)
class Call:
    """One API request as RBAC sees it."""

    group: str
    resource: str
    verb: str
    namespace: str | None
    name: str | None

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.group, self.resource, self.verb)


def rule_triples(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def allows(rules: list[dict], call: Call) -> bool:
    for rule in rules:
        if call.group in rule["apiGroups"] and call.resource in rule["resources"] and call.verb in rule["verbs"]:
            names = rule.get("resourceNames")
            if not names or call.name in names:
                return True
    return False


# ------------------------------------------------------------------------------------------------
# The emulated world the operator runs in.


class World:
    """An emulated cluster of this module's own (the operator must see no other test's objects), real
    Prometheus scraping one emulated vLLM server per pod, and a gateway to send load through."""

    def __init__(self):
        from variant_autoscaler_testbed.cluster import EmulatedCluster
        from variant_autoscaler_testbed.model_pods import ModelGateway, ModelPods
        from variant_autoscaler_testbed.prometheus import PrometheusServer

        self.cluster = EmulatedCluster(namespaces=[RELEASE_NAMESPACE], start_delay_s=0.2)
        self.cluster.__enter__()
        try:
            self.prometheus = PrometheusServer([]).start()
            self.pods = ModelPods(self.cluster.kubelet, self.prometheus).install()
            self.gateway = self.cluster.call(ModelGateway(self.pods).start)
            self.api = self.cluster.api_client()
        except BaseException:
            self.cluster.__exit__(None, None, None)
            raise

    def close(self) -> None:
        try:
            self.cluster.call(self.gateway.stop)
            self.cluster.call(self.pods.stop_all)
            self.prometheus.stop()
        finally:
            self.cluster.__exit__(None, None, None)

    def namespace(self) -> str:
        from kubernetes import client

        name = f"rbac-{uuid.uuid4().hex[:8]}"
        client.CoreV1Api(self.api).create_namespace({"metadata": {"name": name}})
        return name

    def deploy(self, namespace: str, name: str, model: str, replicas: int) -> None:
        from kubernetes import client
        from variant_autoscaler_testbed.model_pods import model_server_annotation

        annotations = model_server_annotation({"model": model, "profile": SERVER_PROFILE, "max_batch": 32})
        client.AppsV1Api(self.api).create_namespaced_deployment(namespace, {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}, "annotations": annotations},
                                  "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]}}}})

    def autoscale(self, namespace: str, name: str, model: str, *, profile: dict) -> None:
        from kubernetes import client

        client.CustomObjectsApi(self.api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "VariantAutoscaling", "metadata": {"name": name},
            "spec": {"scaleTargetRef": {"name": name}, "modelID": model, "accelerator": "L4", "minReplicas": 1,
                     "maxBatch": 32, "profile": profile, "slo": {"ttftSeconds": 0.6, "itlSeconds": 0.09}}})

    def replicas(self, namespace: str, name: str) -> int:
        from kubernetes import client

        return client.AppsV1Api(self.api).read_namespaced_deployment(name, namespace).spec.replicas

    def load(self, model: str, rate_rps: float, duration_s: float):
        from variant_autoscaler_testbed.load import LengthClass, LoadSpec, RatePhase, generate_load

        spec = LoadSpec(targets=[self.gateway.url], model=model, phases=[RatePhase(duration_s=duration_s,
                                                                                    rate_rps=rate_rps)],
                        mix=[LengthClass(prompt_tokens=100, max_tokens=40)], max_duration_s=duration_s + 5,
                        drain_timeout_s=1, request_timeout_s=5, max_in_flight=64)
        return asyncio.run_coroutine_threadsafe(generate_load(spec), self.cluster._loop)

    def settings_read(self) -> bool:
        """The operator has read its settings ConfigMap once (its first cycle)."""
        return any(c.resource == "configmaps" and c.namespace == RELEASE_NAMESPACE for c in self.operator_calls())

    def operator_calls(self) -> list[Call]:
        return [Call(group=r.group or "", resource=r.resource + (f"/{r.subresource}" if r.subresource else ""),
                     verb=r.verb, namespace=r.namespace, name=r.name)
                for r in self.cluster.core.requests
                if r.user_agent.startswith(OPERATOR_AGENTS) and r.resource]


@pytest.fixture(scope="module")
def world():
    from variant_autoscaler_testbed.crd_server import SubstrateUnavailable
    from variant_autoscaler_testbed.prometheus import PrometheusNotInstalled

    try:
        w = World()
    except SubstrateUnavailable as err:
        pytest.skip(f"../shared not present: {err}")
    except PrometheusNotInstalled as err:
        pytest.skip(str(err))
    try:
        yield w
    finally:
        w.close()




def chart_values(world: World, **over) -> dict:
    """Chart values a platform team would set, with timings short enough for a test."""
    values = {
        "peering": {"name": f"rbac-{uuid.uuid4().hex[:8]}"},
        "prometheus": {"url": world.prometheus.url},
        "accelerators": [{"name": "L4", "costPerHour": 1.0, "available": 20}],
        "operator": {
            "intervalSeconds": 1, "rateWindowSeconds": 6, "stalenessThresholdSeconds": 10,
            "scaleDownStabilizationSeconds": 0, "discoverInventory": True,
            "models": [{"name": m, "weight_gb": 2.0, "kv_bytes_per_token": 131072.0} for m in (MODEL_IDLE, MODEL_BUSY)],
            "extraSettings": {"api_backoff_s": 0.05},
        },
    }
    for key, value in over.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return values


def render(helm: Path, tmp_path: Path, values: dict) -> list[dict]:
    path = tmp_path / f"values-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(values))
    text = _generator().helm_template(helm, "-f", str(path), release=RELEASE, namespace=RELEASE_NAMESPACE)
    return [d for d in yaml.safe_load_all(text) if d]


def kind(docs: list[dict], name: str) -> list[dict]:
    return [d for d in docs if d["kind"] == name]


class ChartOperator:
    """`variant-autoscaler run` as the chart's Deployment starts it: its args through the real CLI
    parser, its settings ConfigMap created in the release namespace; only the kubeconfig and the
    listening ports differ (a pod would use in-cluster config and its own network namespace)."""

    def __init__(self, world: World, docs: list[dict]):
        from kubernetes import client
        from variant_autoscaler.cli import build_parser
        from variant_autoscaler.commands.run import options_from_args

        (configmap,) = [d for d in kind(docs, "ConfigMap") if d["data"].get("settings.yaml")]
        core = client.CoreV1Api(world.api)
        name = configmap["metadata"]["name"]
        if any(c.metadata.name == name for c in core.list_namespaced_config_map(RELEASE_NAMESPACE).items):
            core.delete_namespaced_config_map(name, RELEASE_NAMESPACE)
        core.create_namespaced_config_map(RELEASE_NAMESPACE, configmap)
        (deployment,) = kind(docs, "Deployment")
        args = list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
        parsed = build_parser().parse_args(
            [*args, f"--kubeconfig={world.cluster.kubeconfig_path}", "--metrics-host=127.0.0.1", "--metrics-port=0"])
        assert parsed.command == "run" and parsed.liveness
        self.options = options_from_args(parsed).model_copy(update={"peering_grace_s": 0.5})
        self.stop_flag, self.ready_flag = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="chart-operator")

    def _main(self) -> None:
        from variant_autoscaler.commands.run import run_operator

        try:
            asyncio.run(run_operator(self.options, stop_flag=self.stop_flag, ready_flag=self.ready_flag,
                                     liveness="http://127.0.0.1:0/healthz"))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def __enter__(self) -> ChartOperator:
        self._thread.start()
        assert self.ready_flag.wait(30), f"operator did not start: {self.error!r}"
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        self._thread.join(timeout=30)


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout_s:g} s: {what}")


# ------------------------------------------------------------------------------------------------


def test_cluster_role_equals_the_calls_of_a_scaling_operator(world, helm, tmp_path):
    from kubernetes import client

    ns = world.namespace()
    client.CoreV1Api(world.api).create_namespaced_config_map(ns, {
        "metadata": {"name": "idle-profile"},
        "data": {"profile.yaml": yaml.safe_dump({"parametric": SLOW_PROFILE})}})
    world.deploy(ns, "idle", MODEL_IDLE, 3)
    world.deploy(ns, "busy", MODEL_BUSY, 1)
    docs = render(helm, tmp_path, chart_values(world))
    world.cluster.core.clear_requests()
    load = world.load(MODEL_BUSY, rate_rps=8.0, duration_s=30)
    try:
        with ChartOperator(world, docs):
            # Variants appear once the operator runs on the chart's settings (its first cycle reads
            # them): a new VariantAutoscaling wakes the loop, as it would on a live cluster.
            wait_until(world.settings_read, 30, "the operator reads its settings ConfigMap")
            world.autoscale(ns, "idle", MODEL_IDLE, profile={"configMapRef": {"name": "idle-profile"}})
            world.autoscale(ns, "busy", MODEL_BUSY, profile={"parametric": SLOW_PROFILE})
            wait_until(lambda: world.replicas(ns, "busy") > 1 and world.replicas(ns, "idle") < 3, 30,
                       "the operator scales the busy variant up and the idle one down")
            time.sleep(2)  # one more cycle: status and Events of the moves
    finally:
        load.cancel()
    calls = world.operator_calls()
    used = {c.triple for c in calls}
    (cluster_role,) = kind(docs, "ClusterRole")
    granted = rule_triples(cluster_role["rules"])
    assert not used - granted, f"calls the ClusterRole does not allow: {sorted(used - granted)}"
    assert not granted - used, f"rules the operator never used: {sorted(granted - used)}"
    assert ("apps", "deployments/scale", "update") in used and ("", "pods", "patch") in used
    pods = client.CoreV1Api(world.api).list_namespaced_pod(ns, label_selector="app=idle").items
    assert any("controller.kubernetes.io/pod-deletion-cost" in (p.metadata.annotations or {}) for p in pods)


def test_watched_namespaces_mode_is_authorized_and_uses_its_own_rules(world, helm, tmp_path):
    ns = world.namespace()
    world.deploy(ns, "busy", MODEL_BUSY, 1)
    docs = render(helm, tmp_path, chart_values(world, operator={"watchNamespaces": [ns]}))
    world.cluster.core.clear_requests()
    with ChartOperator(world, docs):
        wait_until(world.settings_read, 30, "the operator reads its settings ConfigMap")
        world.autoscale(ns, "busy", MODEL_BUSY, profile={"parametric": SLOW_PROFILE})
        wait_until(lambda: any(c.resource == "variantautoscalings/status" for c in world.operator_calls()), 30,
                   "a cycle writes the variant's status")
    calls = world.operator_calls()
    roles = {r["metadata"]["namespace"]: r for r in kind(docs, "Role") if r["metadata"]["name"] == f"{RELEASE}-variant-autoscaler"}
    (settings_role,) = [r for r in kind(docs, "Role") if r["metadata"]["name"].endswith("-settings")]
    (cluster_role,) = kind(docs, "ClusterRole")
    denied = []
    for call in calls:
        rules = list(cluster_role["rules"])  # bound by a ClusterRoleBinding: valid in every namespace
        if call.namespace in roles:
            rules += roles[call.namespace]["rules"]
        if call.namespace == RELEASE_NAMESPACE:
            rules += settings_role["rules"]
        if not allows(rules, call):
            denied.append(call)
    assert not denied, f"calls no rule allows: {denied}"
    assert set(roles) == {ns}
    used = {c.triple for c in calls}
    assert not rule_triples(cluster_role["rules"]) - used, "cluster-wide rules of this mode that nothing used"
    assert not rule_triples(settings_role["rules"]) - used
    peering = {t for t in rule_triples(roles[ns]["rules"]) if t[0] == "kopf.dev"}
    assert peering and not peering - used, f"peering rules never used: {sorted(peering - used)}"
    assert not any(c.namespace is None and c.resource in ("variantautoscalings", "pods", "deployments")
                   for c in calls), "watched-namespaces mode must not list namespaced resources cluster-wide"


def test_annotation_mode_is_authorized_and_uses_its_rules(world, helm, tmp_path):
    """operator.annotationMode (metrics mode, watched namespace): listing ScaledObjects and HPAs and
    posting Events on them are all allowed by the rendered rules, and those rules are used."""
    from kubernetes import client

    so_crd = yaml.safe_load((REPO / "tests" / "keda" / "scaledobjects.keda.sh.yaml").read_text())
    world.cluster.call(world.cluster.install_crds, [so_crd])
    ns = world.namespace()
    world.deploy(ns, "busy", MODEL_BUSY, 1)
    client.CustomObjectsApi(world.api).create_namespaced_custom_object("keda.sh", "v1alpha1", ns, "scaledobjects", {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": "busy-so", "annotations": {"llm-d.ai/managed": "true"}},  # no model-id: an Event
        "spec": {"scaleTargetRef": {"name": "busy"}, "triggers": [{"type": "prometheus", "metadata": {
            "query": 'max(variant_autoscaler_desired_replicas{variant="busy-so"})', "threshold": "1"}}]}})
    docs = render(helm, tmp_path, chart_values(world, operator={"watchNamespaces": [ns], "actuationMode": "metrics",
                                                                "annotationMode": True}))
    world.cluster.core.clear_requests()
    with ChartOperator(world, docs):
        wait_until(lambda: any(c.resource == "events" and c.namespace == ns for c in world.operator_calls()), 30,
                   "the InvalidAnnotations Event on the ScaledObject")
    calls = world.operator_calls()
    roles = {r["metadata"]["namespace"]: r for r in kind(docs, "Role")
             if r["metadata"]["name"] == f"{RELEASE}-variant-autoscaler"}
    (settings_role,) = [r for r in kind(docs, "Role") if r["metadata"]["name"].endswith("-settings")]
    (cluster_role,) = kind(docs, "ClusterRole")
    denied = [c for c in calls if not allows(
        [*cluster_role["rules"], *(roles[c.namespace]["rules"] if c.namespace in roles else []),
         *(settings_role["rules"] if c.namespace == RELEASE_NAMESPACE else [])], c)]
    assert not denied, f"calls no rule allows: {denied}"
    used = {c.triple for c in calls}
    for triple in (("keda.sh", "scaledobjects", "list"), ("autoscaling", "horizontalpodautoscalers", "list")):
        assert triple in rule_triples(roles[ns]["rules"]) and triple in used, triple
    events = client.CoreV1Api(world.api).list_namespaced_event(ns).items
    assert any(e.reason == "InvalidAnnotations" and e.involved_object.kind == "ScaledObject" for e in events)

"""The emulated cluster behaves like Kubernetes for the real `kubernetes` client, kubectl and kopf:
API semantics of the core server, the one-URL proxy to the real CRD server, the kubelet's pods and
Deployment status, and kopf's whole lifecycle including peering."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
import uuid

import aiohttp
import pytest
from variant_autoscaler_testbed.core_api import CoreApi, Fault, ObjectStore
from variant_autoscaler_testbed.kubelet import (
    DELETION_COST_ANNOTATION,
    PORT_ANNOTATION,
    START_DELAY_ANNOTATION,
)

GROUP, VERSION, PLURAL = "autoscaling.variant-autoscaler.io", "v1alpha1", "variantautoscalings"


def wait_until(predicate, what: str, timeout_s: float = 15.0, interval_s: float = 0.05):
    """Poll until `predicate()` is truthy (bounded); the timeout is a failure bound, not a measurement."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


def apis(kube_api):
    from kubernetes import client

    return client.CoreV1Api(kube_api), client.AppsV1Api(kube_api), client.CustomObjectsApi(kube_api)


def deployment(name: str, replicas: int = 0, annotations: dict | None = None):
    from kubernetes import client

    labels = {"app": name, "tier": "model"}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels={"app": name}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels, annotations=annotations or {}),
                spec=client.V1PodSpec(containers=[client.V1Container(name="vllm", image="vllm/vllm-openai:v0")]),
            ),
        ),
    )


def ready_pods(core, namespace: str, app: str) -> list:
    pods = core.list_namespaced_pod(namespace, label_selector=f"app={app}").items
    return [p for p in pods if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]


def api_error(call, *args, **kwargs) -> tuple[int, dict]:
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as info:
        call(*args, **kwargs)
    return info.value.status, json.loads(info.value.body)


# ---------------------------------------------------------------------------------------------
# Discovery and basic semantics.


def test_version_and_discovery_merge_core_and_crd_groups(emulated_cluster, kube_api):
    from kubernetes import client

    assert client.VersionApi(kube_api).get_code().major == "1"
    groups = {g.name: g for g in client.ApisApi(kube_api).get_api_versions().groups}
    assert {"apps", "coordination.k8s.io", GROUP, "kopf.dev", "apiextensions.k8s.io"} <= set(groups)
    assert groups["apps"].preferred_version.group_version == "apps/v1"
    core_resources = {r.name for r in client.CoreV1Api(kube_api).get_api_resources().resources}
    assert {"pods", "pods/status", "configmaps", "events", "namespaces"} <= core_resources
    scale = next(r for r in client.AppsV1Api(kube_api).get_api_resources().resources if r.name == "deployments/scale")
    assert (scale.group, scale.version, scale.kind) == ("autoscaling", "v1", "Scale")
    listed = emulated_cluster.kubectl("api-resources", "--no-headers")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert "va" in rows["variantautoscalings"].split()[1].split(",")
    assert "deploy" in rows["deployments"].split()[1].split(",")


def test_create_answers_201_with_server_set_fields_and_409_on_duplicates(kube_api, kube_namespace):
    from kubernetes import client

    core, _, _ = apis(kube_api)
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="settings"), data={"interval": "30s"})
    created, status, _ = core.create_namespaced_config_map_with_http_info(kube_namespace, body)
    assert status == 201
    assert created.metadata.uid and created.metadata.resource_version and created.metadata.creation_timestamp
    assert created.metadata.namespace == kube_namespace
    code, error = api_error(core.create_namespaced_config_map, kube_namespace, body)
    assert code == 409 and error["reason"] == "AlreadyExists" and error["kind"] == "Status"
    code, error = api_error(core.read_namespaced_config_map, "absent", kube_namespace)
    assert code == 404 and error["reason"] == "NotFound"
    assert error["message"] == 'configmaps "absent" not found'
    code, error = api_error(core.create_namespaced_config_map, f"no-such-ns-{uuid.uuid4().hex[:6]}", body)
    assert code == 404 and "namespaces" in error["message"]


def test_update_with_a_stale_resource_version_conflicts(kube_api, kube_namespace):
    from kubernetes import client

    core, _, _ = apis(kube_api)
    core.create_namespaced_config_map(kube_namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="cm"), data={"a": "1"}))
    first = core.read_namespaced_config_map("cm", kube_namespace)
    second = core.read_namespaced_config_map("cm", kube_namespace)
    first.data["a"] = "2"
    updated = core.replace_namespaced_config_map("cm", kube_namespace, first)
    assert int(updated.metadata.resource_version) > int(second.metadata.resource_version)
    second.data["a"] = "3"
    code, error = api_error(core.replace_namespaced_config_map, "cm", kube_namespace, second)
    assert code == 409 and error["reason"] == "Conflict"
    assert "the object has been modified" in error["message"]
    assert core.read_namespaced_config_map("cm", kube_namespace).data == {"a": "2"}


def test_stale_resource_version_on_a_custom_resource_conflicts_through_the_proxy(kube_api, kube_namespace):
    _, _, custom = apis(kube_api)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VariantAutoscaling", "metadata": {"name": "v"},
            "spec": {"scaleTargetRef": {"name": "d"}, "modelID": "m"}}
    old = custom.create_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, body)
    custom.patch_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, "v", {"spec": {"maxReplicas": 3}})
    old["spec"]["maxReplicas"] = 4
    code, error = api_error(custom.replace_namespaced_custom_object, GROUP, VERSION, kube_namespace, PLURAL, "v", old)
    assert code == 409 and error["reason"] == "Conflict"


def test_generation_bumps_on_spec_changes_only(kube_api, kube_namespace):
    _, apps, _ = apis(kube_api)
    created = apps.create_namespaced_deployment(kube_namespace, deployment("gen"))
    assert created.metadata.generation == 1
    relabelled = apps.patch_namespaced_deployment("gen", kube_namespace, {"metadata": {"labels": {"x": "y"}}})
    assert relabelled.metadata.generation == 1
    rescaled = apps.patch_namespaced_deployment("gen", kube_namespace, {"spec": {"replicas": 0, "paused": True}})
    assert rescaled.metadata.generation == 2
    status_write = apps.patch_namespaced_deployment_status("gen", kube_namespace, {"status": {"replicas": 7}})
    assert status_write.metadata.generation == 2


def test_deployment_validation_uses_the_real_error_shape(kube_api, kube_namespace):
    from kubernetes import client

    _, apps, _ = apis(kube_api)
    broken = deployment("broken")
    broken.spec.selector = client.V1LabelSelector(match_labels={"app": "other"})
    code, error = api_error(apps.create_namespaced_deployment, kube_namespace, broken)
    assert code == 422 and error["reason"] == "Invalid"
    assert "`selector` does not match template `labels`" in error["message"]
    assert error["details"]["causes"][0]["field"] == "spec.template.metadata.labels"


def test_patch_flavours(kube_api, kube_namespace):
    _, apps, _ = apis(kube_api)
    apps.create_namespaced_deployment(kube_namespace, deployment("patched"))
    strategic = apps.patch_namespaced_deployment("patched", kube_namespace, {"spec": {"template": {"spec": {
        "containers": [{"name": "sidecar", "image": "busybox"}, {"name": "vllm", "env": [{"name": "A", "value": "1"}]}]}}}})
    containers = {c.name: c for c in strategic.spec.template.spec.containers}
    assert set(containers) == {"vllm", "sidecar"}
    assert containers["vllm"].image == "vllm/vllm-openai:v0" and containers["vllm"].env[0].name == "A"
    json_patched = apps.patch_namespaced_deployment("patched", kube_namespace, [
        {"op": "add", "path": "/metadata/annotations", "value": {"a/b": "1"}},
        {"op": "replace", "path": "/spec/replicas", "value": 0}])
    assert json_patched.metadata.annotations == {"a/b": "1"}
    code, error = api_error(apps.patch_namespaced_deployment, "patched", kube_namespace, [
        {"op": "test", "path": "/spec/replicas", "value": 5}])
    assert code == 422


def test_label_and_field_selectors_filter_lists(kube_api, kube_namespace):
    from kubernetes import client

    core, _, _ = apis(kube_api)
    for name, labels in (("a", {"model": "m1", "role": "decode"}), ("b", {"model": "m1", "role": "prefill"}),
                         ("c", {"model": "m2"})):
        core.create_namespaced_config_map(kube_namespace, client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=name, labels=labels)))

    def names(**kw):
        return sorted(i.metadata.name for i in core.list_namespaced_config_map(kube_namespace, **kw).items)

    assert names(label_selector="model=m1") == ["a", "b"]
    assert names(label_selector="model=m1,role in (decode, both)") == ["a"]
    assert names(label_selector="role notin (decode),model") == ["b", "c"]
    assert names(label_selector="!role") == ["c"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.name!=b", label_selector="model==m1") == ["a"]
    page = core.list_namespaced_config_map(kube_namespace, limit=2)
    assert len(page.items) == 2 and page.metadata._continue
    rest = core.list_namespaced_config_map(kube_namespace, limit=2, _continue=page.metadata._continue)
    assert [i.metadata.name for i in page.items + rest.items] == ["a", "b", "c"]


def test_events_with_generate_name_get_distinct_names(kube_api, kube_namespace):
    from kubernetes import client

    core, _, _ = apis(kube_api)
    made = []
    for reason in ("ScaledUp", "ScaledDown"):
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name="variant-autoscaler-"),
            involved_object=client.V1ObjectReference(kind="VariantAutoscaling", name="v", namespace=kube_namespace),
            reason=reason, message=f"{reason} by the optimizer", type="Normal")
        made.append(core.create_namespaced_event(kube_namespace, event))
    assert all(e.metadata.name.startswith("variant-autoscaler-") for e in made)
    assert made[0].metadata.name != made[1].metadata.name
    listed = core.list_namespaced_event(kube_namespace, field_selector="involvedObject.name=v,reason=ScaledDown")
    assert [e.reason for e in listed.items] == ["ScaledDown"]


def test_access_reviews_allow_everything(kube_api):
    from kubernetes import client

    review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
        resource_attributes=client.V1ResourceAttributes(verb="patch", group="apps", resource="deployments",
                                                        subresource="scale")))
    answer = client.AuthorizationV1Api(kube_api).create_self_subject_access_review(review)
    assert answer.status.allowed is True


# ---------------------------------------------------------------------------------------------
# Watches.


def test_watch_streams_added_modified_deleted_from_a_resource_version(kube_api, kube_namespace):
    from kubernetes import client, watch

    core, _, _ = apis(kube_api)
    start = core.list_namespaced_config_map(kube_namespace).metadata.resource_version
    core.create_namespaced_config_map(kube_namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="w", labels={"watched": "yes"}), data={"v": "1"}))
    core.patch_namespaced_config_map("w", kube_namespace, {"data": {"v": "2"}})
    core.create_namespaced_config_map(kube_namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="other")))
    core.delete_namespaced_config_map("w", kube_namespace)
    seen = []
    for event in watch.Watch().stream(core.list_namespaced_config_map, kube_namespace, resource_version=start,
                                      label_selector="watched=yes", timeout_seconds=2):
        seen.append((event["type"], event["object"].metadata.name, (event["object"].data or {}).get("v")))
        if event["type"] == "DELETED":
            break
    assert seen == [("ADDED", "w", "1"), ("MODIFIED", "w", "2"), ("DELETED", "w", "2")]


def test_watch_of_custom_resources_is_proxied_chunk_by_chunk(kube_api, kube_namespace):
    from kubernetes import watch

    _, _, custom = apis(kube_api)
    start = custom.list_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL)["metadata"]["resourceVersion"]
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VariantAutoscaling", "metadata": {"name": "w"},
            "spec": {"scaleTargetRef": {"name": "d"}, "modelID": "m"}}
    custom.create_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, body)
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, kube_namespace, PLURAL, "w",
                                                 {"status": {"desiredReplicas": 2}})
    seen = []
    for event in watch.Watch().stream(custom.list_namespaced_custom_object, GROUP, VERSION, kube_namespace, PLURAL,
                                      resource_version=start, timeout_seconds=5):
        seen.append((event["type"], (event["object"].get("status") or {}).get("desiredReplicas")))
        if len(seen) == 2:
            break
    assert seen == [("ADDED", None), ("MODIFIED", 2)]


def test_watch_from_a_compacted_resource_version_is_gone():
    async def scenario():
        store = ObjectStore(history_length=3)
        api = CoreApi(store=store)
        await api.start()
        try:
            namespaces = store.type("", "namespaces")
            start = store.resource_version
            for i in range(5):
                store.create(namespaces, "", {"metadata": {"name": f"n{i}"}})
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{api.url}/api/v1/namespaces",
                                    params={"watch": "true", "resourceVersion": str(start)}) as resp:
                    assert resp.headers["Content-Type"].startswith("application/json")
                    first = json.loads(await resp.content.readline())
                async with http.get(f"{api.url}/api/v1/namespaces", params={
                        "watch": "true", "sendInitialEvents": "true", "resourceVersionMatch": "NotOlderThan",
                        "allowWatchBookmarks": "true", "timeoutSeconds": "1"}) as resp:
                    frames = [json.loads(line) async for line in resp.content if line.strip()]
            return first, frames
        finally:
            await api.stop()

    first, frames = asyncio.run(scenario())
    assert first["type"] == "ERROR" and first["object"]["code"] == 410 and first["object"]["reason"] == "Expired"
    assert [f["type"] for f in frames[:-1]] == ["ADDED"] * (len(frames) - 1)
    assert {f["object"]["metadata"]["name"] for f in frames[:-1]} >= {f"n{i}" for i in range(5)}
    assert frames[-1]["type"] == "BOOKMARK"
    assert frames[-1]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"] == "true"


# ---------------------------------------------------------------------------------------------
# Deployments, the scale subresource and the kubelet.


def test_scale_subresource_makes_ready_pods_and_fills_deployment_status(kube_api, kube_namespace):
    _, apps, _ = apis(kube_api)
    core, _, _ = apis(kube_api)
    apps.create_namespaced_deployment(kube_namespace, deployment("llama"))
    scale = apps.read_namespaced_deployment_scale("llama", kube_namespace)
    assert scale.spec.replicas == 0 and scale.status.selector == "app=llama"
    scaled = apps.patch_namespaced_deployment_scale("llama", kube_namespace, {"spec": {"replicas": 3}})
    assert scaled.kind == "Scale" and scaled.spec.replicas == 3
    wait_until(lambda: len(ready_pods(core, kube_namespace, "llama")) == 3, "3 ready pods")
    def fully_ready():
        status = apps.read_namespaced_deployment_status("llama", kube_namespace).status
        return status if status.ready_replicas == 3 else None

    status = wait_until(fully_ready, "readyReplicas 3")
    assert status.replicas == 3 and status.available_replicas == 3 and status.updated_replicas == 3
    assert status.observed_generation == apps.read_namespaced_deployment("llama", kube_namespace).metadata.generation
    assert {c.type: c.status for c in status.conditions}["Available"] == "True"
    pods = core.list_namespaced_pod(kube_namespace, label_selector="app=llama").items
    ports = {int(p.metadata.annotations[PORT_ANNOTATION]) for p in pods}
    assert len(ports) == 3
    for pod in pods:
        assert pod.metadata.labels["tier"] == "model" and pod.metadata.name.startswith("llama-")
        assert pod.metadata.owner_references[0].kind == "Deployment"
        assert pod.status.phase == "Running" and pod.status.pod_ip == "127.0.0.1"
    assert apps.read_namespaced_deployment_scale("llama", kube_namespace).status.replicas == 3


def test_scale_put_with_a_stale_resource_version_conflicts(kube_api, kube_namespace):
    _, apps, _ = apis(kube_api)
    apps.create_namespaced_deployment(kube_namespace, deployment("stale"))
    scale = apps.read_namespaced_deployment_scale("stale", kube_namespace)
    apps.patch_namespaced_deployment("stale", kube_namespace, {"metadata": {"labels": {"touched": "yes"}}})
    scale.spec.replicas = 2
    code, error = api_error(apps.replace_namespaced_deployment_scale, "stale", kube_namespace, scale)
    assert code == 409 and error["reason"] == "Conflict"
    scale.metadata.resource_version = None
    assert apps.replace_namespaced_deployment_scale("stale", kube_namespace, scale).spec.replicas == 2


def test_scale_down_removes_the_pods_with_the_lowest_deletion_cost(kube_api, kube_namespace):
    core, apps, _ = apis(kube_api)
    apps.create_namespaced_deployment(kube_namespace, deployment("costly", replicas=3))
    pods = wait_until(lambda: len(ready_pods(core, kube_namespace, "costly")) == 3 and ready_pods(
        core, kube_namespace, "costly"), "3 ready pods")
    costs = dict(zip(sorted(p.metadata.name for p in pods), (0, 100, -5), strict=True))
    for name, cost in costs.items():
        core.patch_namespaced_pod(name, kube_namespace, {"metadata": {"annotations": {DELETION_COST_ANNOTATION: str(cost)}}})
    apps.patch_namespaced_deployment_scale("costly", kube_namespace, {"spec": {"replicas": 1}})
    def pods_left():
        return core.list_namespaced_pod(kube_namespace, label_selector="app=costly").items

    left = wait_until(lambda: len(pods_left()) == 1 and pods_left(), "one pod left")
    assert left[0].metadata.name == max(costs, key=costs.get)
    status = wait_until(lambda: apps.read_namespaced_deployment("costly", kube_namespace).status.replicas == 1
                        and apps.read_namespaced_deployment("costly", kube_namespace).status, "status replicas 1")
    assert status.ready_replicas == 1


def test_pods_start_not_ready_and_become_ready_after_the_cold_start(kube_api, kube_namespace):
    from kubernetes import watch

    core, apps, _ = apis(kube_api)
    start = core.list_namespaced_pod(kube_namespace).metadata.resource_version
    apps.create_namespaced_deployment(kube_namespace, deployment("cold", replicas=1,
                                                                 annotations={START_DELAY_ANNOTATION: "0.5"}))
    readiness = []
    for event in watch.Watch().stream(core.list_namespaced_pod, kube_namespace, resource_version=start,
                                      timeout_seconds=10):
        conditions = {c.type: c.status for c in event["object"].status.conditions or []}
        readiness.append((event["object"].status.phase, conditions.get("Ready")))
        if conditions.get("Ready") == "True":
            break
    assert readiness[0] == ("Pending", None)
    assert ("Running", "False") in readiness
    assert readiness[-1] == ("Running", "True")


def test_kubelet_hooks_run_per_pod_with_its_port(emulated_cluster, kube_api, kube_namespace):
    core, apps, _ = apis(kube_api)
    started, stopped = [], []

    async def on_start(pod):
        started.append((pod.name, pod.port, pod.deployment))

    emulated_cluster.kubelet.on_pod_start = on_start
    emulated_cluster.kubelet.on_pod_stop = lambda pod: stopped.append(pod.name)
    try:
        apps.create_namespaced_deployment(kube_namespace, deployment("hooked", replicas=2))
        wait_until(lambda: len(ready_pods(core, kube_namespace, "hooked")) == 2, "2 ready pods")
        pods = {p.metadata.name: int(p.metadata.annotations[PORT_ANNOTATION])
                for p in core.list_namespaced_pod(kube_namespace, label_selector="app=hooked").items}
        assert sorted(started) == sorted((name, port, "hooked") for name, port in pods.items())
        apps.delete_namespaced_deployment("hooked", kube_namespace)
        wait_until(lambda: sorted(stopped) == sorted(pods), "stop hooks of both pods")
        wait_until(lambda: not core.list_namespaced_pod(kube_namespace, label_selector="app=hooked").items,
                   "pods garbage-collected")
    finally:
        emulated_cluster.kubelet.on_pod_start = None
        emulated_cluster.kubelet.on_pod_stop = None


def test_kubectl_tables_for_core_resources(emulated_cluster, kube_api, kube_namespace):
    core, apps, _ = apis(kube_api)
    apps.create_namespaced_deployment(kube_namespace, deployment("shown", replicas=2))
    wait_until(lambda: apps.read_namespaced_deployment("shown", kube_namespace).status.ready_replicas == 2,
               "2 ready replicas")
    out = emulated_cluster.kubectl("get", "deploy,pods", "-n", kube_namespace)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE"]
    assert lines[1].split()[:4] == ["deployment.apps/shown", "2/2", "2", "2"]
    pod_rows = [line.split() for line in lines if line.startswith("pod/shown-")]
    assert len(pod_rows) == 2 and all(row[1:3] == ["1/1", "Running"] for row in pod_rows)


# ---------------------------------------------------------------------------------------------
# Fault injection, for the clients' retry paths.


def test_injected_faults_fail_the_matching_requests_then_disarm(emulated_cluster, kube_api, kube_namespace):
    _, apps, custom = apis(kube_api)
    apps.create_namespaced_deployment(kube_namespace, deployment("flaky"))
    fault = emulated_cluster.core.add_fault(Fault(status=503, method="PATCH", path_pattern=r"/flaky/scale$",
                                                  times=2, reason="ServiceUnavailable"))
    try:
        for _ in range(2):
            code, error = api_error(apps.patch_namespaced_deployment_scale, "flaky", kube_namespace,
                                    {"spec": {"replicas": 1}})
            assert code == 503 and error["reason"] == "ServiceUnavailable"
        assert apps.patch_namespaced_deployment_scale("flaky", kube_namespace, {"spec": {"replicas": 1}}).spec.replicas == 1
        assert fault.hits == 2
        emulated_cluster.core.add_fault(Fault(status=500, method="GET", path_pattern=f"/{PLURAL}$"))
        code, _ = api_error(custom.list_namespaced_custom_object, GROUP, VERSION, kube_namespace, PLURAL)
        assert code == 500
        assert custom.list_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL)["items"] == []
    finally:
        emulated_cluster.core.clear_faults()
    statuses = [r.status for r in emulated_cluster.core.requests if r.name == "flaky" and r.subresource == "scale"]
    assert statuses[-3:] == [503, 503, 200]


def test_the_fault_proxy_passes_a_body_without_content_type_on_as_it_came(emulated_cluster, kube_namespace):
    """The API server reads an unlabelled body as JSON; the proxy used to relabel it octet-stream (415)."""
    from variant_autoscaler_testbed.fault_proxy import FaultProxy

    proxy = emulated_cluster.call(FaultProxy(upstream=emulated_cluster.url).start)
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{kube_namespace}/{PLURAL}"

    async def post(base: str, name: str) -> int:
        body = json.dumps({"apiVersion": f"{GROUP}/{VERSION}", "kind": "VariantAutoscaling",
                           "metadata": {"name": name},
                           "spec": {"scaleTargetRef": {"name": name}, "modelID": "m/x"}}).encode()
        async with aiohttp.ClientSession() as http, http.post(
                base + path, data=body, skip_auto_headers=("Content-Type",),
                headers={"Authorization": f"Bearer {emulated_cluster.token}"}) as resp:
            return resp.status

    try:
        direct = asyncio.run(post(emulated_cluster.url, "direct"))
        proxied = asyncio.run(post(proxy.url, "proxied"))
    finally:
        emulated_cluster.call(proxy.stop)
    assert direct == 201
    assert proxied == direct


def test_a_stalled_request_is_retried_by_the_client_after_its_timeout(emulated_cluster, kube_api, kube_namespace):
    core, _, _ = apis(kube_api)
    fault = emulated_cluster.core.add_fault(Fault(status=0, method="GET", path_pattern=f"{kube_namespace}/configmaps$",
                                                  delay_s=3))
    try:
        listed = core.list_namespaced_config_map(kube_namespace, _request_timeout=0.3)
    finally:
        emulated_cluster.core.clear_faults()
    assert listed.items == [] and fault.hits == 1
    gets = [r for r in emulated_cluster.core.requests if r.namespace == kube_namespace and r.resource == "configmaps"]
    assert len(gets) >= 2


def test_dropped_watches_end_local_and_proxied_streams(emulated_cluster, kube_api, kube_namespace):
    import threading

    from kubernetes import watch

    core, _, custom = apis(kube_api)
    ended = {}

    def follow(name, list_fn, *args):
        for _event in watch.Watch().stream(list_fn, *args, timeout_seconds=120):
            pass
        ended[name] = True

    threads = [threading.Thread(target=follow, args=("core", core.list_namespaced_config_map, kube_namespace)),
               threading.Thread(target=follow, args=("crd", custom.list_namespaced_custom_object, GROUP, VERSION,
                                                     kube_namespace, PLURAL))]
    for t in threads:
        t.start()

    def watching():
        return {(r.resource, r.status) for r in emulated_cluster.core.requests
                if r.namespace == kube_namespace and r.verb == "watch"} >= {("configmaps", 200), (PLURAL, 200)}

    wait_until(watching, "both watches to be open")
    assert emulated_cluster.call(emulated_cluster.core.drop_watches) >= 2
    for t in threads:
        t.join(timeout=30)
    assert ended == {"core": True, "crd": True}


# ---------------------------------------------------------------------------------------------
# The request log.


def test_request_log_names_verb_group_resource_and_subresource(emulated_cluster, kube_api, kube_namespace):
    _, apps, custom = apis(kube_api)
    marker = f"log-{uuid.uuid4().hex[:6]}"
    apps.create_namespaced_deployment(kube_namespace, deployment(marker))
    apps.patch_namespaced_deployment_scale(marker, kube_namespace, {"spec": {"replicas": 0}})
    custom.list_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL)
    mine = [r for r in emulated_cluster.core.requests if r.namespace == kube_namespace]
    summary = {(r.verb, r.group, r.resource, r.subresource, r.proxied) for r in mine}
    assert ("create", "apps", "deployments", None, False) in summary
    assert ("patch", "apps", "deployments", "scale", False) in summary
    assert ("list", GROUP, PLURAL, None, True) in summary
    scale_patch = next(r for r in mine if r.subresource == "scale")
    assert scale_patch.status == 200 and '"replicas": 0' in scale_patch.body
    assert scale_patch.content_type.startswith("application/strategic-merge-patch+json")


# ---------------------------------------------------------------------------------------------
# kopf: a throwaway operator runs its whole lifecycle, with peering, against the substrate.

KOPF_OPERATOR = textwrap.dedent('''
    import kopf

    @kopf.on.login()
    def login(**kwargs):
        return kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup()
    def configure(settings, **_):
        settings.watching.server_timeout = 10
        settings.peering.priority = 7

    @kopf.on.create("autoscaling.variant-autoscaler.io", "v1alpha1", "variantautoscalings")
    def created(body, spec, patch, logger, **_):
        patch.status["desiredReplicas"] = spec["minReplicas"] + 1
        kopf.info(body, reason="Sized", message=f"desired replicas {spec['minReplicas'] + 1}")
        logger.info("sized %s", spec["modelID"])

    @kopf.on.delete("autoscaling.variant-autoscaler.io", "v1alpha1", "variantautoscalings")
    def deleted(logger, **_):
        logger.info("deleted")
''')


def test_kopf_runs_its_lifecycle_with_peering(emulated_cluster, kube_api, kube_namespace, tmp_path):
    import kopf
    from kopf.testing import KopfRunner

    _, _, custom = apis(kube_api)
    core, _, _ = apis(kube_api)
    custom.create_namespaced_custom_object("kopf.dev", "v1", kube_namespace, "kopfpeerings", {
        "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "smoke"}})
    operator_file = tmp_path / "operator.py"
    operator_file.write_text(KOPF_OPERATOR)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VariantAutoscaling", "metadata": {"name": "kopfed"},
            "spec": {"scaleTargetRef": {"name": "d"}, "modelID": "meta/llama-3.1-8b"}}
    # A fresh registry: only this file's handlers run, not those of other kopf modules the process
    # imported (the project's operator registers into its own registry, but be explicit here too).
    with KopfRunner(["run", "--namespace", kube_namespace, "--peering", "smoke", "--verbose",
                     str(operator_file)], timeout=60, registry=kopf.OperatorRegistry()) as runner:
        custom.create_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, body)
        done = wait_until(lambda: (o := custom.get_namespaced_custom_object(
            GROUP, VERSION, kube_namespace, PLURAL, "kopfed")).get("status", {}).get("desiredReplicas") and o,
            "kopf to patch the status", timeout_s=30)
        assert done["status"]["desiredReplicas"] == 2
        assert "kopf.zalando.org/KopfFinalizerMarker" in done["metadata"]["finalizers"]
        peering = wait_until(lambda: custom.get_namespaced_custom_object(
            "kopf.dev", "v1", kube_namespace, "kopfpeerings", "smoke").get("status"), "kopf to join the peering")
        assert any(peer.get("priority") == 7 for peer in peering.values())
        events = wait_until(lambda: [e for e in core.list_namespaced_event(
            kube_namespace, field_selector="involvedObject.name=kopfed").items if e.reason == "Sized"],
            "kopf to post an event", timeout_s=30)
        assert events[0].involved_object.kind == "VariantAutoscaling"
        assert events[0].message == "desired replicas 2" and events[0].type == "Normal"
        custom.delete_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, "kopfed")
        wait_until(lambda: not custom.list_namespaced_custom_object(
            GROUP, VERSION, kube_namespace, PLURAL)["items"], "the finalizer to be released", timeout_s=30)
    assert runner.exception is None, runner.exception
    assert runner.exit_code == 0
    assert "sized meta/llama-3.1-8b" in runner.output and "deleted" in runner.output
    kopf_calls = emulated_cluster.core.requests_from("kopf/")
    assert {(r.verb, r.group, r.resource) for r in kopf_calls} >= {
        ("watch", GROUP, PLURAL), ("patch", GROUP, PLURAL), ("create", "", "events"), ("patch", "kopf.dev", "kopfpeerings")}


def test_cluster_module_serves_until_sigterm(emulated_cluster, tmp_path):
    """`python -m variant_autoscaler_testbed.cluster` is what `make live` starts."""
    import signal
    import subprocess
    import sys

    kubeconfig = tmp_path / "live.kubeconfig"
    proc = subprocess.Popen([sys.executable, "-m", "variant_autoscaler_testbed.cluster", "--kubeconfig",
                             str(kubeconfig), "--namespace", "live"], stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: kubeconfig.exists() or proc.poll() is not None, "the kubeconfig", timeout_s=60)
        assert proc.poll() is None, proc.stderr.read()
        got = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", f"--cache-dir={tmp_path / 'cache'}",
                              "get", "namespace", "live", "-o", "name"], capture_output=True, text=True, timeout=60)
        assert got.stdout.strip() == "namespace/live", got.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0
    assert f"export KUBECONFIG={kubeconfig}" in proc.stderr.read()
    assert not kubeconfig.exists()


# ---------------------------------------------------------------------------------------------
# What a new user types first against `make live` (issue 13 item 5).


def test_kubectl_create_namespace_posts_protobuf_and_works(emulated_cluster, kube_api):
    """`kubectl create namespace` sends a protobuf body only; the emulated API reads it."""
    core, _, _ = apis(kube_api)
    name = f"t-{uuid.uuid4().hex[:10]}"
    out = emulated_cluster.kubectl("create", "namespace", name)
    try:
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"namespace/{name} created"
        created = core.read_namespace(name)
        assert created.status.phase == "Active"
        assert created.metadata.labels["kubernetes.io/metadata.name"] == name
        recorded = [r for r in emulated_cluster.core.requests if r.method == "POST" and r.resource == "namespaces"
                    and "protobuf" in r.content_type]
        assert recorded, "kubectl no longer posts protobuf; this test no longer covers the decoder"
    finally:
        core.delete_namespace(name)


def test_events_with_offset_times_are_stored_in_z_form_and_kubectl_lists_them(emulated_cluster, kube_api,
                                                                                kube_namespace):
    """Python clients (kopf) send `+00:00`; the real API answers `Z`, and `kubectl get events` reads it."""
    core, _, _ = apis(kube_api)
    body = {"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "offset."},
            "involvedObject": {"kind": "Pod", "name": "p", "namespace": kube_namespace},
            "reason": "OffsetTimes", "message": "sent with +00:00", "type": "Normal",
            "firstTimestamp": "2026-12-07T08:00:00+00:00", "lastTimestamp": "2026-12-07T09:30:00.25+01:00",
            "eventTime": "2026-12-07T08:00:00.123456+00:00"}
    created = core.create_namespaced_event(kube_namespace, body)
    stored = json.loads(emulated_cluster.kubectl("get", "event", created.metadata.name, "-n", kube_namespace,
                                                 "-o", "json", check=True).stdout)
    assert stored["firstTimestamp"] == "2026-12-07T08:00:00Z"
    assert stored["lastTimestamp"] == "2026-12-07T08:30:00Z"
    assert stored["eventTime"] == "2026-12-07T08:00:00.123456Z"
    out = emulated_cluster.kubectl("get", "events", "-n", kube_namespace)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split() == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    assert "OffsetTimes" in out.stdout and "pod/p" in out.stdout

    bad = {**body, "metadata": {"name": "bad-time", "namespace": kube_namespace}, "lastTimestamp": "yesterday"}
    refused = emulated_cluster.kubectl("create", "--validate=false", "-f", "-", input=json.dumps(bad))
    assert refused.returncode != 0 and "lastTimestamp" in refused.stderr and "RFC 3339" in refused.stderr


def test_server_side_apply_of_builtin_types_says_to_drop_the_flag(emulated_cluster, kube_namespace):
    """deploy/README tells `make live` users to apply without --server-side; the API says the same."""
    config_map = json.dumps({"apiVersion": "v1", "kind": "ConfigMap",
                             "metadata": {"name": "applied", "namespace": kube_namespace}, "data": {"k": "v"}})
    refused = emulated_cluster.kubectl("apply", "--server-side", "-f", "-", input=config_map)
    assert refused.returncode != 0 and "without --server-side" in refused.stderr
    applied = emulated_cluster.kubectl("apply", "-f", "-", input=config_map)
    assert applied.returncode == 0, applied.stderr
    assert "configmap/applied created" in applied.stdout


def test_kubectl_create_configmap_works_and_other_protobuf_bodies_say_what_to_send(emulated_cluster, kube_api,
                                                                                   kube_namespace, tmp_path):
    import base64

    core, _, _ = apis(kube_api)
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\xff\x00\xfe")
    out = emulated_cluster.kubectl("create", "configmap", "literal", "-n", kube_namespace, "--from-literal=a=b",
                                   "--from-literal=settings.yaml=interval_s: 5", f"--from-file=blob={blob}")
    assert out.returncode == 0, out.stderr
    created = core.read_namespaced_config_map("literal", kube_namespace)
    assert created.data == {"a": "b", "settings.yaml": "interval_s: 5"}
    assert base64.b64decode(created.binary_data["blob"]) == b"\xff\x00\xfe"
    refused = emulated_cluster.kubectl("create", "deployment", "gen", "-n", kube_namespace, "--image=x")
    assert refused.returncode != 0 and "apps/v1/Deployment" in refused.stderr and "kubectl apply" in refused.stderr
    assert "Traceback" not in refused.stderr

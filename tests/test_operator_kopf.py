"""The operator as kopf runs it: peering between two replicas, and watch streams that drop.

Two replicas (two kopf.testing.KopfRunner instances in one process) run this package's kopf module
against the emulated cluster with kopf peering; the one with the higher priority scales the target,
the other stays paused; when the active one stops, the other takes over. Who wrote what is read
from the API server's request log (each replica has its own User-Agent). Then one operator runs
behind a fault-injecting proxy that cuts its watch streams and answers 503 to the reconnects: it
must come back on its own and still react to a change within seconds.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request

import pytest
import yaml
from kopf.testing import KopfRunner
from operator_harness import L4_PROFILE, Kube, OperatorThread, settings_dict, variant, wait_until
from variant_autoscaler.operator import RunOptions, registry
from variant_autoscaler_testbed.cluster import kubeconfig_text
from variant_autoscaler_testbed.fault_proxy import FaultProxy, FaultRule
from variant_autoscaler_testbed.prometheus import free_port

PEERING = "va-peering-test"


def _scale_writers(cluster, namespace: str, deployment: str) -> list[str]:
    return [r.user_agent for r in cluster.core.requests
            if r.method == "PUT" and r.path == f"/apis/apps/v1/namespaces/{namespace}/deployments/{deployment}/scale"]


@pytest.fixture
def kopf_proxy(emulated_cluster, tmp_path):
    """A fault proxy in front of the cluster and a kubeconfig that points an operator through it."""
    proxy = emulated_cluster.call(FaultProxy(upstream=emulated_cluster.url).start)
    kubeconfig = tmp_path / "proxy.kubeconfig"
    kubeconfig.write_text(kubeconfig_text(proxy.url, emulated_cluster.token))
    try:
        yield proxy, kubeconfig
    finally:
        emulated_cluster.call(proxy.stop)


def _settings_file(tmp_path, namespace: str, **over):
    """settings.yaml watching `namespace`, with a Prometheus that is not there (these tests need no metrics)."""
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(settings_dict(watched_namespaces=[namespace], **{
        "prometheus": {"url": f"http://127.0.0.1:{free_port()}", "timeout_s": 0.5}, **over})))
    return path


def _metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_only_the_highest_priority_replica_actuates_and_the_other_takes_over(
        emulated_cluster, kube_api, kube_namespace, tmp_path):
    kube = Kube(kube_api, kube_namespace)
    kube.deploy("peer-l4", 1)
    kube.apply_variant(variant("peer-l4", "peer-l4", profile=L4_PROFILE, min_replicas=2))
    settings = settings_dict(interval_s=1, watched_namespaces=[kube_namespace],
                             prometheus={"url": f"http://127.0.0.1:{free_port()}", "timeout_s": 0.5})
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    env = {"VARIANT_AUTOSCALER_SETTINGS_FILE": str(path), "VARIANT_AUTOSCALER_METRICS_PORT": "0",
           "VARIANT_AUTOSCALER_METRICS_HOST": "127.0.0.1", "VARIANT_AUTOSCALER_PEERING_GRACE_S": "1",
           "VARIANT_AUTOSCALER_KUBECONFIG": str(emulated_cluster.kubeconfig_path)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    args = ["run", "-A", "--verbose", "-m", "variant_autoscaler.operator", "--peering", PEERING]
    high = KopfRunner([*args, "--priority", "20"], timeout=60, registry=registry)
    low = KopfRunner([*args, "--priority", "10"], timeout=60, registry=registry)
    try:
        high.__enter__()
        wait_until(lambda: 20 in _priorities(kube), timeout_s=20, what="the first replica in the peering")
        low.__enter__()
        wait_until(lambda: kube.replicas("peer-l4") == 2, timeout_s=40, what="the active replica to scale")
        wait_until(lambda: _priorities(kube) == [10, 20], timeout_s=20, what="both replicas in the peering")
        first = set(_scale_writers(emulated_cluster, kube_namespace, "peer-l4"))
        assert len(first) == 1, first
        _set_min(kube, 3)
        wait_until(lambda: kube.replicas("peer-l4") == 3, timeout_s=30, what="the active replica again")
        assert set(_scale_writers(emulated_cluster, kube_namespace, "peer-l4")) == first
        high.__exit__(None, None, None)
        _set_min(kube, 4)
        wait_until(lambda: kube.replicas("peer-l4") == 4, timeout_s=40, what="the other replica to take over")
        writers = _scale_writers(emulated_cluster, kube_namespace, "peer-l4")
        assert writers[-1] not in first and len(set(writers)) == 2
        low.__exit__(None, None, None)
    finally:
        for runner in (high, low):
            if runner._thread.is_alive():
                runner.__exit__(None, None, None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert high.exception is None and low.exception is None


def _priorities(kube: Kube) -> list[int]:
    try:
        peers = kube.custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", PEERING)
    except Exception:  # noqa: BLE001 - not created yet
        return []
    return sorted(p["priority"] for p in (peers.get("status") or {}).values())


def _set_min(kube: Kube, replicas: int, name: str = "peer-l4") -> None:
    """A merge patch of the spec: a read-modify-replace lost the race with the operator's own status
    write now and then (409 on the stale resourceVersion), which is the test's race, not the operator's."""
    kube.custom.patch_namespaced_custom_object("autoscaling.variant-autoscaler.io", "v1alpha1", kube.ns,
                                               "variantautoscalings", name, {"spec": {"minReplicas": replicas}})


@pytest.mark.parametrize("status, mine, active", [
    ({}, 5, False),
    ({"a": {"priority": 5, "lifetime": 60, "lastseen": "2999-01-01T00:00:00+00:00"}}, 5, True),
    ({"a": {"priority": 5, "lifetime": 60, "lastseen": "2999-01-01T00:00:00+00:00"},
      "b": {"priority": 9, "lifetime": 60, "lastseen": "2999-01-01T00:00:00+00:00"}}, 5, False),
    ({"a": {"priority": 5, "lifetime": 60, "lastseen": "2999-01-01T00:00:00+00:00"},
      "b": {"priority": 9, "lifetime": 60, "lastseen": "2000-01-01T00:00:00+00:00"}}, 5, True),
    ({"a": {"priority": 5, "lifetime": 60, "lastseen": "2999-01-01T00:00:00+00:00"},
      "b": {"priority": 5, "lifetime": 60, "lastseen": "2999-01-01T00:00:00+00:00"}}, 5, False),
])
def test_the_peering_rule_is_kopfs(status, mine, active):
    from variant_autoscaler.operator import peer_is_active

    assert peer_is_active(status, mine) is active


def test_dropped_watches_and_5xx_on_reconnect_are_retried(emulated_cluster, kube_api, kube_namespace, tmp_path, kopf_proxy):
    kube = Kube(kube_api, kube_namespace)
    kube.deploy("watch-l4", 1)
    kube.apply_variant(variant("watch-l4", "watch-l4", profile=L4_PROFILE, min_replicas=1))
    proxy, kubeconfig = kopf_proxy
    path = _settings_file(tmp_path, kube_namespace, interval_s=600)
    options = RunOptions(settings_file=path, kubeconfig=kubeconfig, metrics_host="127.0.0.1", metrics_port=0,
                         standalone=True, namespaces=(kube_namespace,), instance="watch-test")
    va_watch = rf"/namespaces/{kube_namespace}/variantautoscalings$"
    with OperatorThread(options):
        wait_until(lambda: kube.condition("watch-l4", "TargetResolved"), timeout_s=20, what="a first cycle")
        rule = proxy.add(FaultRule(method="GET", path=va_watch, watch=True, status=503, times=3))
        wait_until(lambda: emulated_cluster.call(proxy.drop_watches) >= 1, timeout_s=20, what="a watch to cut")
        _set_min(kube, 2, "watch-l4")
        # the loop sleeps 600 s between cycles: only the re-established watch can wake it
        wait_until(lambda: kube.replicas("watch-l4") == 2, timeout_s=40, what="the change seen through a new watch")
        assert rule.hits == 3
        watches = [r.status for r in proxy.log if r.injected is not None or
                   ("watch=true" in r.query and r.path.endswith("/variantautoscalings"))]
        assert watches.count(503) == 3 and 200 in watches[watches.index(503):]


def test_an_api_server_down_longer_than_the_backoffs_never_ends_the_operator(
        emulated_cluster, kube_api, kube_namespace, tmp_path, kopf_proxy):
    """Watch reconnects answered 503 many more times than there are backoffs: kopf used to give the
    request up and the process exited (rc=1); now the last backoff repeats until the API answers."""
    kube = Kube(kube_api, kube_namespace)
    kube.deploy("outage-l4", 1)
    kube.apply_variant(variant("outage-l4", "outage-l4", profile=L4_PROFILE, min_replicas=1))
    proxy, kubeconfig = kopf_proxy
    path = _settings_file(tmp_path, kube_namespace, interval_s=600)
    port = free_port()
    backoffs = (0.1, 0.2, 0.3)
    options = RunOptions(settings_file=path, kubeconfig=kubeconfig, metrics_host="127.0.0.1", metrics_port=port,
                         standalone=True, namespaces=(kube_namespace,), instance="outage-test",
                         api_error_backoffs_s=backoffs)
    va_watch = rf"/namespaces/{kube_namespace}/variantautoscalings$"
    failures = 4 * (len(backoffs) + 1)
    with OperatorThread(options) as op:
        wait_until(lambda: kube.condition("outage-l4", "TargetResolved"), timeout_s=20, what="a first cycle")
        rule = proxy.add(FaultRule(method="GET", path=va_watch, watch=True, status=503, times=failures))
        wait_until(lambda: emulated_cluster.call(proxy.drop_watches) >= 1, timeout_s=20, what="a watch to cut")
        _set_min(kube, 2, "outage-l4")
        wait_until(lambda: kube.replicas("outage-l4") == 2, timeout_s=40,
                   what="the change seen through the watch once the API answers again")
        assert rule.hits == failures
        assert op.error is None
        metrics = _metrics(port)
        [retried] = [line for line in metrics.splitlines()
                     if line.startswith('variant_autoscaler_cycle_errors_total{reason="KubernetesApiRetried"}')]
        assert float(retried.split()[-1]) >= failures
    assert op.error is None


def test_credentials_never_reach_logs_events_or_status(emulated_cluster, kube_api, kube_namespace, caplog):
    """A password in the Prometheus URL, then a bearer token (the two together are refused), through a down
    Prometheus (its error quotes the URL) and two invalid settings edits (PyYAML quotes the offending line; the URL check quotes the
    URL): every log line, Event, status and /metrics is searched for them."""
    password, token = "pw-5ecr3t-Zq", "tok-5ecr3t-Xy"
    kube = Kube(kube_api, kube_namespace)
    kube.deploy("cred-l4", 1)
    kube.apply_variant(variant("cred-l4", "cred-l4", profile=L4_PROFILE, min_replicas=1))
    plain = f"http://127.0.0.1:{free_port()}"
    url = plain.replace("http://", f"http://admin:{password}@")
    good = settings_dict(interval_s=1, watched_namespaces=[kube_namespace],
                         prometheus={"url": url, "timeout_s": 0.5})
    with_token = {**good, "prometheus": {"url": plain, "bearer_token": token, "timeout_s": 0.5}}
    kube.core.create_namespaced_config_map(kube_namespace, {"metadata": {"name": "va-settings"},
                                                            "data": {"settings.yaml": yaml.safe_dump(good)}})
    port = free_port()
    options = RunOptions(settings_configmap="va-settings", operator_namespace=kube_namespace,
                         kubeconfig=emulated_cluster.kubeconfig_path, metrics_host="127.0.0.1", metrics_port=port,
                         standalone=True, namespaces=(kube_namespace,), instance="cred-test")
    bad_yaml = yaml.safe_dump(with_token).replace(f"bearer_token: {token}", f"bearer_token: {token}: oops")
    bad_url = yaml.safe_dump({**good, "prometheus": {"url": url.removeprefix("http://"), "bearer_token": token}})
    caplog.set_level(logging.DEBUG)
    with OperatorThread(options) as op:
        cond = wait_until(lambda: (c := kube.condition("cred-l4", "MetricsAvailable")) and "refused" in c["message"]
                          and c, timeout_s=30, what="a condition quoting the down Prometheus")
        assert "http://***@127.0.0.1" in cond["message"]
        kube.core.patch_namespaced_config_map("va-settings", kube_namespace,
                                              {"data": {"settings.yaml": yaml.safe_dump(with_token)}})
        wait_until(lambda: (c := kube.condition("cred-l4", "MetricsAvailable")) and "refused" in c["message"]
                   and "***" not in c["message"], timeout_s=30, what="a condition from the settings with the token")
        for text in (bad_yaml, bad_url):
            seen = len([r for r in caplog.records if r.getMessage().startswith("invalid settings")])
            kube.core.patch_namespaced_config_map("va-settings", kube_namespace, {"data": {"settings.yaml": text}})
            wait_until(lambda n=seen: len([r for r in caplog.records
                                           if r.getMessage().startswith("invalid settings")]) > n,
                       timeout_s=30, what="the invalid settings to be logged")
        metrics = _metrics(port)
    assert op.error is None
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("invalid settings")]
    assert any("line" in e and "mapping values" in e for e in errors), errors
    assert any("url must start with http" in e for e in errors), errors
    logs = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    events = "\n".join(f"{e.reason} {e.message}" for e in kube.events())
    status = json.dumps([v.get("status") for v in kube.variants()])
    for where, text in (("logs", logs), ("Events", events), ("status", status), ("/metrics", metrics)):
        for secret in (password, token):
            assert secret not in text, f"{secret} in {where}"
    assert events and "MetricsUnavailable" in events


def test_the_second_cycle_uses_the_interval_from_the_settings_configmap(emulated_cluster, kube_api, kube_namespace):
    """interval_s: 1 in the ConfigMap; the first cycle reads it, and the next cycles come at 1 s, not at
    the default 30 s (the loop used to take the interval before the cycle that loads the ConfigMap)."""
    kube = Kube(kube_api, kube_namespace)
    settings = settings_dict(interval_s=1, watched_namespaces=[kube_namespace],
                             prometheus={"url": f"http://127.0.0.1:{free_port()}", "timeout_s": 0.5})
    kube.core.create_namespaced_config_map(kube_namespace, {"metadata": {"name": "va-settings"},
                                                            "data": {"settings.yaml": yaml.safe_dump(settings)}})
    port = free_port()
    options = RunOptions(settings_configmap="va-settings", operator_namespace=kube_namespace,
                         kubeconfig=emulated_cluster.kubeconfig_path, metrics_host="127.0.0.1", metrics_port=port,
                         standalone=True, namespaces=(kube_namespace,), instance="interval-test")

    def cycles() -> float:
        text = _metrics(port)
        return next(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("variant_autoscaler_cycle_duration_seconds_count"))

    with OperatorThread(options) as op:
        wait_until(lambda: cycles() >= 3, timeout_s=20, what="three cycles, well before the default 30 s interval")
    assert op.error is None


def test_listeners_default_to_the_pod_ip_or_loopback():
    from variant_autoscaler.cli import build_parser
    from variant_autoscaler.commands.run import options_from_args
    from variant_autoscaler.operator import default_metrics_host

    assert default_metrics_host({}) == "127.0.0.1"
    assert default_metrics_host({"POD_IP": "10.1.2.3"}) == "10.1.2.3"
    expected = os.environ.get("POD_IP") or "127.0.0.1"
    assert options_from_args(build_parser().parse_args(["run"])).metrics_host == expected
    assert RunOptions().metrics_host == expected
    assert options_from_args(build_parser().parse_args(["run", "--metrics-host", "0.0.0.0"])).metrics_host == "0.0.0.0"


def test_readiness_fails_while_the_control_loop_is_stuck_and_recovers(emulated_cluster, kube_api, kube_namespace,
                                                                     tmp_path, kopf_proxy):
    """A pods list that hangs 15 s wedges a cycle: /healthz (the readiness probe) answers 503 until a
    cycle succeeds again, while a plain liveness of the HTTP server would still say ok."""
    kube = Kube(kube_api, kube_namespace)
    kube.deploy("stuck-l4", 1)
    kube.apply_variant(variant("stuck-l4", "stuck-l4", profile=L4_PROFILE, min_replicas=1))
    proxy, kubeconfig = kopf_proxy
    path = _settings_file(tmp_path, kube_namespace, interval_s=1)
    port = free_port()
    options = RunOptions(settings_file=path, kubeconfig=kubeconfig, metrics_port=port, standalone=True,
                         namespaces=(kube_namespace,), instance="ready-test")

    def healthz() -> int:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status
        except urllib.error.HTTPError as err:
            return err.code

    with OperatorThread(options) as op:
        wait_until(lambda: healthz() == 200, timeout_s=20, what="ready after a successful cycle")
        rule = proxy.add(FaultRule(method="GET", path=rf"/namespaces/{kube_namespace}/pods$", status=None,
                                   delay_s=15, times=1))
        wait_until(lambda: healthz() == 503, timeout_s=20, what="unready while the cycle hangs")
        assert rule.hits == 1
        wait_until(lambda: healthz() == 200, timeout_s=30, what="ready again once a cycle succeeds")
    assert op.error is None


def test_two_replicas_with_the_same_priority_settle_on_one_winner(emulated_cluster, kube_api, kube_namespace,
                                                                  tmp_path, kopf_proxy):
    """Both given --priority 7 (kopf alone pauses both forever): the smaller identity keeps 7, the
    other steps down to 6, and changes are applied by exactly one of them. One talks through the
    fault proxy, so its peering writes cross it too."""
    kube = Kube(kube_api, kube_namespace)
    kube.deploy("tie-l4", 1)
    kube.apply_variant(variant("tie-l4", "tie-l4", profile=L4_PROFILE, min_replicas=2))
    proxy, proxied = kopf_proxy
    path = _settings_file(tmp_path, kube_namespace, interval_s=1)

    def options(instance: str, kubeconfig) -> RunOptions:
        return RunOptions(settings_file=path, kubeconfig=kubeconfig, metrics_host="127.0.0.1", metrics_port=0,
                          namespaces=(kube_namespace,), peering="va-tie", priority=7, peering_grace_s=1,
                          instance=instance)

    def peers() -> dict[str, int]:
        try:
            body = kube.custom.get_namespaced_custom_object("kopf.dev", "v1", kube_namespace, "kopfpeerings", "va-tie")
        except Exception:  # noqa: BLE001 - not created yet
            return {}
        return {k: v["priority"] for k, v in (body.get("status") or {}).items()}

    with OperatorThread(options("tie-a", emulated_cluster.kubeconfig_path)) as a, \
            OperatorThread(options("tie-b", proxied)) as b:
        wait_until(lambda: peers() == {"tie-a": 7, "tie-b": 6}, timeout_s=30, what="tie-b to step down")
        wait_until(lambda: kube.replicas("tie-l4") == 2, timeout_s=30, what="the winner to scale")
        _set_min(kube, 3, "tie-l4")
        wait_until(lambda: kube.replicas("tie-l4") == 3, timeout_s=30, what="a change applied after the tie")
        writers = set(_scale_writers(emulated_cluster, kube_namespace, "tie-l4"))
        assert writers == {"variant-autoscaler/tie-a"}, writers
        assert any(r.method == "PATCH" and r.path.endswith("/kopfpeerings/va-tie") for r in proxy.log)
    assert a.error is None and b.error is None


def test_a_priority_tie_goes_to_the_smallest_identity():
    from variant_autoscaler.operator import peer_is_active

    live = {"lifetime": 60, "lastseen": "2999-01-01T00:00:00+00:00"}
    status = {"b": {**live, "priority": 5}, "a": {**live, "priority": 5}}
    assert peer_is_active(status, 5, identity="a") and not peer_is_active(status, 5, identity="b")
    assert not peer_is_active(status, 5), "without an identity a tie pauses everyone, as kopf does"
    dead = {"a": {"priority": 5, "lifetime": 60, "lastseen": "2000-01-01T00:00:00+00:00"}, "b": status["b"]}
    assert peer_is_active(dead, 5, identity="b")


def test_run_with_a_namespace_never_reads_or_writes_another_namespace(emulated_cluster, kube_api, kube_namespace,
                                                                      tmp_path):
    """`run -n a` beside VariantAutoscalings in namespace b, with settings that watch every namespace
    (watched_namespaces: []): the first cycle used to list VAs cluster-wide and write b's status.
    Judged from the API server's request log: no request of the operator (kopf or the loop) names b,
    and none lists a namespaced resource across the cluster."""
    from kubernetes import client

    other = f"{kube_namespace}-b"
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    mine, theirs = Kube(kube_api, kube_namespace), Kube(kube_api, other)
    try:
        for kube, name in ((mine, "scope-a"), (theirs, "scope-b")):
            kube.deploy(name, 1)
            kube.apply_variant(variant(name, name, profile=L4_PROFILE, min_replicas=2))
        path = tmp_path / "settings.yaml"
        path.write_text(yaml.safe_dump(settings_dict(interval_s=1, watched_namespaces=[], prometheus={
            "url": f"http://127.0.0.1:{free_port()}", "timeout_s": 0.5})))
        options = RunOptions(settings_file=path, kubeconfig=emulated_cluster.kubeconfig_path, metrics_host="127.0.0.1",
                             metrics_port=0, standalone=True, namespaces=(kube_namespace,), instance="scope-test")
        first = len(emulated_cluster.core.requests)
        with OperatorThread(options) as op:
            wait_until(lambda: mine.replicas("scope-a") == 2, timeout_s=30, what="the operator to scale scope-a")
            wait_until(lambda: sum(r.resource == "variantautoscalings" and r.subresource == "status"
                                   and r.namespace == kube_namespace and r.user_agent.startswith("variant-autoscaler/")
                                   for r in emulated_cluster.core.requests[first:]) >= 1,
                       timeout_s=30, what="a status write in the operator's namespace")
            mine.apps.patch_namespaced_deployment("scope-a", kube_namespace, {"spec": {"replicas": 1}})
            wait_until(lambda: mine.replicas("scope-a") == 2, timeout_s=30, what="a later cycle to scale it back")
        assert op.error is None
        calls = [r for r in emulated_cluster.core.requests[first:] if r.user_agent.startswith(("kopf/", "variant-autoscaler/"))]
        assert calls
        assert not [r.summary() for r in calls if r.namespace == other], "the operator touched the other namespace"
        wide = [r.summary() for r in calls if r.namespace is None and r.resource in (
            "variantautoscalings", "deployments", "pods", "events", "configmaps", "namespaces",
            "customresourcedefinitions")]
        assert not wide, f"cluster-wide requests in namespaced mode: {wide}"
        assert not theirs.variant("scope-b").get("status") and theirs.replicas("scope-b") == 1
        assert not theirs.events()
    finally:
        core.delete_namespace(other)

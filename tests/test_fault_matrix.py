"""The fault matrix (issue 10 part 2): one test per fault, each against the real Prometheus (scraping
emulated vLLM pods under load), the real CRD server and the emulated core API, with the operator
(kopf + the loop) running in a thread.

Every row asserts the four invariants while the fault lasts and after it clears: the operator is up,
no Deployment goes below its minReplicas (nor to zero), /metrics answers, and the VA's conditions say
in words what happened. It then measures the recovery time after the fault clears (asserted loosely:
within RECOVERY_CYCLES cycles) and writes it to reports/fault-matrix.md, the table that README's
"Failure behaviour" section is generated from (scripts/fault_matrix_readme.py; test_readme checks it).

Faults on Prometheus come from a fault proxy between the operator and the real Prometheus; faults on
the API from a fault proxy between the operator and the emulated cluster.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest_metrics import BackgroundLoop
from operator_harness import L4_PROFILE, TINY_MODEL, Kube, OperatorThread, settings_dict, variant, wait_until
from test_operator_e2e import MIX, _annotations, _event, model_pods, prometheus  # noqa: F401 - shared fixtures
from variant_autoscaler.operator import RunOptions
from variant_autoscaler_testbed.cluster import kubeconfig_text
from variant_autoscaler_testbed.fault_proxy import FaultProxy, FaultRule
from variant_autoscaler_testbed.load import LoadSpec, generate_load
from variant_autoscaler_testbed.prometheus import free_port

MODEL = TINY_MODEL["name"]
INTERVAL_S = 1
RECOVERY_CYCLES = 20
OUTAGE_S = 60
SETTINGS_CM = "fm-settings"
REPORT = Path(__file__).resolve().parents[1] / "reports" / "fault-matrix.md"
HEADER = "| fault | what the operator does | what the user sees | recovery (measured) |"

# test name -> (fault, what the operator does, what the user sees); the README table's first columns
ROWS: dict[str, tuple[str, str, str]] = {
    "test_prometheus_down": (
        "Prometheus down for 60 s (connections dropped)",
        "holds every replica count for the whole outage; no scale-down on the first readings after the gap",
        "MetricsAvailable False, reason PrometheusError, message quoting the connection error; Warning Event "
        "MetricsUnavailable"),
    "test_prometheus_slower_than_the_query_timeout": (
        "Prometheus slower than the query timeout",
        "gives each query up at prometheus.timeout_s and holds replicas",
        "MetricsAvailable False, reason PrometheusError, message saying no answer came within the timeout"),
    "test_api_5xx_on_scale_for_a_while": (
        "API answers 503 to every scale request for a while",
        "retries with backoff each cycle, keeps the current replicas, scales once the API answers",
        "Actuated False, reason ScaleFailed, message with the HTTP status; Warning Event ScaleFailed"),
    "test_api_409_on_scale": (
        "API answers 409 Conflict to scale writes (someone else changed the Deployment)",
        "re-reads the Scale and repeats the write against the fresh resourceVersion, never blindly",
        "Actuated True, message saying how many conflicts were resolved"),
    "test_api_5xx_on_status_writes_for_a_while": (
        "API answers 503 to every VariantAutoscaling status write for a while",
        "keeps deciding and scaling; retries the status every cycle",
        "Warning Event StatusWriteFailed (once) with the HTTP status; cycle_errors_total{reason=StatusWriteFailed} "
        "on /metrics; the status catches up once the API answers"),
    "test_prometheus_answering_empty_vectors": (
        "Prometheus answering empty vectors",
        "treats the model as without series and holds its replicas",
        "MetricsAvailable False, reason MetricsMissing, message saying which pods were looked for"),
    "test_prometheus_answering_garbage_json": (
        "Prometheus answering garbage JSON",
        "gives the cycle's metrics up and holds replicas",
        "MetricsAvailable False, reason PrometheusError, message saying the answer could not be read"),
    "test_prometheus_answering_nan": (
        "Prometheus answering NaN for every sample",
        "treats the readings as wrong data (not zero demand, not missing series) and holds replicas",
        "MetricsAvailable False, reason MetricsInvalid, message quoting the non-finite values and the pods"),
    "test_settings_configmap_turned_invalid": (
        "settings ConfigMap turned invalid (a negative interval)",
        "keeps the last good settings and goes on; takes the next valid ConfigMap",
        "Warning Event InvalidSettings on the ConfigMap naming the field; cycle_errors_total{reason=InvalidSettings}; "
        "VA conditions unchanged"),
    "test_inventory_shrinks_below_current_use": (
        "inventory shrinks below current use (2 L4 replicas run, inventory says 1)",
        "removes nothing that runs; minReplicas stays the floor; scale-ups wait for free accelerators",
        "Actuated message saying how many are in use and how many available, and that nothing running is removed"),
    "test_demand_above_inventory": (
        "demand above what the inventory can serve",
        "keeps what runs, scales no further than the inventory, best-effort allocation",
        "OptimizationReady True, reason BestEffort, message with the shortfall in req/s; Warning Event Infeasible"),
    "test_many_invalid_variantautoscalings_at_once": (
        "22 kinds of invalid VariantAutoscaling created at once",
        "17 kinds are refused by the CRD schema (422); the other 5 are not acted on; the valid variant is still "
        "served",
        "the server's 422 message for the refused ones; a False Condition on each accepted one: InvalidSpec "
        "(maxReplicas 10^9), TargetNotFound, UnsupportedTargetKind, TargetConflict (a second VA on a managed "
        "Deployment)"),
    "test_watch_stream_dropped": (
        "watch streams cut, reconnects answered 503",
        "kopf reconnects with backoff; the loop keeps running on its interval",
        "nothing: conditions stay True; a spec change is applied as usual"),
    "test_target_deleted_and_recreated": (
        "target Deployment deleted while managed, then recreated",
        "stops scaling it; picks it up again once it exists",
        "TargetResolved False, reason TargetNotFound, message naming the Deployment; Warning Event TargetNotFound"),
    "test_operator_killed_mid_make_before_break_and_restarted": (
        "operator SIGKILLed in the middle of a make-before-break swap (H100 to a cheaper L4 variant, L4 pods still "
        "starting), then restarted",
        "the restarted process reads the step from the cluster and resumes it: the L4 count written once, no second "
        "scale-up, the H100 replica removed only after an L4 replica is ready",
        "nothing but the restart: the model keeps a ready replica all along; conditions True once the swap ends"),
    "test_operator_killed_mid_swap_to_a_pd_pair_and_restarted": (
        "operator SIGKILLed in the middle of a swap from an H100 variant to a cheaper L4 prefill/decode pair, "
        "then restarted",
        "both halves scaled in one cycle, never one alone; the restarted process resumes: each half written once, "
        "the H100 replica removed only after both halves have a ready replica",
        "nothing but the restart: the model keeps a ready replica all along; conditions True once the swap ends"),
    "test_two_operator_replicas_at_once": (
        "two operator replicas at once (kopf peering, priorities 20 and 10)",
        "only the higher-priority replica writes replicas; the other stays paused and takes over when "
        "the first stops",
        "variant_autoscaler_active 1 on one replica's /metrics, 0 on the other's; recovery is the takeover time"),
}
RESULTS: dict[str, float] = {}


def _write_report() -> None:
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER, "| --- | --- | --- | --- |"]
    for test, (fault, does, sees) in ROWS.items():
        if test in RESULTS:
            took = RESULTS[test]
            lines.append(f"| {fault} | {does} | {sees} | {took:.1f} s ({took / INTERVAL_S:.0f} cycles of "
                         f"{INTERVAL_S} s) |")
    REPORT.write_text("\n".join(lines) + "\n")


class LogTap(logging.Handler):
    """Every log line the process emits while the matrix runs (formatted as a handler would write it)."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class Stack:
    """One namespace with a served model (fm-l4, minReplicas 1), its operator, and the two fault proxies."""

    def __init__(self, kube: Kube, op: OperatorThread, port: int, prom_proxy: FaultProxy, api_proxy: FaultProxy,
                 cluster):
        self.kube, self.op, self.port, self.prom_proxy, self.api_proxy, self.cluster = \
            kube, op, port, prom_proxy, api_proxy, cluster

    def invariants(self) -> None:
        """The four invariants; called on every poll while a fault lasts and while it recovers."""
        assert self.op.error is None and self.op._thread.is_alive(), f"operator ended: {self.op.error!r}"
        assert self.kube.replicas("fm-l4") >= 1, "fm-l4 went below its minReplicas"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            assert resp.status == 200 and b"variant_autoscaler_" in resp.read()
        for cond in (self.kube.variant("fm-l4").get("status") or {}).get("conditions") or []:
            assert len(cond["message"].split()) >= 3, cond

    def wait(self, predicate, *, what: str, timeout_s: float = 60):
        def checked():
            self.invariants()
            return predicate()
        return wait_until(checked, timeout_s=timeout_s, what=what, interval_s=0.25)

    def condition(self, kind: str) -> dict:
        return self.kube.condition("fm-l4", kind) or {}

    def healthy(self) -> bool:
        conds = {k: self.condition(k) for k in ("MetricsAvailable", "Actuated", "OptimizationReady")}
        return (conds["MetricsAvailable"].get("status") == "True" and conds["Actuated"].get("status") == "True"
                and conds["OptimizationReady"].get("status") == "True")

    def recover(self, test: str) -> float:
        """After the fault is cleared: seconds until the variant is healthy again, recorded for the report."""
        start = time.monotonic()
        self.wait(self.healthy, what="recovery after the fault cleared", timeout_s=RECOVERY_CYCLES * INTERVAL_S + 30)
        took = time.monotonic() - start
        RESULTS[test] = took
        _write_report()
        return took


@pytest.fixture(scope="module")
def stack(emulated_cluster, kube_api, model_pods, prometheus, tmp_path_factory):  # noqa: F811
    from kubernetes import client

    pods, gateway = model_pods
    ns = f"fm-{int(time.time() * 1000) % 10**8}"
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    kube = Kube(kube_api, ns)
    kube.deploy("fm-l4", 1, _annotations(L4_PROFILE))
    kube.apply_variant(variant("fm-l4", "fm-l4", accelerator="L4", profile=L4_PROFILE, min_replicas=1,
                               max_replicas=4))
    prom_proxy = emulated_cluster.call(FaultProxy(upstream=prometheus.url).start)
    api_proxy = emulated_cluster.call(FaultProxy(upstream=emulated_cluster.url).start)
    tmp = tmp_path_factory.mktemp("fault-matrix")
    kubeconfig = tmp / "proxy.kubeconfig"
    kubeconfig.write_text(kubeconfig_text(api_proxy.url, emulated_cluster.token))
    # settings from a ConfigMap (re-read every cycle), so that rows can shrink the inventory or break them
    settings = settings_dict(interval_s=INTERVAL_S, watched_namespaces=[ns],
                             accelerators=[{"name": "L4", "cost_per_hour": 1.0, "available": 6}],
                             prometheus={"url": prom_proxy.url, "timeout_s": 1})
    core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=SETTINGS_CM),
                                                             data={"settings.yaml": yaml.safe_dump(settings)}))
    port = free_port()
    options = RunOptions(settings_configmap=SETTINGS_CM, operator_namespace=ns, kubeconfig=kubeconfig,
                         metrics_host="127.0.0.1", metrics_port=port, standalone=True, namespaces=(ns,),
                         instance="fault-matrix")
    loads = BackgroundLoop()
    stop = loads.run(_event())
    spec = LoadSpec(targets=[gateway.url], model=MODEL, phases=[{"duration_s": 590, "rate_rps": 1.5}], mix=MIX,
                    arrivals="uniform", drain_timeout_s=5, max_requests=5000, max_duration_s=600)
    load = loads.submit(generate_load(spec, stop))
    tap = LogTap()
    logging.getLogger().addHandler(tap)
    op = OperatorThread(options).__enter__()
    s = Stack(kube, op, port, prom_proxy, api_proxy, emulated_cluster)
    s.settings, s.tap = settings, tap
    try:
        s.wait(s.healthy, what="a healthy steady state (metrics from the real Prometheus)", timeout_s=90)
        _STACK[:] = [s]
        yield s
    finally:
        op.stop()
        logging.getLogger().removeHandler(tap)
        loads.loop.call_soon_threadsafe(stop.set)
        try:
            load.result(timeout=30)
        finally:
            loads.close()
            emulated_cluster.call(prom_proxy.stop)
            emulated_cluster.call(api_proxy.stop)
            core.delete_namespace(ns)
    assert op.error is None


def _until_cleared(rule: FaultRule) -> None:
    rule.times = rule.hits  # matches no more requests from now on


def test_prometheus_down(stack):
    """Prometheus unreachable for OUTAGE_S (the issue's 60 s, longer than the 10 s rate window and the
    staleness threshold): replicas held on every poll of the outage, the condition stays False all along."""
    replicas = stack.kube.replicas("fm-l4")
    start = time.monotonic()
    rule = stack.prom_proxy.add(FaultRule(path=r"^/api/v1/", status=0, times=10**6))
    cond = stack.wait(lambda: (c := stack.condition("MetricsAvailable")).get("reason") == "PrometheusError" and c,
                      what="MetricsAvailable False while Prometheus is down")
    assert cond["status"] == "False" and "held" in cond["message"]
    assert stack.kube.events("MetricsUnavailable", "fm-l4")

    def held_until_the_end() -> bool:
        assert stack.kube.replicas("fm-l4") == replicas, "replicas changed while Prometheus was down"
        assert stack.condition("MetricsAvailable").get("status") == "False", "metrics claimed while down"
        return time.monotonic() - start >= OUTAGE_S
    stack.wait(held_until_the_end, what=f"{OUTAGE_S} s without Prometheus", timeout_s=OUTAGE_S + 15)
    assert rule.hits >= OUTAGE_S // 2, rule.hits  # the operator kept asking all along
    _until_cleared(rule)
    stack.recover("test_prometheus_down")


def test_prometheus_slower_than_the_query_timeout(stack):
    rule = stack.prom_proxy.add(FaultRule(path=r"^/api/v1/", status=None, delay_s=3, times=10**6))
    cond = stack.wait(lambda: (c := stack.condition("MetricsAvailable")).get("reason") == "PrometheusError" and c,
                      what="MetricsAvailable False while Prometheus is slow")
    assert cond["status"] == "False" and "within" in cond["message"], cond
    replicas = stack.kube.replicas("fm-l4")
    stack.wait(lambda: rule.hits >= 5 * 4, what="several cycles with a slow Prometheus")
    assert stack.kube.replicas("fm-l4") == replicas
    _until_cleared(rule)
    stack.recover("test_prometheus_slower_than_the_query_timeout")


def _patch_spec(stack: Stack, spec: dict) -> None:
    """A merge patch (no resourceVersion): a get-then-replace races the operator's status writes (409)."""
    stack.kube.custom.patch_namespaced_custom_object("autoscaling.variant-autoscaler.io", "v1alpha1", stack.kube.ns,
                                                     "variantautoscalings", "fm-l4", {"spec": spec})


def _set_min(stack: Stack, replicas: int) -> None:
    _patch_spec(stack, {"minReplicas": replicas})


def _metrics(stack: Stack) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_api_5xx_on_scale_for_a_while(stack):
    rule = stack.api_proxy.add(FaultRule(method="PUT", path=r"/deployments/fm-l4/scale$", status=503, times=10**6))
    _set_min(stack, 2)
    cond = stack.wait(lambda: (c := stack.condition("Actuated")).get("reason") == "ScaleFailed" and c,
                      what="Actuated ScaleFailed while the API refuses scale writes")
    assert cond["status"] == "False" and "503" in cond["message"], cond
    assert stack.kube.replicas("fm-l4") == 1
    [event] = stack.kube.events("ScaleFailed", "fm-l4")
    assert event.type == "Warning"
    _until_cleared(rule)
    stack.recover("test_api_5xx_on_scale_for_a_while")
    assert stack.kube.replicas("fm-l4") == 2
    _set_min(stack, 1)


def test_api_409_on_scale(stack):
    """Someone else writes the Deployment between the operator's read and write of the Scale: two 409s in a row.
    The operator re-reads and repeats the write against the fresh resourceVersion (never a blind write) and
    says how many conflicts it resolved."""
    now = stack.kube.replicas("fm-l4")
    want = now + 1  # relative: the rows before may have left 1 or 2 replicas (scale-down takes its cycles)
    rule = stack.api_proxy.add(FaultRule(method="PUT", path=r"/deployments/fm-l4/scale$", status=409, times=2))
    _set_min(stack, want)
    cond = stack.wait(lambda: stack.kube.replicas("fm-l4") == want and "conflict" in
                      (c := stack.condition("Actuated")).get("message", "") and c,
                      what="the scale applied after the conflicts")
    assert rule.hits == 2 and cond["status"] == "True" and "2 conflict(s) resolved" in cond["message"], cond
    puts = [r for r in stack.api_proxy.log if r.method == "PUT" and r.path.endswith("/deployments/fm-l4/scale")]
    assert [r.status for r in puts[-3:]] == [409, 409, 200], [r.status for r in puts[-3:]]
    stack.recover("test_api_409_on_scale")
    assert stack.kube.replicas("fm-l4") == want
    _set_min(stack, 1)


def test_api_5xx_on_status_writes_for_a_while(stack):
    """The status subresource answers 503: the loop still decides and scales; since no Condition can be written,
    a Warning Event says so (once), /metrics counts the failed writes, and the status catches up afterwards."""
    ns = stack.kube.ns
    rule = stack.api_proxy.add(FaultRule(method="PATCH", path=rf"/namespaces/{ns}/variantautoscalings/fm-l4/status$",
                                         status=503, times=10**6))
    want = stack.kube.replicas("fm-l4") + 1
    _set_min(stack, want)
    generation = stack.kube.variant("fm-l4")["metadata"]["generation"]
    [event] = stack.wait(lambda: stack.kube.events("StatusWriteFailed", "fm-l4"), what="a StatusWriteFailed Event")
    assert event.type == "Warning" and "503" in event.message, event.message
    stack.wait(lambda: stack.kube.replicas("fm-l4") == want, what="the scale applied while status writes fail")
    assert (stack.kube.variant("fm-l4").get("status") or {}).get("observedGeneration") != generation
    assert 'variant_autoscaler_cycle_errors_total{reason="StatusWriteFailed"}' in _metrics(stack)
    hits = rule.hits
    stack.wait(lambda: rule.hits >= hits + 3, what="several cycles of failed status writes")
    assert len(stack.kube.events("StatusWriteFailed", "fm-l4")) == 1, "one Event per episode, not one per cycle"
    _until_cleared(rule)
    stack.wait(lambda: (stack.kube.variant("fm-l4").get("status") or {}).get("observedGeneration") == generation,
               what="the status caught up")
    stack.recover("test_api_5xx_on_status_writes_for_a_while")
    _set_min(stack, 1)


def _rewrite_samples(value: str | None):
    """A transform for the proxy: every sample of a Prometheus answer set to `value` (None: no samples at all)."""
    def transform(body: bytes) -> bytes:
        doc = json.loads(body)
        result = (doc.get("data") or {}).get("result")
        if isinstance(result, list):
            if value is None:
                result.clear()
            for series in result:
                if "value" in series:
                    series["value"][1] = value
                for point in series.get("values") or []:
                    point[1] = value
        return json.dumps(doc).encode()
    return transform


def _prometheus_answer_row(test: str, rule: FaultRule, reason: str, words: str) -> None:
    stack = _STACK[0]
    stack.prom_proxy.add(rule)
    cond = stack.wait(lambda: (c := stack.condition("MetricsAvailable")).get("reason") == reason and c,
                      what=f"MetricsAvailable {reason}")
    assert cond["status"] == "False" and words in cond["message"], cond
    replicas = stack.kube.replicas("fm-l4")
    hits = rule.hits
    stack.wait(lambda: rule.hits >= hits + 20, what="several cycles with the fault")
    assert stack.kube.replicas("fm-l4") == replicas
    _until_cleared(rule)
    stack.recover(test)


_STACK: list[Stack] = []


def test_prometheus_answering_empty_vectors(stack):
    _prometheus_answer_row("test_prometheus_answering_empty_vectors",
                           FaultRule(path=r"^/api/v1/", status=None, transform=_rewrite_samples(None), times=10**6),
                           "MetricsMissing", "fm-l4")


def test_prometheus_answering_garbage_json(stack):
    _prometheus_answer_row("test_prometheus_answering_garbage_json",
                           FaultRule(path=r"^/api/v1/", status=200, body=b'{"status": "success", "data": {"resul',
                                     times=10**6),
                           "PrometheusError", "Prometheus")


def test_prometheus_answering_nan(stack):
    _prometheus_answer_row("test_prometheus_answering_nan",
                           FaultRule(path=r"^/api/v1/", status=None, transform=_rewrite_samples("NaN"), times=10**6),
                           "MetricsInvalid", "non-finite")


def test_watch_stream_dropped(stack):
    ns = stack.kube.ns
    rule = stack.api_proxy.add(FaultRule(method="GET", path=rf"/namespaces/{ns}/variantautoscalings$", watch=True,
                                         status=503, times=3))
    stack.wait(lambda: stack.cluster.call(stack.api_proxy.drop_watches) >= 1, what="a watch to cut")
    start = len(stack.api_proxy.log)
    stack.wait(lambda: rule.hits == 3, what="three failed reconnects")
    stack.wait(lambda: any(r.status == 200 and "watch=true" in r.query and r.path.endswith("/variantautoscalings")
                           for r in stack.api_proxy.log[start:]), what="the watch re-established")
    assert stack.healthy()
    stack.recover("test_watch_stream_dropped")


def test_target_deleted_and_recreated(stack):
    from operator_harness import deployment

    stack.kube.apps.delete_namespaced_deployment("fm-l4", stack.kube.ns)
    floor_check = stack.invariants
    stack.invariants = lambda: None  # the Deployment is gone: only the operator-side invariants apply
    try:
        cond = wait_until(lambda: (c := stack.condition("TargetResolved")).get("reason") == "TargetNotFound" and c,
                          timeout_s=60, what="TargetNotFound")
        assert stack.op.error is None and 'variant_autoscaler_' in _metrics(stack)
        assert cond["status"] == "False" and "fm-l4" in cond["message"]
        assert stack.kube.events("TargetNotFound", "fm-l4")
        stack.kube.apps.create_namespaced_deployment(stack.kube.ns, deployment("fm-l4", 1, _annotations(L4_PROFILE)))
    finally:
        stack.invariants = floor_check
    stack.recover("test_target_deleted_and_recreated")


def _put_settings(stack: Stack, text: str) -> None:
    stack.kube.core.patch_namespaced_config_map(SETTINGS_CM, stack.kube.ns, {"data": {"settings.yaml": text}})


def _with_l4(stack: Stack, available: int) -> str:
    return yaml.safe_dump({**stack.settings, "accelerators": [{"name": "L4", "cost_per_hour": 1.0,
                                                               "available": available}]})


def test_settings_configmap_turned_invalid(stack):
    """The settings ConfigMap gets a negative interval: the last good settings stay in force, the loop goes on,
    a Warning Event on the ConfigMap names the field; a valid ConfigMap is taken up again."""
    before = stack.kube.replicas("fm-l4")
    _put_settings(stack, yaml.safe_dump({**stack.settings, "interval_s": -5}))
    [event] = stack.wait(lambda: [e for e in stack.kube.events("InvalidSettings", SETTINGS_CM)],
                         what="an InvalidSettings Event on the ConfigMap")
    assert event.type == "Warning" and "interval_s" in event.message and "last good" in event.message, event.message
    assert 'variant_autoscaler_cycle_errors_total{reason="InvalidSettings"}' in _metrics(stack)
    assert stack.healthy() and stack.kube.replicas("fm-l4") == before  # still running on the last good settings
    _put_settings(stack, yaml.safe_dump(stack.settings))
    stack.recover("test_settings_configmap_turned_invalid")
    assert len(stack.kube.events("InvalidSettings", SETTINGS_CM)) == 1


def test_inventory_shrinks_below_current_use(stack):
    """Two L4 replicas run, then the inventory says one L4: nothing running is removed to fit (the floor is
    minReplicas 2), and the conditions say the inventory is short."""
    _set_min(stack, 2)
    stack.wait(lambda: stack.kube.replicas("fm-l4") == 2 and stack.healthy(), what="two replicas running")
    _put_settings(stack, _with_l4(stack, 1))
    cond = stack.wait(lambda: "inventory:" in (c := stack.condition("Actuated")).get("message", "") and c,
                      what="Actuated naming the short inventory")
    assert cond["status"] == "True" and "2 L4 in use but 1 available" in cond["message"], cond
    assert "nothing running is removed" in cond["message"], cond
    hits = len(stack.api_proxy.log)
    stack.wait(lambda: len(stack.api_proxy.log) >= hits + 40, what="several cycles with the short inventory")
    assert stack.kube.replicas("fm-l4") == 2
    _put_settings(stack, yaml.safe_dump(stack.settings))
    _set_min(stack, 1)
    stack.recover("test_inventory_shrinks_below_current_use")


def test_demand_above_inventory(stack):
    """One L4 in the inventory, and a VA profile that needs several replicas for the load: the running replica
    stays, no scale-up beyond the inventory, a best-effort condition and an Infeasible Event name the shortfall."""
    _put_settings(stack, _with_l4(stack, 1))
    stack.wait(lambda: stack.kube.replicas("fm-l4") == 1, what="one replica", timeout_s=60)
    slow = {**L4_PROFILE, "decodePerSeqSeconds": 0.025}  # ~0.4 req/s a replica at the SLO: 1.5 req/s needs ~4
    _patch_spec(stack, {"profile": {"parametric": slow}})
    cond = stack.wait(lambda: (c := stack.condition("OptimizationReady")).get("reason") == "BestEffort" and c,
                      what="OptimizationReady BestEffort")
    assert "short by" in cond["message"], cond
    assert stack.kube.events("Infeasible", "fm-l4")
    hits = len(stack.api_proxy.log)
    stack.wait(lambda: len(stack.api_proxy.log) >= hits + 40, what="several cycles above the inventory")
    assert stack.kube.replicas("fm-l4") == 1
    _patch_spec(stack, {"profile": {"parametric": L4_PROFILE}})
    _put_settings(stack, yaml.safe_dump(stack.settings))
    stack.recover("test_demand_above_inventory")


# spec overrides (None deletes the field) for >= 20 kinds of invalid VariantAutoscaling; the server's schema
# rejects some, the operator must give each of the rest a Condition saying what is wrong
INVALID_SPECS: dict[str, dict] = {
    "min-above-max": {"minReplicas": 3, "maxReplicas": 2},
    "negative-min": {"minReplicas": -1},
    "min-as-text": {"minReplicas": "two"},
    "huge-max": {"maxReplicas": 10**9},
    "no-model": {"modelID": None},
    "empty-model": {"modelID": ""},
    "unknown-model": {"modelID": "no/such-model"},
    "unknown-accelerator": {"accelerator": "Z99"},
    "empty-accelerator": {"accelerator": ""},
    "no-target-name": {"scaleTargetRef": {"kind": "Deployment"}},
    "missing-target": {"scaleTargetRef": {"kind": "Deployment", "name": "fm-nowhere"}},
    "unsupported-kind": {"scaleTargetRef": {"kind": "CronJob", "name": "fm-l4"}},
    "target-as-text": {"scaleTargetRef": "fm-l4"},
    "negative-ttft": {"slo": {"ttftSeconds": -1, "itlSeconds": 0.09, "percentile": 90}},
    "percentile-over-100": {"slo": {"ttftSeconds": 0.6, "itlSeconds": 0.09, "percentile": 150}},
    "zero-itl": {"slo": {"ttftSeconds": 0.6, "itlSeconds": 0, "percentile": 90}},
    "negative-profile": {"profile": {"parametric": {**L4_PROFILE, "decodeBaseSeconds": -0.04}}},
    "nan-profile-text": {"profile": {"parametric": {**L4_PROFILE, "decodePerSeqSeconds": "NaN"}}},
    "empty-profile": {"profile": {}},
    "zero-max-batch": {"maxBatch": 0},
    "bad-behavior-policy": {"behavior": {"scaleUp": {"policies": [{"type": "Pods", "value": 0, "periodSeconds": 60}]}}},
    "bad-select-policy": {"behavior": {"scaleDown": {"selectPolicy": "Sometimes"}}},
}


def test_many_invalid_variantautoscalings_at_once(stack):
    """22 kinds of invalid VariantAutoscaling created at once on the real CRD server: what the schema rejects
    is refused there (422, with its message); every one it accepts gets a False Condition with a reason in words;
    the valid variant goes on being served."""
    from kubernetes.client.exceptions import ApiException

    base = variant("x", "fm-l4", accelerator="L4", profile=L4_PROFILE, min_replicas=1, max_replicas=4)["spec"]
    rejected, accepted = {}, []
    for name, over in INVALID_SPECS.items():
        spec = {k: v for k, v in {**base, **over}.items() if v is not None}
        body = {"apiVersion": "autoscaling.variant-autoscaler.io/v1alpha1", "kind": "VariantAutoscaling",
                "metadata": {"name": f"bad-{name}"}, "spec": spec}
        try:
            stack.kube.custom.create_namespaced_custom_object("autoscaling.variant-autoscaler.io", "v1alpha1",
                                                              stack.kube.ns, "variantautoscalings", body)
            accepted.append(f"bad-{name}")
        except ApiException as err:
            assert err.status == 422, (name, err.status, err.body)
            rejected[name] = json.loads(err.body)["message"]
    assert len(INVALID_SPECS) >= 20 and rejected and accepted, (rejected, accepted)

    def explained(name: str) -> dict | None:
        conds = (stack.kube.variant(name).get("status") or {}).get("conditions") or []
        bad = [c for c in conds if c["status"] == "False" and c["type"] != "Ready"]
        return bad[0] if bad and all(len(c["message"].split()) >= 3 for c in bad) else None

    try:
        got = stack.wait(lambda: (c := {n: explained(n) for n in accepted}) and all(c.values()) and c,
                         what="a False Condition on every accepted invalid VA")
        assert stack.healthy() and stack.kube.replicas("fm-l4") >= 1
        REASONS.update({n: f"{c['type']} {c['reason']}" for n, c in got.items()})
    finally:
        for name in accepted:
            stack.kube.custom.delete_namespaced_custom_object("autoscaling.variant-autoscaler.io", "v1alpha1",
                                                              stack.kube.ns, "variantautoscalings", name)
    # the table's words: which kinds the schema refuses and what the operator says about the rest
    assert (len(rejected), len(accepted)) == (17, 5), (sorted(rejected), REASONS)
    assert REASONS["bad-missing-target"] == "TargetResolved TargetNotFound"
    assert REASONS["bad-unsupported-kind"] == "OptimizationReady UnsupportedTargetKind"
    assert REASONS["bad-huge-max"] == "OptimizationReady InvalidSpec"
    # a second VA on fm-l4's Deployment (unknown model or accelerator) is refused as a conflict, never obeyed
    assert REASONS["bad-unknown-model"] == REASONS["bad-unknown-accelerator"] == "OptimizationReady TargetConflict"
    stack.recover("test_many_invalid_variantautoscalings_at_once")


REASONS: dict[str, str] = {}


# --- operator killed in the middle of a make-before-break step, and restarted --------------------------------------
SWAP_MODEL = {**TINY_MODEL, "name": "tiny/swap-1b"}  # a model of its own: the gateway routes only this row's load
SWAP_READY_DELAY_S = 12  # the new variant's cold start: long enough to kill the operator while it waits


class OperatorProcess:
    """`variant-autoscaler run` as a child process, so that it can be SIGKILLed like a pod's container."""

    def __init__(self, settings: Path, ns: str, kubeconfig: Path, log: Path):
        import subprocess
        import sys

        self.port = free_port()
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "variant_autoscaler", "run", "--settings", str(settings), "-n", ns,
                 "--standalone", "--kubeconfig", str(kubeconfig), "--metrics-host", "127.0.0.1",
                 "--metrics-port", str(self.port)], stdout=out, stderr=out)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def up(self) -> bool:
        try:
            return "variant_autoscaler_" in self.metrics()
        except OSError:
            return False

    def kill(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except Exception:  # noqa: BLE001 - bounded: a stuck one is killed
                self.proc.kill()
                self.proc.wait(timeout=10)


def _scale_writes(cluster, ns: str, name: str) -> list[tuple[float, int]]:
    """(time, replicas) of every scale write the operator sent for one Deployment, from the API's request log."""
    out = []
    for r in list(cluster.core.requests):
        if r.method in ("PUT", "PATCH") and r.namespace == ns and r.name == name and r.subresource == "scale" \
                and r.user_agent.startswith("variant-autoscaler/"):
            out.append((r.time, int(json.loads(r.body)["spec"]["replicas"])))
    return out


def test_operator_killed_mid_make_before_break_and_restarted(emulated_cluster, kube_api, model_pods, prometheus,  # noqa: F811
                                                              tmp_path):
    """An H100 variant serves a model, an L4 variant of the same model is cheaper: the operator scales the L4 one
    up and holds the H100 one until the L4 replicas are ready (make-before-break). While the L4 pods are still
    starting the operator is SIGKILLed, then started again. The restarted one resumes the step: no second
    scale-up of L4 for the same step (each replica count is written once and never beyond the final one), the
    H100 replica goes only after an L4 replica is ready, the model is never without a ready replica, and the
    new process answers /metrics and sets every condition True."""
    _kill_mid_swap("test_operator_killed_mid_make_before_break_and_restarted", (("swap-l4", "both"),),
                   emulated_cluster, kube_api, model_pods, prometheus, tmp_path)


def test_operator_killed_mid_swap_to_a_pd_pair_and_restarted(emulated_cluster, kube_api, model_pods,  # noqa: F811
                                                            prometheus, tmp_path):  # noqa: F811
    """The same, with an L4 prefill/decode pair as the cheaper replacement: both halves are scaled in the same
    cycle (never one alone), the H100 replica stays until each half has a ready replica, across the restart."""
    _kill_mid_swap("test_operator_killed_mid_swap_to_a_pd_pair_and_restarted",
                   (("swap-pre", "prefill"), ("swap-dec", "decode")),
                   emulated_cluster, kube_api, model_pods, prometheus, tmp_path)


def _kill_mid_swap(test: str, new: tuple[tuple[str, str], ...], emulated_cluster, kube_api, model_pods,  # noqa: F811
                   prometheus, tmp_path) -> None:  # noqa: F811
    from kubernetes import client
    from operator_harness import H100_PROFILE
    from variant_autoscaler_testbed.kubelet import START_DELAY_ANNOTATION
    from variant_autoscaler_testbed.model_pods import model_server_annotation

    pods, gateway = model_pods
    ns = f"fm-swap-{int(time.time() * 1000) % 10**8}"
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    kube = Kube(kube_api, ns)
    names = [name for name, _ in new]

    def annotations(profile: dict, **extra) -> dict:
        from operator_harness import server_profile

        return {**model_server_annotation({"model": SWAP_MODEL["name"], "profile": server_profile(profile),
                                           "max_batch": 32}), **extra}

    kube.deploy("swap-h100", 1, annotations(H100_PROFILE))
    kube.apply_variant(variant("swap-h100", "swap-h100", accelerator="H100", profile=H100_PROFILE, min_replicas=0,
                               max_replicas=4, model=SWAP_MODEL["name"]))
    for name, role in new:
        kube.deploy(name, 0, annotations(L4_PROFILE, **{START_DELAY_ANNOTATION: str(SWAP_READY_DELAY_S)}))
        kube.apply_variant(variant(name, name, accelerator="L4", profile=L4_PROFILE, min_replicas=0, max_replicas=4,
                                   model=SWAP_MODEL["name"], role=role))
    kube.wait_ready("swap-h100", 1)
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump(settings_dict(interval_s=INTERVAL_S, watched_namespaces=[ns],
                                                     models=[TINY_MODEL, SWAP_MODEL],
                                                     prometheus={"url": prometheus.url, "timeout_s": 2})))
    log = tmp_path / "operator.log"
    loads = BackgroundLoop()
    stop = loads.run(_event())
    spec = LoadSpec(targets=[gateway.url], model=SWAP_MODEL["name"], phases=[{"duration_s": 120, "rate_rps": 1.5}],
                    mix=MIX, arrivals="uniform", drain_timeout_s=5, max_requests=1000, max_duration_s=130)
    load = loads.submit(generate_load(spec, stop))
    seen_unready_at = [0.0]  # the last poll that saw the replacement without a ready replica (of each half)

    def serving() -> int:
        """Ready replicas of the replacement (of a pair: of its less ready half)."""
        return min(kube.ready(n) for n in names)

    def invariants(op: OperatorProcess) -> None:
        assert op.proc.poll() is None, f"operator exited {op.proc.returncode}: {log.read_text()[-2000:]}"
        new_ready, h100 = serving(), kube.replicas("swap-h100")
        if new_ready == 0:
            seen_unready_at[0] = time.time()
            assert h100 >= 1, "the H100 replica was removed before its replacement had a ready replica"
        assert new_ready + kube.ready("swap-h100") >= 1, "the model was left without a ready replica"
        for va in ("swap-h100", *names):
            for cond in (kube.variant(va).get("status") or {}).get("conditions") or []:
                assert len(cond["message"].split()) >= 3, cond

    def watch(op, predicate, what: str, timeout_s: float = 60):
        return wait_until(lambda: (invariants(op), predicate())[1], timeout_s=timeout_s, what=what, interval_s=0.25)

    first = OperatorProcess(settings, ns, emulated_cluster.kubeconfig_path, log)
    second = None
    try:
        watch(first, lambda: all(kube.replicas(n) >= 1 for n in names), what="the replacement scaled up")
        assert serving() == 0 and kube.replicas("swap-h100") == 1, "not in the middle of the step"
        step = {n: _scale_writes(emulated_cluster, ns, n) for n in names}
        first.kill()
        second = OperatorProcess(settings, ns, emulated_cluster.kubeconfig_path, log)
        restarted = time.monotonic()
        watch(second, second.up, what="the restarted operator's /metrics")
        assert serving() == 0, "the step ended before the restart could resume it"

        def swapped() -> bool:
            conds = [{c["type"]: c["status"] for c in (kube.variant(n).get("status") or {}).get("conditions") or []}
                     for n in names]
            return (kube.replicas("swap-h100") == 0 and all(kube.ready(n) == kube.replicas(n) >= 1 for n in names)
                    and all(c.get("MetricsAvailable") == c.get("Actuated") == "True" for c in conds))
        watch(second, swapped, what="the swap completed by the restarted operator",
              timeout_s=SWAP_READY_DELAY_S + RECOVERY_CYCLES * INTERVAL_S + 30)
        took = time.monotonic() - restarted
        assert "variant_autoscaler_" in second.metrics()
        for n in names:
            writes = _scale_writes(emulated_cluster, ns, n)
            values = [v for _, v in writes]
            assert writes[:len(step[n])] == step[n] and values == sorted(set(values)), f"{n} scaled up twice: {values}"
            assert max(values) == kube.replicas(n), f"{n} overshot and came back: {values}"
        if len(names) == 2:  # the halves' first writes in one cycle: no VA status written between them
            firsts = sorted(_scale_writes(emulated_cluster, ns, n)[0][0] for n in names)
            between = [r for r in list(emulated_cluster.core.requests) if r.namespace == ns
                       and r.subresource == "status" and r.resource == "variantautoscalings"
                       and firsts[0] < r.time < firsts[1]]
            assert not between, "one half of the P/D pair was scaled a cycle before the other"
        h100 = _scale_writes(emulated_cluster, ns, "swap-h100")
        assert [v for _, v in h100] == [0], h100
        assert h100[0][0] > seen_unready_at[0], "H100 scaled down while its replacement had no ready replica"
        RESULTS[test] = took
        _write_report()
    finally:
        for op in (first, second):
            if op is not None:
                op.stop()
        loads.loop.call_soon_threadsafe(stop.set)
        try:
            load.result(timeout=30)
        finally:
            loads.close()
            core.delete_namespace(ns)


def test_two_operator_replicas_at_once(emulated_cluster, kube_api, kube_namespace, tmp_path):
    """Two replicas of the operator on one namespace with kopf peering (priorities 20 and 10): only the
    higher one writes replicas (judged from the API's request log by User-Agent), the other reports
    variant_autoscaler_active 0; when the active one stops, the other takes over. Recovery: from the active
    replica's stop to the other applying a change. (tests/test_operator_kopf.py tests the same peering through
    `kopf run -A` and a priority tie.)"""
    kube = Kube(kube_api, kube_namespace)
    kube.deploy("peer-l4", 1)
    kube.apply_variant(variant("peer-l4", "peer-l4", profile=L4_PROFILE, min_replicas=2))
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(settings_dict(interval_s=INTERVAL_S, watched_namespaces=[kube_namespace],
                                                 prometheus={"url": f"http://127.0.0.1:{free_port()}",
                                                             "timeout_s": 0.5})))

    def options(instance: str, priority: int) -> RunOptions:
        return RunOptions(settings_file=path, kubeconfig=emulated_cluster.kubeconfig_path, metrics_host="127.0.0.1",
                          metrics_port=free_port(), namespaces=(kube_namespace,), peering="fm-peers",
                          priority=priority, peering_grace_s=1, instance=instance)

    def writers() -> list[str]:
        return [r.user_agent for r in list(emulated_cluster.core.requests)
                if r.method == "PUT" and r.namespace == kube_namespace and r.name == "peer-l4"
                and r.subresource == "scale"]

    def active(op: OperatorThread) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{op.options.metrics_port}/metrics", timeout=5) as resp:
            line = next(x for x in resp.read().decode().splitlines() if x.startswith("variant_autoscaler_active "))
        return float(line.split()[1])

    def check(ops, predicate):
        for op in ops:
            assert op.error is None and op._thread.is_alive(), f"operator ended: {op.error!r}"
        assert kube.replicas("peer-l4") >= 1
        for cond in (kube.variant("peer-l4").get("status") or {}).get("conditions") or []:
            assert len(cond["message"].split()) >= 3, cond
        return predicate()

    with OperatorThread(options("fm-high", 20)) as high, OperatorThread(options("fm-low", 10)) as low:
        wait_until(lambda: check((high, low), lambda: kube.replicas("peer-l4") == 2), timeout_s=40,
                   what="the active replica to scale")
        _set_min_of(kube, "peer-l4", 3)
        wait_until(lambda: check((high, low), lambda: kube.replicas("peer-l4") == 3), timeout_s=30,
                   what="the active replica to apply a change")
        assert set(writers()) == {"variant-autoscaler/fm-high"}, writers()
        assert (active(high), active(low)) == (1.0, 0.0)
        high.stop()
        stopped = time.monotonic()
        _set_min_of(kube, "peer-l4", 4)
        wait_until(lambda: check((low,), lambda: kube.replicas("peer-l4") == 4), timeout_s=60,
                   what="the other replica to take over")
        took = time.monotonic() - stopped
        assert writers()[-1] == "variant-autoscaler/fm-low" and set(writers()) == {
            "variant-autoscaler/fm-high", "variant-autoscaler/fm-low"}, writers()
        assert active(low) == 1.0
    assert high.error is None and low.error is None
    RESULTS["test_two_operator_replicas_at_once"] = took
    _write_report()


def _set_min_of(kube: Kube, name: str, replicas: int) -> None:
    kube.custom.patch_namespaced_custom_object("autoscaling.variant-autoscaler.io", "v1alpha1", kube.ns,
                                               "variantautoscalings", name, {"spec": {"minReplicas": replicas}})


def test_api_token_never_in_logs_events_status_or_metrics(stack):
    """Security basics (issue 10 part 3): after every fault above, the bearer token the operator uses
    for the API server appears in no log line it emitted, no Event, no VariantAutoscaling status and
    not on /metrics (faults are where error paths dump requests, so this runs last)."""
    token = stack.cluster.token
    assert len(token) >= 16 and stack.tap.lines, "no log lines captured: the tap is not attached"
    assert not [line for line in stack.tap.lines if token in line]
    events = stack.kube.core.list_namespaced_event(stack.kube.ns).items
    assert events and not [e for e in events if token in f"{e.message} {e.reason}"]
    assert token not in json.dumps(stack.kube.variant("fm-l4").get("status") or {})
    assert token not in _metrics(stack)


def test_results_table_lists_every_row():
    """Runs last: every row wrote its measured recovery time into reports/fault-matrix.md."""
    text = REPORT.read_text()
    for fault, _, _ in ROWS.values():
        assert f"| {fault} |" in text, fault
    assert json.dumps(RESULTS) and set(RESULTS) == set(ROWS)


"""The Prometheus side of deploy/: alert rules (promtool check + promtool unit tests of each alert) and
the vLLM scrape config, run for real.

Why unit-test alerts: an alert that never fires looks exactly like a healthy system. promtool's rule
tests feed synthetic series through the real rule engine and say which alerts fire when. Why run the
scrape config: its relabelling decides whether the operator sees `namespace` and `pod` on vLLM
series and whether the colons of vLLM names survive; only a real scrape shows that. Debian's
Prometheus is built without Kubernetes service discovery, so the test replaces
`kubernetes_sd_configs` with static targets carrying the same `__meta_kubernetes_*` labels that
discovery would attach, and keeps every relabel rule as written.
"""

from __future__ import annotations

import asyncio
import copy
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yaml"
SCRAPE = PROMETHEUS_DIR / "scrape-vllm.yaml"
IN_CLUSTER = PROMETHEUS_DIR / "in-cluster-prometheus.yaml"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool not found on PATH: install Debian package `prometheus` (`make system-deps`)")
    return found


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd)


def test_alert_rules_pass_promtool_check(promtool):
    done = _run([promtool, "check", "rules", str(ALERTS)])
    assert done.returncode == 0, done.stdout + done.stderr
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


# Each case: series (promtool's expanding notation, one sample per minute), the minute to evaluate at,
# and the alerts expected to fire then (with their labels). Healthy twins must fire nothing.
V = "variant_autoscaler_"
VARIANT = 'namespace="llm",variant="v1",model="m"'
ALERT_CASES = {
    "stalled": ([(f"{V}last_successful_cycle_timestamp_seconds", "0x30"), (f"{V}active", "1x30")], 10,
                {"VariantAutoscalerOptimizationStalled": [{"severity": "critical"}]}),
    "cycling": ([(f"{V}last_successful_cycle_timestamp_seconds", "0+60x30"), (f"{V}active", "1x30")], 10, {}),
    "standby only": ([(f"{V}active", "0x30")], 10, {"VariantAutoscalerNoActiveReplica": [{"severity": "critical"}]}),
    "metrics missing": ([(f"{V}metrics_available{{{VARIANT}}}", "0x30")], 15,
                        {"VariantAutoscalerMetricsMissing": [
                            {"severity": "warning", "namespace": "llm", "variant": "v1", "model": "m"}]}),
    "metrics present": ([(f"{V}metrics_available{{{VARIANT}}}", "1x30")], 15, {}),
    "inventory exhausted": ([(f'{V}inventory_in_use{{accelerator="H100"}}', "8x30"),
                             (f'{V}inventory_available{{accelerator="H100"}}', "8x30"),
                             (f'{V}inventory_in_use{{accelerator="L4"}}', "2x30"),
                             (f'{V}inventory_available{{accelerator="L4"}}', "8x30"),
                             (f'{V}unmet_demand_rps{{model="m"}}', "0.5x30")], 20,
                            {"VariantAutoscalerInventoryExhausted": [{"severity": "warning", "accelerator": "H100"}],
                             "VariantAutoscalerDemandUnmet": [{"severity": "warning", "model": "m"}]}),
    "inventory full, demand met": ([(f'{V}inventory_in_use{{accelerator="H100"}}', "8x30"),
                                    (f'{V}inventory_available{{accelerator="H100"}}', "8x30"),
                                    (f'{V}unmet_demand_rps{{model="m"}}', "0x30")], 20, {}),
    "thrash": ([(f'{V}scaling_actions_total{{namespace="llm",variant="v1",direction="up"}}', "0+1x90"),
                (f'{V}scaling_actions_total{{namespace="llm",variant="v1",direction="down"}}', "0+1x90")], 80,
               {"VariantAutoscalerScalingThrash": [{"severity": "warning", "namespace": "llm", "variant": "v1"}]}),
    "steady ramp up": ([(f'{V}scaling_actions_total{{namespace="llm",variant="v1",direction="up"}}', "0+1x90")], 80, {}),
    "errors": ([(f'{V}cycle_errors_total{{reason="PrometheusUnreachable"}}', "0+1x30")], 20,
               {"VariantAutoscalerCycleErrors": [{"severity": "warning", "reason": "PrometheusUnreachable"}]}),
    "overloaded": ([(f'{V}model_normalized_load{{model="m"}}', "1.4x30")], 15,
                   {"VariantAutoscalerSLOAtRisk": [{"severity": "warning", "model": "m"}]}),
    "at capacity": ([(f'{V}model_normalized_load{{model="m"}}', "0.95x30")], 15, {}),
}


def _alert_names() -> list[str]:
    return [r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_every_alert_has_a_firing_case():
    fired = {name for _, _, expected in ALERT_CASES.values() for name in expected}
    assert fired == set(_alert_names())


@pytest.mark.parametrize("case", sorted(ALERT_CASES))
def test_alert_fires_exactly_when_it_should(promtool, tmp_path, case):
    series, minute, expected = ALERT_CASES[case]
    alertcheck = [{"eval_time": f"{minute}m", "alertname": name,
                   "exp_alerts": [{"exp_labels": labels} for labels in expected.get(name, [])]}
                  for name in _alert_names()]
    # Annotations are left out here (promtool would compare their text); the test below checks that
    # the labels they name are labels the alert really has.
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump({"groups": groups}))
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({
        "rule_files": ["alerts.yaml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series],
                   "alert_rule_test": alertcheck}]}))
    done = _run([promtool, "test", "rules", "test.yaml"], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_annotations_name_only_labels_the_firing_alert_has():
    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    for _series, _minute, expected in ALERT_CASES.values():
        for name, alerts in expected.items():
            text = " ".join(rules[name]["annotations"].values())
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert all(label in labels for labels in alerts), f"{name} names $labels.{label}"


# ------------------------------------------------------------------------------------------------
# The scrape config, for real.


def _static(job: dict, targets: list[tuple[str, dict[str, str]]]) -> dict:
    """The job with Kubernetes discovery replaced by static targets carrying discovery's meta labels."""
    job = copy.deepcopy(job)
    job.pop("kubernetes_sd_configs")
    job["static_configs"] = [{"targets": [address], "labels": labels} for address, labels in targets]
    job["scrape_interval"] = "1s"
    job["scrape_timeout"] = "1s"
    return job


def _pod(address: str, namespace: str, pod: str, *, scrape: str, port: str, phase: str = "Running",
         variant: str | None = None) -> tuple[str, dict[str, str]]:
    host = address.split(":")[0]
    labels = {"__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_name": pod,
              "__meta_kubernetes_pod_phase": phase,
              "__meta_kubernetes_pod_annotation_prometheus_io_scrape": scrape,
              "__meta_kubernetes_pod_annotation_prometheus_io_port": port,
              "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics"}
    if variant:
        labels["__meta_kubernetes_pod_label_variant_autoscaler_io_variant"] = variant
    return f"{host}:8000", labels


class _BackgroundServers:
    """An emulated vLLM server and the operator's exporter on 127.0.0.1, in one event loop thread."""

    def __enter__(self):
        from variant_autoscaler.exporter import DecisionSnapshot, Exporter, MetricsServer, VariantReading
        from variant_autoscaler_testbed.model_server import EmulatedModelServer, ModelServerConfig

        from optimizer.profile import ParametricProfile

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        profile = ParametricProfile(decode_base_s=0.01, prefill_per_token_s=0.0001)
        self.vllm = EmulatedModelServer(ModelServerConfig(model="meta-llama/Llama-3.1-8B-Instruct", profile=profile))
        exporter = Exporter()
        exporter.publish(DecisionSnapshot(variants=[VariantReading(
            namespace="llm-serving", name="llama-8b-l4", model="meta-llama/Llama-3.1-8B-Instruct", accelerator="L4",
            current_replicas=1, ready_replicas=1, desired_replicas=3)]))
        self.exporter = MetricsServer(exporter)
        self._call(self.vllm.start())
        self._call(self.exporter.start())
        return self

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def __exit__(self, *exc):
        self._call(self.vllm.stop())
        self._call(self.exporter.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


def test_scrape_config_keeps_namespace_pod_and_vllm_names(promtool, tmp_path):
    from variant_autoscaler_testbed.prometheus import PrometheusNotInstalled, PrometheusServer

    jobs = {job["job_name"]: job for job in yaml.safe_load(SCRAPE.read_text())["scrape_configs"]}
    assert set(jobs) == {"vllm", "variant-autoscaler"}
    with _BackgroundServers() as servers:
        vllm_port = str(servers.vllm.port)
        operator_address = servers.exporter.url.removeprefix("http://")
        pods = [
            _pod("127.0.0.1:8000", "llm-serving", "llama-8b-l4-7d9f8c6b5-x2x4q", scrape="true", port=vllm_port,
                 variant="llama-8b-l4"),
            _pod("127.0.0.1:8000", "llm-serving", "not-annotated-0", scrape="false", port=vllm_port),
            _pod("127.0.0.1:8000", "llm-serving", "pending-0", scrape="true", port=vllm_port, phase="Pending"),
        ]
        endpoint = {"__meta_kubernetes_service_label_app_kubernetes_io_name": "variant-autoscaler",
                    "__meta_kubernetes_service_label_app_kubernetes_io_component": "metrics",
                    "__meta_kubernetes_endpoint_port_name": "metrics",
                    "__meta_kubernetes_namespace": "platform", "__meta_kubernetes_pod_name": "va-0"}
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [_static(jobs["vllm"], pods),
                                     _static(jobs["variant-autoscaler"], [(operator_address, endpoint)])]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        done = _run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
        assert done.returncode == 0, done.stdout + done.stderr

        class ConfiguredPrometheus(PrometheusServer):
            def _config(self) -> dict:
                return config

        try:
            prometheus = ConfiguredPrometheus()
        except PrometheusNotInstalled as err:
            pytest.skip(str(err))
        with prometheus:
            waiting = prometheus.wait_for('vllm:num_requests_waiting{job="vllm"}', timeout_s=30)
            desired = prometheus.wait_for('variant_autoscaler_desired_replicas{job="variant-autoscaler"}',
                                          timeout_s=30)
            targets = prometheus.query('up{job="vllm"}')
    assert [s["metric"]["pod"] for s in targets] == ["llama-8b-l4-7d9f8c6b5-x2x4q"], "only annotated running pods"
    (series,) = waiting
    assert series["metric"]["namespace"] == "llm-serving"
    assert series["metric"]["pod"] == "llama-8b-l4-7d9f8c6b5-x2x4q"
    assert series["metric"]["variant"] == "llama-8b-l4"
    assert series["metric"]["model_name"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert series["metric"]["instance"] == f"127.0.0.1:{vllm_port}", "the annotated port replaces the pod port"
    (decision,) = desired
    assert decision["metric"]["namespace"] == "llm-serving", "honor_labels keeps the variant's namespace"
    assert "exported_namespace" not in decision["metric"]
    assert float(decision["value"][1]) == 3


def test_in_cluster_prometheus_uses_the_same_jobs_and_alerts(promtool, tmp_path):
    docs = [d for d in yaml.safe_load_all(IN_CLUSTER.read_text()) if d]
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    config = yaml.safe_load(configmap["data"]["prometheus.yml"])
    assert config["scrape_configs"] == yaml.safe_load(SCRAPE.read_text())["scrape_configs"]
    assert yaml.safe_load(configmap["data"]["alerts.yaml"]) == {
        "groups": yaml.safe_load(ALERTS.read_text())["groups"]}
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    mount = deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]
    assert config["rule_files"] == [f"{mount}/alerts.yaml"]
    (tmp_path / "alerts.yaml").write_text(configmap["data"]["alerts.yaml"])
    config["rule_files"] = [str(tmp_path / "alerts.yaml")]
    config["scrape_configs"] = [_static(job, [("127.0.0.1:1", {})]) for job in config["scrape_configs"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = _run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert done.returncode == 0, done.stdout + done.stderr

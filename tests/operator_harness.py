"""Test machinery for the operator: objects on the emulated cluster, observations, an operator thread.

Imported by the operator test modules (`from operator_harness import ...`). `observations`/`Demand`
(from variant_autoscaler_testbed.observations) are what the collector would have returned, fed to
the controller the way the benchmark feeds pre-collected observations; the collector itself meets
the real Prometheus in test_collector.py and end to end in test_operator_e2e.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
from kubernetes import client
from variant_autoscaler_testbed.observations import Demand, observations

__all__ = ["Demand", "observations"]

GROUP, VERSION, PLURAL = "autoscaling.variant-autoscaler.io", "v1alpha1", "variantautoscalings"
TINY_MODEL = {"name": "tiny/chat-1b", "weight_gb": 2.0, "kv_bytes_per_token": 131072.0}
# Slow on purpose, so that a few requests per second need several replicas. At the SLO below, for
# 100-in/40-out requests: one "L4" replica serves ~2.3 req/s for $1/h ($0.44 per req/s), one "H100"
# ~12 req/s for $8/h ($0.67 per req/s), and a "T4" replica ($0.3/h) cannot meet the ITL target at all.
L4_PROFILE = {"decodeBaseSeconds": 0.04, "decodePerSeqSeconds": 0.004, "prefillPerTokenSeconds": 0.0002}
H100_PROFILE = {"decodeBaseSeconds": 0.02, "decodePerSeqSeconds": 0.0012, "prefillPerTokenSeconds": 0.00005}
T4_PROFILE = {"decodeBaseSeconds": 0.12, "decodePerSeqSeconds": 0.01, "prefillPerTokenSeconds": 0.0006}
SLO = {"ttftSeconds": 0.6, "itlSeconds": 0.09, "percentile": 90}


def settings_dict(**over) -> dict:
    base = {
        "interval_s": 2, "rate_window_s": 10, "staleness_threshold_s": 10,
        "scale_up_window_s": 0, "scale_down_window_s": 0,
        "accelerators": [{"name": "L4", "cost_per_hour": 1.0, "available": 6},
                         {"name": "H100", "cost_per_hour": 8.0, "available": 4},
                         {"name": "T4", "cost_per_hour": 0.3, "available": 8}],
        "models": [TINY_MODEL],
        "default_slo": {"ttft_s": 0.6, "itl_s": 0.09},
        "api_retries": 4, "api_backoff_s": 0.05,
    }
    base.update(over)
    return base


def server_profile(profile: dict) -> dict:
    """The CRD's camelCase parametric profile in the optimizer's snake_case form (for emulated servers)."""
    from variant_autoscaler.resources import profile_from_document

    return profile_from_document({"parametric": profile}, "profile").model_dump()


def deployment(name: str, replicas: int, annotations: dict | None = None) -> dict:
    meta = {"labels": {"app": name}, **({"annotations": annotations} if annotations else {})}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": meta,
                                  "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]}}}}


def variant(name: str, target: str, *, accelerator: str = "L4", profile: dict | None = None, min_replicas: int = 1,
            max_replicas: int | None = None, model: str = TINY_MODEL["name"], api_version: str | None = None,
            **spec) -> dict:
    body = {"scaleTargetRef": {"kind": "Deployment", "name": target}, "modelID": model, "accelerator": accelerator,
            "minReplicas": min_replicas, "maxBatch": 32, "slo": SLO, **spec}
    if profile is not None:
        body["profile"] = {"parametric": profile}
    if max_replicas is not None:
        body["maxReplicas"] = max_replicas
    return {"apiVersion": api_version or f"{GROUP}/{VERSION}", "kind": "VariantAutoscaling",
            "metadata": {"name": name}, "spec": body}


class Kube:
    """Small synchronous helpers over the real client, for test set-up and assertions."""

    def __init__(self, api: client.ApiClient, namespace: str):
        self.api, self.ns = api, namespace
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def deploy(self, name: str, replicas: int, annotations: dict | None = None) -> None:
        self.apps.create_namespaced_deployment(self.ns, deployment(name, replicas, annotations))

    def apply_variant(self, body: dict) -> dict:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)

    def variant(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def variants(self) -> list[dict]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL)["items"]

    def condition(self, name: str, kind: str) -> dict | None:
        status = self.variant(name).get("status") or {}
        return next((c for c in status.get("conditions") or [] if c["type"] == kind), None)

    def replicas(self, name: str) -> int:
        return self.apps.read_namespaced_deployment(name, self.ns).spec.replicas

    def ready(self, name: str) -> int:
        return self.apps.read_namespaced_deployment(name, self.ns).status.ready_replicas or 0

    def events(self, reason: str | None = None, about: str | None = None) -> list:
        items = self.core.list_namespaced_event(self.ns).items
        return [e for e in items if (reason is None or e.reason == reason)
                and (about is None or e.involved_object.name == about)]

    def wait_ready(self, name: str, replicas: int, timeout_s: float = 30) -> None:
        wait_until(lambda: self.ready(name) == replicas == self.replicas(name), timeout_s=timeout_s,
                   what=f"{name} at {replicas} ready replicas")


def wait_until(predicate: Callable[[], object], *, timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll until truthy; fail naming `what` after timeout_s (always bounded)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r})")


class OperatorThread:
    """`variant-autoscaler run` (kopf + the loop) in a thread with its own event loop."""

    def __init__(self, options):
        self.options = options
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"operator-{options.instance}", daemon=True)

    def _main(self) -> None:
        from variant_autoscaler.commands.run import run_operator

        try:
            asyncio.run(run_operator(self.options, stop_flag=self.stop_flag, ready_flag=self.ready_flag))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc

    def __enter__(self) -> OperatorThread:
        self._thread.start()
        if not self.ready_flag.wait(30):
            raise RuntimeError(f"operator did not start: {self.error!r}")
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        self._thread.join(timeout=30)

    def __exit__(self, *exc) -> None:
        self.stop()

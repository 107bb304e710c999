"""Everything the operator reads from and writes to the Kubernetes API, with retries that are safe.

Why one gateway: every call to the API server can fail in ways a control loop must survive — a
409 when someone else changed the object first, a 5xx or a dropped connection during an upgrade
of the control plane — and each write must stay correct when retried. So all calls go through
here, with one retry policy:

* 5xx, 429 and connection errors: retried with bounded exponential backoff (with jitter);
* 409 on a scale write: the Scale is re-read and the write repeated against the fresh
  resourceVersion (optimistic concurrency, as `kubectl scale` does) — never blind;
* 404 on a target: reported as missing (TargetResolved=False), not retried.

The `kubernetes` client is synchronous; calls run in a small thread pool so the kopf event loop
keeps serving. Lists are read as raw JSON: deserialising thousands of pods into model objects
would cost more than the whole optimization.

Before a scale-down, `controller.kubernetes.io/pod-deletion-cost` is set on the target's ready
pods so that the least-loaded go first (Kubernetes removes unready and pending pods before any of
them anyway). Events follow core/v1 conventions, one per change of state, never one per cycle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Literal

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

GROUP = "autoscaling.variant-autoscaler.io"
VERSION = "v1alpha1"
PLURAL = "variantautoscalings"
KIND = "VariantAutoscaling"
DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
COMPONENT = "variant-autoscaler"
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
SCALABLE_KINDS = {"Deployment": "deployments", "StatefulSet": "statefulsets"}

JsonObj = dict[str, Any]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(_Frozen):
    attempts: int = Field(default=6, ge=1, le=30, description="Tries in all, the first included.")
    first_delay_s: float = Field(default=0.2, gt=0)
    max_delay_s: float = Field(default=5.0, gt=0)
    factor: float = Field(default=2.0, ge=1)

    def delays(self) -> list[float]:
        """The sleep before each retry: exponential, capped, with +-25 % jitter."""
        out, d = [], self.first_delay_s
        for _ in range(self.attempts - 1):
            out.append(min(d, self.max_delay_s) * random.uniform(0.75, 1.25))
            d *= self.factor
        return out


class ApiCallFailed(Exception):
    """An API call that failed for good; `status` is the HTTP code (0 for no answer at all)."""

    def __init__(self, what: str, status: int, reason: str, attempts: int):
        self.what, self.status, self.reason, self.attempts = what, status, reason, attempts
        super().__init__(f"{what}: {reason} (HTTP {status or 'no answer'}, {attempts} attempt{'s' * (attempts > 1)})")


class ObjectRef(_Frozen):
    """A VariantAutoscaling (or any object an Event is about)."""

    namespace: str
    name: str
    uid: str | None = None
    kind: str = KIND
    api_version: str = f"{GROUP}/{VERSION}"


class TargetRef(_Frozen):
    namespace: str
    name: str
    kind: str = "Deployment"
    api_version: str = "apps/v1"


class PodView(_Frozen):
    name: str
    ready: bool
    terminating: bool
    deletion_cost: int | None = None


class TargetView(_Frozen):
    """A scale target as read this cycle: its replicas and its pods."""

    ref: TargetRef
    spec_replicas: int
    status_replicas: int
    ready_replicas: int
    pods: tuple[PodView, ...] = ()
    node_product: str | None = Field(default=None, description="GPU product the pod template's nodeSelector asks for.")

    @property
    def pod_count(self) -> int:
        return len(self.pods)


class TargetUnreadable(_Frozen):
    """A target whose kind cannot be read at all (403: no RBAC for it; 404: the API does not serve it).

    Final for this cycle and for this target only: the other targets go on.
    """

    ref: TargetRef
    status: int
    reason: str

    @property
    def message(self) -> str:
        r = self.ref
        grant = " (the chart's value rbac.statefulSets: true grants it)" if r.kind == "StatefulSet" else ""
        hint = {403: f"the operator's RBAC does not allow listing {SCALABLE_KINDS.get(r.kind, r.kind)}{grant}",
                404: f"the API server does not serve {r.kind} in {r.api_version}"}.get(self.status, "")
        return (f"cannot read {r.kind} {r.namespace}/{r.name}: {self.reason} (HTTP {self.status})"
                + (f"; {hint}" if hint else ""))


class ScaleResult(_Frozen):
    ref: TargetRef
    before: int
    after: int
    conflicts: int = Field(description="409s met and resolved by re-reading.")


# ----------------------------------------------------------------------------------------------
# Pure helpers.


def selector_matches(selector: JsonObj | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector against labels; an empty selector matches nothing (as a Deployment's)."""
    if not selector:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


class PodIndex:
    """One namespace's pods by label (key, value), so that matching each of 1,000 selectors against that
    namespace's pods looks up the pods carrying one of its matchLabels instead of scanning them all (the
    steady-state cycle spent 0.2 s on 100,000 `selector_matches` calls). `matching` gives the very pods,
    in the very order, that `selector_matches` over every pod gives."""

    def __init__(self, pods: list[JsonObj]):
        self.pods = pods
        self.by_label: dict[tuple, list[JsonObj]] = {}
        for pod in pods:
            labels = (pod.get("metadata") or {}).get("labels") or {}
            if not isinstance(labels, dict):
                continue
            for pair in labels.items():
                try:
                    self.by_label.setdefault(pair, []).append(pod)
                except TypeError:  # an unhashable value: a selector naming it is matched by the full scan below
                    continue

    def matching(self, selector: JsonObj | None) -> list[JsonObj]:
        candidates = self.pods
        try:
            for pair in ((selector or {}).get("matchLabels") or {}).items():
                found = self.by_label.get(pair, ())  # every pod the selector matches carries each of its pairs
                if len(found) < len(candidates):
                    candidates = found
        except (AttributeError, TypeError):  # not a mapping, or an unhashable value: scan every pod
            candidates = self.pods
        return [p for p in candidates if selector_matches(selector, (p.get("metadata") or {}).get("labels") or {})]


def pod_view(pod: JsonObj) -> PodView:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    raw_cost = (meta.get("annotations") or {}).get(DELETION_COST_ANNOTATION)
    try:
        cost = int(raw_cost) if raw_cost is not None else None
    except ValueError:
        cost = None
    return PodView(name=meta.get("name", ""), ready=ready, terminating=bool(meta.get("deletionTimestamp")),
                   deletion_cost=cost)


def deletion_costs(pods: list[PodView], load: dict[str, float]) -> dict[str, int]:
    """Deletion cost per ready pod: its load in milli-requests, so the least loaded goes first.

    Pods without a load reading get a cost above every measured pod: an unknown pod may be busy.
    """
    ready = [p for p in pods if p.ready and not p.terminating]
    measured = {p.name: max(0, min(int(round(load[p.name] * 1000)), 2**31 - 2)) for p in ready if p.name in load}
    unknown = max(measured.values(), default=0) + 1
    return {p.name: measured.get(p.name, unknown) for p in ready}


def _api_failure(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, ApiException):
        reason = exc.reason or ""
        try:
            body = json.loads(exc.body) if exc.body else {}
            reason = body.get("message") or reason
        except (ValueError, TypeError):
            pass
        return int(exc.status or 0), reason
    return 0, f"{type(exc).__name__}: {exc}"


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, ApiException):
        return int(exc.status or 0) in RETRYABLE_STATUS or int(exc.status or 0) == 0
    return isinstance(exc, OSError | ConnectionError) or type(exc).__module__.startswith("urllib3")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------------
# The gateway.


class KubeGateway:
    """Reads and writes through the real `kubernetes` client, off the event loop, with retries."""

    def __init__(self, api_client: client.ApiClient, *, retry: RetryPolicy | None = None, max_workers: int = 8,
                 user_agent: str | None = None, request_timeout_s: float = 20.0):
        self.api_client = api_client
        if user_agent:
            api_client.user_agent = user_agent
        self.retry = retry or RetryPolicy()
        self.request_timeout_s = request_timeout_s
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kube")
        self.retries_done = 0
        self.conflicts_resolved = 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- plumbing

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def _with_retries(self, what: str, fn: Callable[[], Any], *, idempotent_on_conflict: bool = False) -> Any:
        """Call fn, retrying transient failures; raise ApiCallFailed when they persist or are final.

        `idempotent_on_conflict`: the write carries no resourceVersion (a merge patch), so a 409 can
        only be transient and repeating it is safe.
        """
        delays = self.retry.delays()
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified right below
                status, reason = _api_failure(exc)
                again = _retryable(exc) or (idempotent_on_conflict and status == 409)
                if not again or attempt == self.retry.attempts:
                    raise ApiCallFailed(what, status, reason, attempt) from None
                self.retries_done += 1
                log.info("retrying %s after %s (HTTP %s), attempt %d", what, reason, status or "-", attempt)
                time.sleep(delays[attempt - 1])
        raise AssertionError("unreachable")

    def _json(self, what: str, method: Callable[..., Any], *args: Any, idempotent_on_conflict: bool = False,
              **kwargs: Any) -> JsonObj:
        def call() -> JsonObj:
            resp = method(*args, _preload_content=False, _request_timeout=self.request_timeout_s, **kwargs)
            return json.loads(resp.data) if resp.data else {}
        return self._with_retries(what, call, idempotent_on_conflict=idempotent_on_conflict)

    # -- reads

    async def list_variant_autoscalings(self, namespaces: list[str] | None = None) -> list[JsonObj]:
        if not namespaces:
            body = await self._in_thread(lambda: self._json(
                "list VariantAutoscalings", self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL))
            return body.get("items") or []
        bodies = await asyncio.gather(*(self._in_thread(lambda ns=ns: self._json(
            f"list VariantAutoscalings in {ns}", self.custom.list_namespaced_custom_object, GROUP, VERSION,
            ns, PLURAL)) for ns in namespaces))
        return [item for body in bodies for item in body.get("items") or []]

    async def read_configmap(self, namespace: str, name: str) -> JsonObj | None:
        def call():
            try:
                return self._json(f"read ConfigMap {namespace}/{name}", self.core.read_namespaced_config_map,
                                  name, namespace)
            except ApiCallFailed as err:
                if err.status == 404:
                    return None
                raise
        return await self._in_thread(call)

    async def list_nodes(self) -> list[JsonObj] | None:
        """Nodes, or None when they cannot be listed (no permission, or an API without nodes)."""
        def call():
            try:
                return self._json("list Nodes", self.core.list_node).get("items") or []
            except ApiCallFailed as err:
                if err.status in (403, 404):
                    return None
                raise
        return await self._in_thread(call)

    async def list_autoscalers(self, namespaces: list[str]) -> tuple[dict[str, list[JsonObj]], list[str]]:
        """autoscaling/v2 HorizontalPodAutoscalers per namespace, and why some namespaces could not be
        read (a 4xx such as 403 without the RBAC rule or 404 on an API without autoscaling/v2): those
        are skipped, not fatal; 5xx after the retries still raise."""
        hpas = client.AutoscalingV2Api(self.api_client)

        def one(ns: str) -> list[JsonObj] | ApiCallFailed:
            try:
                return self._json(f"list HorizontalPodAutoscalers in {ns}",
                                  hpas.list_namespaced_horizontal_pod_autoscaler, ns).get("items") or []
            except ApiCallFailed as err:
                if 400 <= err.status < 500 and err.status not in RETRYABLE_STATUS:
                    return err
                raise
        results = await asyncio.gather(*(self._in_thread(lambda n=n: one(n)) for n in namespaces))
        found = {ns: r for ns, r in zip(namespaces, results, strict=True) if not isinstance(r, ApiCallFailed)}
        skipped = [f"{ns}: {r}" for ns, r in zip(namespaces, results, strict=True) if isinstance(r, ApiCallFailed)]
        return found, skipped

    async def list_annotated(self, namespaces: list[str] | None) -> tuple[list[JsonObj], list[str]]:
        """For annotation mode: KEDA ScaledObjects (keda.sh/v1alpha1) and autoscaling/v2 HPAs in
        `namespaces` (None: all), each with its kind set, and why a kind could not be listed (a final
        4xx: 404 where KEDA's CRD is not installed, 403 without the RBAC rule): that kind is then
        skipped and the rest go on. 5xx (after the retries) still raise."""
        hpas = client.AutoscalingV2Api(self.api_client)
        sources = {
            "ScaledObject": (lambda ns, **kw: self.custom.list_namespaced_custom_object(
                                 "keda.sh", "v1alpha1", ns, "scaledobjects", **kw),
                             lambda **kw: self.custom.list_cluster_custom_object(
                                 "keda.sh", "v1alpha1", "scaledobjects", **kw)),
            "HorizontalPodAutoscaler": (hpas.list_namespaced_horizontal_pod_autoscaler,
                                        hpas.list_horizontal_pod_autoscaler_for_all_namespaces),
        }

        def one(kind: str, ns: str | None) -> list[JsonObj]:
            namespaced, everywhere = sources[kind]
            body = (self._json(f"list {kind}s in {ns}", namespaced, ns) if ns
                    else self._json(f"list {kind}s", everywhere))
            return [{**item, "kind": kind} for item in body.get("items") or []]

        items: list[JsonObj] = []
        skipped: list[str] = []
        for kind in sources:
            try:
                lists = await asyncio.gather(*(self._in_thread(lambda k=kind, n=n: one(k, n))
                                               for n in (namespaces or [None])))
            except ApiCallFailed as err:
                if 400 <= err.status < 500 and err.status not in RETRYABLE_STATUS:
                    skipped.append(str(err))
                    continue
                raise
            items += [item for found in lists for item in found]
        return items, skipped

    async def read_targets(self, refs: list[TargetRef]) -> dict[TargetRef, TargetView | TargetUnreadable | None]:
        """Every target's replicas and pods, with one list call per (namespace, kind) and per namespace's pods.

        None: the target does not exist. A kind that cannot be listed for a final reason (403, 404, other
        4xx) makes its targets `TargetUnreadable`, not the whole read fail; 5xx and no answer (after the
        retries) still raise ApiCallFailed: then the API is down and nothing should be written."""
        wanted: dict[tuple[str, str], set[str]] = {}
        for r in refs:
            wanted.setdefault((r.namespace, r.kind), set()).add(r.name)

        def list_kind(ns: str, kind: str) -> list[JsonObj] | ApiCallFailed:
            method = self.apps.list_namespaced_deployment if kind == "Deployment" else self.apps.list_namespaced_stateful_set
            try:
                return self._json(f"list {SCALABLE_KINDS[kind]} in {ns}", method, ns).get("items") or []
            except ApiCallFailed as err:
                if 400 <= err.status < 500 and err.status not in RETRYABLE_STATUS:
                    return err
                raise

        def list_pods(ns: str) -> list[JsonObj]:
            return self._json(f"list pods in {ns}", self.core.list_namespaced_pod, ns).get("items") or []

        kinds = [key for key in wanted if key[1] in SCALABLE_KINDS]
        namespaces = sorted({ns for ns, _ in wanted})
        results = await asyncio.gather(*(self._in_thread(lambda k=k: list_kind(*k)) for k in kinds),
                                       *(self._in_thread(lambda n=n: list_pods(n)) for n in namespaces))
        objects = dict(zip(kinds, results[:len(kinds)], strict=True))
        pods = {ns: PodIndex(found) for ns, found in zip(namespaces, results[len(kinds):], strict=True)}
        # by name (the first object of each name, as a scan would find it): one dict per (namespace, kind)
        # instead of a scan of the namespace's objects per target
        named: dict[tuple[str, str], dict[str, JsonObj]] = {}
        for key, items in objects.items():
            if not isinstance(items, ApiCallFailed):
                index = named[key] = {}
                for o in items:
                    index.setdefault(o["metadata"]["name"], o)
        no_pods = PodIndex([])
        out: dict[TargetRef, TargetView | TargetUnreadable | None] = {}
        for r in refs:
            items = objects.get((r.namespace, r.kind))
            if isinstance(items, ApiCallFailed):
                out[r] = TargetUnreadable(ref=r, status=items.status, reason=items.reason)
                continue
            obj = named.get((r.namespace, r.kind), {}).get(r.name)
            if obj is None:
                out[r] = None
                continue
            spec, status = obj.get("spec") or {}, obj.get("status") or {}
            selector = spec.get("selector")
            mine = tuple(pod_view(p) for p in pods.get(r.namespace, no_pods).matching(selector))
            node_selector = ((spec.get("template") or {}).get("spec") or {}).get("nodeSelector") or {}
            out[r] = TargetView(ref=r, spec_replicas=int(spec.get("replicas", 1)),
                                status_replicas=int(status.get("replicas") or 0),
                                ready_replicas=int(status.get("readyReplicas") or 0), pods=mine,
                                node_product=node_selector.get(GPU_PRODUCT_LABEL))
        return out

    # -- writes

    async def scale(self, ref: TargetRef, replicas: int) -> ScaleResult:
        """Set the target's replicas through its scale subresource; a 409 re-reads and retries."""
        if ref.kind not in SCALABLE_KINDS:
            raise ApiCallFailed(f"scale {ref.kind} {ref.namespace}/{ref.name}", 422,
                                f"kind {ref.kind} is not supported (supported: {sorted(SCALABLE_KINDS)})", 1)
        read = (self.apps.read_namespaced_deployment_scale if ref.kind == "Deployment"
                else self.apps.read_namespaced_stateful_set_scale)
        write = (self.apps.replace_namespaced_deployment_scale if ref.kind == "Deployment"
                 else self.apps.replace_namespaced_stateful_set_scale)
        what = f"scale {ref.kind} {ref.namespace}/{ref.name} to {replicas}"

        def call() -> ScaleResult:
            conflicts = 0
            before = None
            for _ in range(self.retry.attempts):
                current = self._json(f"read scale of {ref.namespace}/{ref.name}", read, ref.name, ref.namespace)
                have = int((current.get("spec") or {}).get("replicas") or 0)
                before = have if before is None else before
                if have == replicas:
                    return ScaleResult(ref=ref, before=before, after=have, conflicts=conflicts)
                body = {"apiVersion": "autoscaling/v1", "kind": "Scale",
                        "metadata": {"name": ref.name, "namespace": ref.namespace,
                                     "resourceVersion": current["metadata"]["resourceVersion"]},
                        "spec": {"replicas": replicas}}
                try:
                    self._json(what, write, ref.name, ref.namespace, body)
                    return ScaleResult(ref=ref, before=before, after=replicas, conflicts=conflicts)
                except ApiCallFailed as err:
                    if err.status != 409:
                        raise
                    conflicts += 1
                    self.conflicts_resolved += 1
                    log.info("conflict writing %s; re-reading the scale", what)
            raise ApiCallFailed(what, 409, "conflicts persisted", self.retry.attempts)

        return await self._in_thread(call)

    async def set_deletion_costs(self, namespace: str, costs: dict[str, int], current: dict[str, int | None]) -> int:
        """Annotate pods whose deletion cost changes; returns how many were patched (gone pods skipped)."""
        todo = {p: c for p, c in costs.items() if current.get(p) != c}

        def one(pod: str, cost: int) -> int:
            body = {"metadata": {"annotations": {DELETION_COST_ANNOTATION: str(cost)}}}
            try:
                self._json(f"annotate pod {namespace}/{pod}", self.core.patch_namespaced_pod, pod, namespace, body,
                           _content_type="application/merge-patch+json", idempotent_on_conflict=True)
                return 1
            except ApiCallFailed as err:
                if err.status == 404:
                    return 0
                raise

        done = await asyncio.gather(*(self._in_thread(lambda p=p, c=c: one(p, c)) for p, c in todo.items()))
        return sum(done)

    async def patch_status(self, ref: ObjectRef, status: JsonObj) -> bool:
        """Merge-patch the status subresource; False when the object is gone."""
        def call() -> bool:
            try:
                self._json(f"patch status of {ref.namespace}/{ref.name}",
                           self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, ref.namespace, PLURAL,
                           ref.name, {"status": status}, _content_type="application/merge-patch+json",
                           idempotent_on_conflict=True)
                return True
            except ApiCallFailed as err:
                if err.status == 404:
                    return False
                raise
        return await self._in_thread(call)

    async def emit_event(self, ref: ObjectRef, kind: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        now = _now()
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
            "involvedObject": {"apiVersion": ref.api_version, "kind": ref.kind, "name": ref.name,
                               "namespace": ref.namespace, **({"uid": ref.uid} if ref.uid else {})},
            "reason": reason, "message": message[:1024], "type": kind,
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT, "reportingInstance": COMPONENT,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        await self._in_thread(lambda: self._json(f"post event {reason} for {ref.namespace}/{ref.name}",
                                                 self.core.create_namespaced_event, ref.namespace, body))

    async def ensure_cluster_object(self, group: str, version: str, plural: str, body: JsonObj) -> bool:
        """Create a cluster-scoped custom object unless it exists; True when created."""
        def call() -> bool:
            try:
                self._json(f"create {plural}/{body['metadata']['name']}", self.custom.create_cluster_custom_object,
                           group, version, plural, body)
                return True
            except ApiCallFailed as err:
                if err.status == 409:
                    return False
                raise
        return await self._in_thread(call)

    async def read_cluster_object(self, group: str, version: str, plural: str, name: str) -> JsonObj | None:
        def call():
            try:
                return self._json(f"read {plural}/{name}", self.custom.get_cluster_custom_object, group, version,
                                  plural, name)
            except ApiCallFailed as err:
                if err.status == 404:
                    return None
                raise
        return await self._in_thread(call)

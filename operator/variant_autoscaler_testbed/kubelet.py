"""An emulated kubelet plus Deployment controller: Deployment replicas become Pods that get ready.

The operator's behaviour depends on what a real cluster does after it writes a replica count: pods
appear, take a while to become ready (a model server's cold start), surplus pods go in the order
`controller.kubernetes.io/pod-deletion-cost` asks for, and the Deployment's `.status` reports it.
This task does exactly that on the emulated core API's store, in the same event loop, without
going through HTTP (so the request log shows only what clients did).

Hooks let the test harness run a real process or task per pod: `on_pod_start(PodInfo)` is awaited
when a pod starts (before its start delay counts down) and `on_pod_stop(PodInfo)` when it goes away.
Each pod gets its own free 127.0.0.1 port, written to the pod annotation `PORT_ANNOTATION`, for the
server the hook starts. Simplifications, on purpose: no ReplicaSet objects (pods are owned by the
Deployment directly, named `<deployment>-<template hash>-<suffix>` with a `pod-template-hash`
label); a template change replaces pods one for one as the new ones become ready; pods created
directly (not by a Deployment) are stored but never run.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from variant_autoscaler_testbed.core_api import (
    ApiError,
    JsonObj,
    ObjectStore,
    WatchEvent,
    label_selector_requirements,
    now_rfc3339,
    parse_rfc3339,
)
from variant_autoscaler_testbed.crd_server import free_port

PORT_ANNOTATION = "emulation.variant-autoscaler.io/port"
START_DELAY_ANNOTATION = "emulation.variant-autoscaler.io/start-delay-seconds"
DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
TEMPLATE_HASH_LABEL = "pod-template-hash"
NODE_NAME = "emulated-node"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PodInfo:
    """What a start/stop hook needs to run a stand-in server for one pod."""

    namespace: str
    name: str
    uid: str
    deployment: str
    port: int
    labels: dict[str, str]
    annotations: dict[str, str]
    pod_spec: JsonObj = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


PodHook = Callable[[PodInfo], Awaitable[None] | None]


def template_hash(template: JsonObj) -> str:
    """Stable 10-character hash of a pod template, like the label the real controller adds."""
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    number = int(digest[:16], 16)
    return "".join(alphabet[(number >> (5 * i)) % len(alphabet)] for i in range(10))


def pod_is_ready(pod: JsonObj) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def deletion_cost(pod: JsonObj) -> int:
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(DELETION_COST_ANNOTATION, "0")
    try:
        return int(raw)
    except (TypeError, ValueError):
        return 0


def deletion_order(pods: list[JsonObj]) -> list[JsonObj]:
    """Pods in the order a ReplicaSet controller removes them: not ready first, then the lowest
    pod-deletion-cost, then the newest."""
    return sorted(pods, key=lambda p: (pod_is_ready(p), deletion_cost(p),
                                       -parse_rfc3339(p["metadata"]["creationTimestamp"]),
                                       p["metadata"]["name"]))


async def _call_hook(hook: PodHook | None, info: PodInfo) -> None:
    if hook is None:
        return
    result = hook(info)
    if inspect.isawaitable(result):
        await result


class Kubelet:
    """Reconciles every Deployment in `store` into Pods and fills Deployment and Pod status."""

    def __init__(self, store: ObjectStore, *, start_delay_s: float = 0.5,
                 on_pod_start: PodHook | None = None, on_pod_stop: PodHook | None = None):
        self.store = store
        self.start_delay_s = start_delay_s
        self.on_pod_start = on_pod_start
        self.on_pod_stop = on_pod_stop
        self._deployments = store.type("apps", "deployments")
        self._pods = store.type("", "pods")
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._queued: set[tuple[str, str]] = set()
        self._worker: asyncio.Task | None = None
        self._lifecycles: dict[str, asyncio.Task] = {}
        self._started: dict[str, PodInfo] = {}
        self._stops: set[asyncio.Task] = set()

    # -- lifecycle

    async def start(self) -> None:
        self.store.subscribe(self._on_event)
        for dep in self.store.list(self._deployments):
            self._enqueue(dep["metadata"]["namespace"], dep["metadata"]["name"])
        self._worker = asyncio.create_task(self._work(), name="emulated-kubelet")

    async def stop(self) -> None:
        self.store.unsubscribe(self._on_event)
        tasks = [t for t in (self._worker, *self._lifecycles.values()) if t]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        stops = [asyncio.create_task(_call_hook(self.on_pod_stop, info)) for info in self._started.values()]
        self._started.clear()
        if stops or self._stops:
            await asyncio.wait([*stops, *self._stops], timeout=30)

    @property
    def running_pods(self) -> list[PodInfo]:
        """Pods whose start hook has been called and that have not stopped."""
        return list(self._started.values())

    # -- events

    def _on_event(self, event: WatchEvent) -> None:
        meta = event.obj["metadata"]
        if event.rtype is self._deployments:
            self._enqueue(meta["namespace"], meta["name"])
        elif event.rtype is self._pods:
            owner = self._owner(event.obj)
            if owner:
                self._enqueue(meta["namespace"], owner)
            if event.type == "DELETED":
                self._pod_gone(meta["uid"])

    def _enqueue(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        if key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    @staticmethod
    def _owner(pod: JsonObj) -> str | None:
        for ref in (pod.get("metadata") or {}).get("ownerReferences") or []:
            if ref.get("kind") == "Deployment" and ref.get("controller"):
                return ref.get("name")
        return None

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            try:
                self._reconcile(*key)
            except ApiError as err:
                log.warning("emulated kubelet: reconciling deployment %s/%s failed: %s", *key, err.message)

    # -- reconcile one deployment

    def _reconcile(self, namespace: str, name: str) -> None:
        dep = self.store.find(self._deployments, namespace, name)
        owned = [p for p in self.store.list(self._pods, namespace) if self._owner(p) == name]
        if dep is None or dep["metadata"].get("deletionTimestamp"):
            for pod in owned:
                self._delete_pod(pod)
            return
        owned = [p for p in owned if any(r.get("uid") == dep["metadata"]["uid"]
                                         for r in p["metadata"].get("ownerReferences") or [])]
        live = [p for p in owned if not p["metadata"].get("deletionTimestamp")]
        spec = dep.get("spec") or {}
        desired = int(spec.get("replicas", 1))
        current_hash = template_hash(spec.get("template") or {})
        new = [p for p in live if (p["metadata"].get("labels") or {}).get(TEMPLATE_HASH_LABEL) == current_hash]
        old = [p for p in live if p not in new]
        if len(new) < desired:
            for _ in range(desired - len(new)):
                new.append(self._create_pod(dep, current_hash))
        elif len(new) > desired:
            for pod in deletion_order(new)[: len(new) - desired]:
                self._delete_pod(pod)
                new.remove(pod)
        keep_old = max(0, desired - sum(1 for p in new if pod_is_ready(p)))
        for pod in deletion_order(old)[: max(0, len(old) - keep_old)]:
            self._delete_pod(pod)
            old.remove(pod)
        self._write_deployment_status(dep, new, old, desired)

    def _create_pod(self, dep: JsonObj, pod_hash: str) -> JsonObj:
        meta = dep["metadata"]
        template = copy.deepcopy((dep.get("spec") or {}).get("template") or {})
        tmeta = template.get("metadata") or {}
        port = free_port()
        labels = {**(tmeta.get("labels") or {}), TEMPLATE_HASH_LABEL: pod_hash}
        annotations = {**(tmeta.get("annotations") or {}), PORT_ANNOTATION: str(port)}
        pod_spec = template.get("spec") or {}
        pod_spec["nodeName"] = NODE_NAME
        body = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "generateName": f"{meta['name']}-{pod_hash}-", "namespace": meta["namespace"],
                "labels": labels, "annotations": annotations,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"],
                                     "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": pod_spec,
        }
        pod = self.store.create(self._pods, meta["namespace"], body)
        delay = self._start_delay(annotations)
        info = PodInfo(namespace=meta["namespace"], name=pod["metadata"]["name"], uid=pod["metadata"]["uid"],
                       deployment=meta["name"], port=port, labels=labels, annotations=annotations,
                       pod_spec=copy.deepcopy(pod["spec"]))
        task = asyncio.get_running_loop().create_task(self._run_pod(info, delay), name=f"pod {info.name}")
        self._lifecycles[info.uid] = task
        return pod

    def _start_delay(self, annotations: dict[str, str]) -> float:
        raw = annotations.get(START_DELAY_ANNOTATION)
        try:
            return max(0.0, float(raw)) if raw is not None else self.start_delay_s
        except ValueError:
            return self.start_delay_s

    def _delete_pod(self, pod: JsonObj) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(ApiError):
            self.store.delete(self._pods, meta["namespace"], meta["name"])

    # -- one pod's life

    async def _run_pod(self, info: PodInfo, delay_s: float) -> None:
        started_at = now_rfc3339()
        self._set_pod_status(info, ready=False, started_at=started_at, reason="ContainersNotReady")
        self._started[info.uid] = info
        try:
            await _call_hook(self.on_pod_start, info)
        except Exception as err:  # a broken stand-in server must show as a pod that never gets ready
            log.warning("emulated kubelet: start hook for pod %s/%s failed: %r", info.namespace, info.name, err)
            self._set_pod_status(info, ready=False, started_at=started_at, reason="StartHookFailed",
                                 message=repr(err))
            return
        await asyncio.sleep(delay_s)
        self._set_pod_status(info, ready=True, started_at=started_at)
        self._lifecycles.pop(info.uid, None)

    def _set_pod_status(self, info: PodInfo, *, ready: bool, started_at: str, reason: str = "",
                        message: str = "") -> None:
        pod = self.store.find(self._pods, info.namespace, info.name)
        if pod is None or pod["metadata"]["uid"] != info.uid or pod["metadata"].get("deletionTimestamp"):
            return
        now = now_rfc3339()
        flag = "True" if ready else "False"
        extra = {"reason": reason, "message": message} if reason and not ready else {}
        containers = (pod.get("spec") or {}).get("containers") or []
        status = {
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}], "startTime": started_at, "qosClass": "BestEffort",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": started_at},
                {"type": "Initialized", "status": "True", "lastTransitionTime": started_at},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": now, **extra},
                {"type": "Ready", "status": flag, "lastTransitionTime": now, **extra},
            ],
            "containerStatuses": [{
                "name": c.get("name", f"c{i}"), "image": c.get("image", ""), "imageID": "",
                "ready": ready, "started": True, "restartCount": 0,
                "state": {"running": {"startedAt": started_at}},
            } for i, c in enumerate(containers)],
        }
        updated = copy.deepcopy(pod)
        updated["status"] = status
        with contextlib.suppress(ApiError):
            self.store.replace(self._pods, info.namespace, info.name, updated, subresource="status")

    def _pod_gone(self, uid: str) -> None:
        task = self._lifecycles.pop(uid, None)
        if task:
            task.cancel()
        info = self._started.pop(uid, None)
        if info is not None and self.on_pod_stop is not None:
            stop = asyncio.get_running_loop().create_task(self._stop_hook(info), name=f"stop {info.name}")
            self._stops.add(stop)
            stop.add_done_callback(self._stops.discard)

    async def _stop_hook(self, info: PodInfo) -> None:
        try:
            await _call_hook(self.on_pod_stop, info)
        except Exception as err:  # the pod is gone either way; the harness must not break the kubelet
            log.warning("emulated kubelet: stop hook for pod %s/%s failed: %r", info.namespace, info.name, err)

    # -- deployment status

    def _write_deployment_status(self, dep: JsonObj, new: list[JsonObj], old: list[JsonObj], desired: int) -> None:
        live = new + old
        ready = sum(1 for p in live if pod_is_ready(p))
        counts = {"replicas": len(live), "updatedReplicas": len(new), "readyReplicas": ready,
                  "availableReplicas": ready, "unavailableReplicas": max(0, desired - ready)}
        status: dict[str, Any] = {"observedGeneration": dep["metadata"].get("generation", 1)}
        status.update({k: v for k, v in counts.items() if v})
        previous = {c.get("type"): c for c in (dep.get("status") or {}).get("conditions") or []}
        now = now_rfc3339()

        def condition(kind: str, ok: bool, reason: str, message: str) -> JsonObj:
            flag = "True" if ok else "False"
            before = previous.get(kind) or {}
            since = before.get("lastTransitionTime", now) if before.get("status") == flag else now
            return {"type": kind, "status": flag, "reason": reason, "message": message,
                    "lastUpdateTime": before.get("lastUpdateTime", now) if before.get("reason") == reason else now,
                    "lastTransitionTime": since}

        available = ready >= desired
        complete = available and len(new) == desired and not old
        name = dep["metadata"]["name"]
        status["conditions"] = [
            condition("Available", available, "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                      "Deployment has minimum availability." if available
                      else "Deployment does not have minimum availability."),
            condition("Progressing", True, "NewReplicaSetAvailable" if complete else "ReplicaSetUpdated",
                      f'Deployment "{name}" has successfully progressed.' if complete
                      else f'Deployment "{name}" is progressing.'),
        ]
        if status == dep.get("status"):
            return
        updated = copy.deepcopy(dep)
        updated["status"] = status
        with contextlib.suppress(ApiError):
            self.store.replace(self._deployments, dep["metadata"]["namespace"], name, updated, subresource="status")


def selected_pods(store: ObjectStore, deployment: JsonObj) -> list[JsonObj]:
    """Pods matching a Deployment's selector (what `kubectl get pods -l ...` would show)."""
    requirements = label_selector_requirements((deployment.get("spec") or {}).get("selector"))
    pods = store.list(store.type("", "pods"), deployment["metadata"]["namespace"])
    return [p for p in pods if all(r.matches(p["metadata"].get("labels") or {}) for r in requirements)]

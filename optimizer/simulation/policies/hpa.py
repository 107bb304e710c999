"""HPA-like autoscaling of one variant: the Kubernetes Horizontal Pod Autoscaler's algorithm.

This is the baseline people run today on GPU inference: one accelerator type, one per-replica
metric (requests in flight, queue length or KV-cache usage from the vLLM metrics) and a target.
It follows the HPA's documented behaviour:

* desired = ceil(total metric / target), computed only when the per-replica average is outside
  the 10 % tolerance band around the target (otherwise keep the current count);
* replicas still starting count as using nothing (the HPA's rule for not-ready pods on scale-up);
* scale-up at most max(2 x current, current + 4) per step (the default 100 % / 4 pods per 15 s);
* scale-down stabilization: the count only falls to the highest recommendation of the last 300 s.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

from optimizer.simulation.policy import Decision, Observation, ReplicaState

Metric = Literal["concurrency", "queue", "kv_usage"]


def replica_metric(metric: Metric, queue_len: int, running: int, kv_usage: float) -> float:
    if metric == "concurrency":
        return float(queue_len + running)
    if metric == "queue":
        return float(queue_len)
    return kv_usage


class HpaLikePolicy:
    def __init__(
        self,
        variant: str,
        target: float,
        *,
        metric: Metric = "concurrency",
        interval_s: float = 15.0,
        tolerance: float = 0.1,
        stabilization_s: float = 300.0,
        min_replicas: int = 1,
        max_replicas: int | None = None,
        name: str | None = None,
    ):
        if target <= 0:
            raise ValueError(f"HPA target must be > 0, got {target}")
        if metric not in ("concurrency", "queue", "kv_usage"):
            raise ValueError(f"unknown HPA metric {metric!r}")
        self.variant = variant
        self.target = target
        self.metric: Metric = metric
        self.interval_s = interval_s
        self.tolerance = tolerance
        self.stabilization_s = stabilization_s
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.name = name or f"hpa[{variant}]"
        self._history: deque[tuple[float, int]] = deque()

    def decide(self, observation: Observation) -> Decision:
        t = observation.time_s
        live = observation.replicas_of(self.variant, ReplicaState.STARTING, ReplicaState.READY)
        current = len(live)
        ready = [r for r in live if r.state is ReplicaState.READY]
        if current == 0:
            raw = self.min_replicas
        elif not ready:
            raw = current
        else:
            total = sum(replica_metric(self.metric, r.queue_len, r.running, r.kv_usage) for r in ready)
            ratio = total / (current * self.target)
            raw = current if abs(ratio - 1.0) <= self.tolerance else math.ceil(total / self.target - 1e-9)
            raw = min(raw, max(2 * current, current + 4))
        raw = max(raw, self.min_replicas)
        if self.max_replicas is not None:
            raw = min(raw, self.max_replicas)
        self._history.append((t, raw))
        while self._history and self._history[0][0] < t - self.stabilization_s:
            self._history.popleft()
        desired = raw if raw >= current else min(current, max(n for _, n in self._history))
        return Decision(desired_replicas={self.variant: desired}, note=f"{self.metric} target {self.target:g}")

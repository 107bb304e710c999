"""WVA-style saturation scaling: +1 on the cheapest variant when spare capacity runs low, -1 on the dearest.

The llm-d Workload Variant Autoscaler's later releases dropped queueing models for a saturation
rule on the vLLM gauges, with its default thresholds:

* a replica is saturated when its KV-cache usage is >= 0.8 or its queue holds >= 5 requests;
* spare capacity = the mean, over non-saturated replicas, of (0.8 - KV usage) and (5 - queue);
  when there is no non-saturated replica, or the spare KV falls below 0.1 or the spare queue
  below 3, add one replica of the model's cheapest variant;
* when spare capacity would stay above both triggers after removing a replica (the load of the
  remaining replicas scaled by n / (n - 1)), remove one replica of the most expensive variant.

It never looks at latency or the request mix, which is the point of comparing against it.
"""

from __future__ import annotations

from optimizer.simulation.policy import Decision, Observation, ReplicaState


class SaturationPolicy:
    def __init__(
        self,
        model: str,
        variant_costs: dict[str, float],
        *,
        kv_threshold: float = 0.8,
        queue_threshold: float = 5.0,
        kv_spare_trigger: float = 0.1,
        queue_spare_trigger: float = 3.0,
        interval_s: float = 30.0,
        min_replicas: int = 1,
        name: str = "wva-saturation",
    ):
        if not variant_costs:
            raise ValueError("the saturation policy needs at least one variant")
        self.model = model
        self.variant_costs = dict(variant_costs)
        self.kv_threshold = kv_threshold
        self.queue_threshold = queue_threshold
        self.kv_spare_trigger = kv_spare_trigger
        self.queue_spare_trigger = queue_spare_trigger
        self.interval_s = interval_s
        self.min_replicas = min_replicas
        self.name = name
        self._cheapest = min(self.variant_costs, key=lambda v: (self.variant_costs[v], v))

    def _spare(self, kv: list[float], queue: list[float], scale: float) -> tuple[float, float, bool]:
        spare_kv, spare_q, unsaturated = 0.0, 0.0, 0
        for k, q in zip(kv, queue, strict=True):
            k, q = k * scale, q * scale
            if k >= self.kv_threshold or q >= self.queue_threshold:
                continue
            unsaturated += 1
            spare_kv += self.kv_threshold - k
            spare_q += self.queue_threshold - q
        if unsaturated == 0:
            return 0.0, 0.0, False
        return spare_kv / unsaturated, spare_q / unsaturated, True

    def decide(self, observation: Observation) -> Decision:
        counts = {v: observation.replica_count(v) for v in self.variant_costs}
        total = sum(counts.values())
        if total < self.min_replicas:
            counts[self._cheapest] += self.min_replicas - total
            return Decision(desired_replicas=counts, note="below minimum")
        ready = [r for v in self.variant_costs for r in observation.replicas_of(v, ReplicaState.READY)]
        if any(r.state is ReplicaState.STARTING for v in self.variant_costs for r in observation.replicas_of(v)):
            return Decision(desired_replicas=counts, note="waiting for starting replicas")
        if not ready:
            return Decision(desired_replicas=counts, note="no ready replica")
        kv = [r.kv_usage for r in ready]
        queue = [float(r.queue_len) for r in ready]
        spare_kv, spare_q, any_free = self._spare(kv, queue, 1.0)
        if not any_free or spare_kv < self.kv_spare_trigger or spare_q < self.queue_spare_trigger:
            counts[self._cheapest] += 1
            return Decision(desired_replicas=counts, note=f"+1 {self._cheapest}: spare kv {spare_kv:.2f} queue {spare_q:.1f}")
        n = len(ready)
        if n > self.min_replicas:
            spare_kv2, spare_q2, ok = self._spare(kv, queue, n / (n - 1))
            if ok and spare_kv2 >= self.kv_spare_trigger and spare_q2 >= self.queue_spare_trigger:
                with_replicas = [v for v in self.variant_costs if counts[v] > 0]
                dearest = max(with_replicas, key=lambda v: (self.variant_costs[v], v))
                counts[dearest] -= 1
                return Decision(desired_replicas=counts, note=f"-1 {dearest}")
        return Decision(desired_replicas=counts, note="steady")
